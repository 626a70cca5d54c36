"""Sweeps on Slurm (``hydra/launcher=slurm``): Hydra's submitit launcher, with what a team needs
on top of it.

* Every job is waited for: a job Slurm cancelled, killed or lost is one line (``job 3 (...)
  failed on Slurm: job 12_3 CANCELLED, no result``) and the others run to their end; the sweep
  then exits non-zero.
* Job states come from ``sacct`` where Slurm accounting runs and from ``squeue`` where it does
  not (slurmctld keeps a finished job for ``MinJobAge``, 300 s by default; a job neither knows
  has ended): no warning on every poll, and a cancelled job is seen as ended.
* sbatch refusing the sweep (a partition that does not exist, a GPU request on nodes without
  GPUs) is one line naming the launcher options, exit 2.
* ``resume=true`` skips jobs before submitting them; progress lines say how many jobs are done
  and about how long the rest takes.

Each job runs on its node through submitit's ``python -m submitit.core._submit`` and Hydra's
``run_job``, exactly as with Hydra's own submitit launcher (whose job callable it submits).
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import time
from typing import Any, Sequence

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from omegaconf import OmegaConf
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher

from moebench.sweep import JobError, Progress, failure_line, job_return, refuse, start_sweep, summary

log = logging.getLogger("moebench.slurm")

#: seconds between two looks at the queue while jobs run
POLL_S = 2.0
#: the launcher options a refused submission names (those that are set)
NAMED_OPTIONS = ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
#: states of a job that ended: no result will come (COMPLETED without one: the file system may lag)
ENDED = ("BOOT_FAIL", "CANCELLED", "DEADLINE", "FAILED", "GONE", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "REVOKED", "TIMEOUT")


class QueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, asking ``squeue`` once ``sacct`` fails (accounting off)."""

    def __init__(self, delay_s: int = 5):
        super().__init__(delay_s=delay_s)
        self.accounting: bool | None = None  # unknown until the first call

    def update(self) -> None:
        pending = self._registered - self._finished
        ids = sorted({x.split("_")[0] for x in pending})
        if not ids:
            return
        self._num_calls += 1
        if self.accounting is not False:
            p = subprocess.run(["sacct", "-o", "JobID,State,NodeList", "--parsable2", *[f"-j{i}" for i in ids]],
                               capture_output=True, text=True)
            if p.returncode == 0:
                self.accounting = True
                self._info_dict.update(self.read_info(p.stdout))
            elif self.accounting is None:
                self.accounting = False
                why = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[0]
                log.info("Slurm accounting is off (sacct: %s): job states from squeue", why)
        if self.accounting is False:
            self._update_from_squeue(ids, pending)
        self._last_status_check = time.time()
        for job_id in pending:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _update_from_squeue(self, ids: list[str], pending: set[str]) -> None:
        p = subprocess.run(["squeue", "--states=all", "--noheader", "-o", "%i|%T|%N", "-j", ",".join(ids)],
                           capture_output=True, text=True)
        if p.returncode != 0 and "Invalid job id" not in p.stderr:
            log.warning("squeue failed (%s): job states not updated", (p.stderr.strip().splitlines() or ["?"])[0])
            return
        listed = self.read_info("JobID|State|NodeList\n" + (p.stdout if p.returncode == 0 else ""))
        self._info_dict.update(listed)
        for job_id in pending - set(listed):  # ended, and gone from slurmctld's memory (or never started)
            self._info_dict[job_id] = {"JobID": job_id, "State": "GONE"}


def executor_for(params: dict) -> submitit.AutoExecutor:
    """The submitit executor of the launcher options (as Hydra's submitit launcher builds it)."""
    init = {"folder": params["submitit_folder"], "slurm_max_num_timeout": params.get("max_num_timeout", 0)}
    executor = submitit.AutoExecutor(cluster="slurm", **init)
    generic = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in generic else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    return executor


def refused(error: str, params: dict) -> str:
    """One line for a sweep sbatch (or this machine) refused."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    why = next((ln.split("error:", 1)[1].strip() for ln in lines if "error:" in ln), lines[0] if lines else "")
    named = ", ".join(f"hydra.launcher.{k}={params[k]}" for k in NAMED_OPTIONS if params.get(k) is not None)
    hint = ""
    if "gres" in why.lower() or "generic resource" in why.lower():
        hint = f"; hydra.launcher.gpus_per_node={params.get('gpus_per_node')} asks for GPUs: on nodes without GPUs " \
               "give hydra.launcher.gpus_per_node=0"
    return f"sbatch refused the sweep: {why} ({named}){hint}"


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """``hydra/launcher=slurm``: the jobs ``resume=true`` does not skip, as one Slurm array."""
    _, nums, configs, skips, labels = start_sweep(launcher, job_overrides, initial_job_idx)
    returns: list[JobReturn | None] = [None] * len(configs)
    progress = Progress(len(configs), skipped=sum(bool(s) for s in skips))
    for i, skip in enumerate(skips):
        if skip:
            log.info("job %d (%s) %s", nums[i], labels[i], skip)
            returns[i] = job_return(configs[i], job_overrides[i], JobStatus.COMPLETED)
    todo = [i for i, s in enumerate(skips) if not s]
    if todo:
        wait_for(launcher, [(i, nums[i], labels[i], configs[i], job_overrides[i]) for i in todo], returns, progress)
    summary(progress, [str(r._return_value) for r in returns if r.status == JobStatus.FAILED])
    return returns


def wait_for(launcher: Any, todo: list, returns: list, progress: Progress) -> None:
    """Submit the jobs as one array, then wait for every one of them."""
    inner = SubmititSlurmLauncher(**launcher.params)
    inner.setup(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=launcher.config)
    state = Singleton.get_state()
    args = [(list(ov), "hydra.sweep.dir", num, f"job_id_for_{num}", state) for _, num, _, _, ov in todo]
    executor = executor_for(launcher.params)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):  # submitit prints sbatch's error as well: one line is ours
            jobs = executor.map_array(inner, *zip(*args))
    except FileNotFoundError as e:
        refuse(f"hydra/launcher=slurm: {e.filename or 'sbatch'} is not on this machine: submit from a Slurm node")
    except FailedJobError as e:
        refuse(refused(str(e) or stderr.getvalue(), launcher.params))
    watcher = QueueWatcher()
    for job in jobs:
        job.watcher = watcher  # this sweep's jobs ask squeue where sacct cannot answer
        watcher.register_job(job.job_id)
    log.info("Submitted %d jobs to Slurm as array %s (sweep folder %s)", len(jobs), jobs[0].job_id.split("_")[0],
             launcher.config.hydra.sweep.dir)
    for job, (_, num, label, _, ov) in zip(jobs, todo):
        log.info("  job %d (%s): Slurm job %s: %s", num, label, job.job_id, " ".join(filter_overrides(ov)))
    waiting = dict(zip(range(len(jobs)), jobs))
    while waiting:
        for k, job in list(waiting.items()):
            if not job.done():
                continue
            del waiting[k]
            i, num, label, cfg, ov = todo[k]
            name = f"job {num} ({label})"
            state = job.state.split()[0]  # "CANCELLED by 0" -> CANCELLED
            lost = JobError(f"{name} failed on Slurm: job {job.job_id} {state}, no result "
                            f"(its log: {job.paths.stderr})")
            if state in ENDED and not job.paths.result_pickle.exists():
                ret = job_return(cfg, ov, JobStatus.FAILED, lost)
            else:
                try:
                    ret = job.results()[0]
                except UncompletedJobError:
                    ret = job_return(cfg, ov, JobStatus.FAILED, lost)
            if ret.status == JobStatus.FAILED and not isinstance(ret._return_value, JobError):
                ret.return_value = JobError(f"{name} failed: {failure_line(ret)}")
            returns[i] = ret
            progress.finished()
            outcome = str(ret._return_value) if ret.status == JobStatus.FAILED else f"{name} done on Slurm"
            log.info("%s -- %s", outcome, progress.status())
        if waiting:
            time.sleep(POLL_S)
