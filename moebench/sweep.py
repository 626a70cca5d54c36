"""Sweeps (``-m``) through ``hydra/launcher=process`` (the default): the jobs one after another,
each in a Python process of its own (``moebench.job_process``), so a job that kills its process
or leaves the CUDA context unusable fails alone -- ``job 2 (topk=4) died: SIGKILL`` -- and the
sweep runs on. Also what every moebench launcher shares: each job's label (the overrides that
vary across the sweep), the progress lines (job i of n, what is left), ``resume=true`` decided
for every job before the first one runs, and :class:`JobError`, a failed job in one line.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.errors import CompactHydraException
from omegaconf import DictConfig, open_dict, read_write

from moebench.errors import ConfigError
from moebench.runner import config_container, config_hash, plan, remove_partials, resume_skip

log = logging.getLogger("moebench.sweep")

#: the folder that holds ``moebench`` and ``hydra_plugins``: on the path of every job's process
REPO = Path(__file__).resolve().parent.parent


class JobError(CompactHydraException):
    """A job of a sweep that failed or died, in one line (Hydra prints it without a traceback)."""


# -- what every launcher shares ------------------------------------------------------------

def job_labels(job_overrides: Sequence[Sequence[str]]) -> list[str]:
    """Each job's overrides that differ between jobs (``topk=2 experts=64``); all of a job's
    overrides where none differ."""
    keys = [dict(o.split("=", 1) if "=" in o else (o, "") for o in ov) for ov in job_overrides]
    varying = {k for k in set().union(*keys) if len({d.get(k) for d in keys}) > 1} if len(keys) > 1 else set()
    return [" ".join(o for o in ov if (o.split("=", 1)[0] in varying or not varying)) or "no overrides"
            for ov in job_overrides]


def duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """Where a sweep is: jobs done of n, and what is left (the mean time of the jobs that ran,
    times the jobs still to run; skipped jobs take no time)."""

    def __init__(self, n: int, skipped: int = 0):
        self.n, self.t0 = n, time.perf_counter()
        self.done = self.skipped = skipped
        self.ran = 0

    def finished(self, skipped: bool = False) -> None:
        self.done += 1
        self.skipped += skipped
        self.ran += not skipped

    def status(self) -> str:
        elapsed = time.perf_counter() - self.t0
        if not self.done:
            return ""
        line = f"{self.done} done in {duration(elapsed)}"
        if self.ran and self.done < self.n:
            line += f", about {duration(elapsed / self.ran * (self.n - self.done))} left"
        return line


def job_config(launcher: Any, overrides: Sequence[str], num: int) -> DictConfig:
    """The job's config as Hydra composes it for a sweep job (``hydra.job.num`` set)."""
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = num
        cfg.hydra.job.num = num
    return cfg


def output_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def task_config(cfg: DictConfig) -> DictConfig:
    """The job's config without Hydra's node (what the task function gets)."""
    task = copy.deepcopy(cfg)
    with read_write(task), open_dict(task):
        del task["hydra"]
    return task


def resume_skips(configs: Sequence[DictConfig]) -> list[str | None]:
    """For every job of a ``resume=true`` sweep, before any runs: why it is skipped, or None to
    run it. A folder whose table holds another config is a ConfigError (nothing runs)."""
    skips = []
    for cfg in configs:
        if not cfg.get("resume"):
            skips.append(None)
            continue
        task = task_config(cfg)
        job, _ = plan(task)
        remove_partials(output_dir(cfg))
        skips.append(resume_skip(output_dir(cfg), config_hash(config_container(task), job)))
    return skips


def start_sweep(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
    """What every launcher of ours starts a sweep with: Hydra's globals and logging, the sweep
    folder, and per job its number, config, label and why ``resume=true`` skips it (None: run
    it; a folder holding another config refuses the sweep). -> (sweep_dir, nums, configs,
    skips, labels)."""
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    nums = [initial_job_idx + i for i in range(len(job_overrides))]
    configs = [job_config(launcher, ov, num) for ov, num in zip(job_overrides, nums)]
    try:
        skips = resume_skips(configs)
    except ConfigError as e:
        refuse(str(e))
    return sweep_dir, nums, configs, skips, job_labels(job_overrides)


def refuse(message: str) -> None:
    """A sweep that cannot start: one line, exit 2, nothing run."""
    print(f"moebench: error: {message}", file=sys.stderr)
    sys.exit(2)


def job_return(cfg: DictConfig, overrides: Sequence[str], status: JobStatus, value: Any = None) -> JobReturn:
    return JobReturn(overrides=list(overrides), cfg=task_config(cfg), hydra_cfg=cfg,
                     working_dir=str(output_dir(cfg)), task_name=str(cfg.hydra.job.name), status=status,
                     _return_value=value)


def failure_line(ret: JobReturn) -> str:
    """The one line of a failed job's exception."""
    e = ret._return_value
    text = (str(e).strip().splitlines() or [""])[0]
    return text if type(e).__name__ in ("JobFailed", "JobError") else f"{type(e).__name__}: {text}"


def summary(progress: Progress, failures: list[str]) -> None:
    n = progress.n
    parts = [f"{n - progress.skipped - len(failures)} ok", f"{len(failures)} failed"]
    if progress.skipped:
        parts.append(f"{progress.skipped} skipped")
    log.info("sweep of %d job%s done in %s: %s", n, "s" * (n != 1), duration(time.perf_counter() - progress.t0),
             ", ".join(parts))
    for line in failures:
        log.info("  %s", line)


# -- one job in a process of its own ----------------------------------------------------------

def signal_name(returncode: int) -> str:
    """The signal of a negative exit status (``SIGKILL``)."""
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def died(returncode: int | None, timeout_min: float | None) -> str:
    """What ended a job's process before it reported."""
    if returncode is None:
        return f"ran past hydra.launcher.timeout_min={timeout_min:g} and was killed"
    if returncode < 0:
        return f"died: {signal_name(returncode)}"
    return f"exited with status {returncode} before reporting a result"


def run_in_process(payload: dict, timeout_min: float | None) -> tuple[JobReturn | None, int | None]:
    """Run one Hydra job (``moebench.job_process``) and wait: (its JobReturn, or None when the
    process ended without one; the exit status, None when it was killed past the timeout). The
    job goes to the process on its stdin and its JobReturn comes back on a pipe: nothing is left
    on disk, whatever kills either process."""
    import cloudpickle

    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "moebench.job_process", str(write_fd), str(os.getpid())],
                            stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env)
    os.close(write_fd)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 1 << 20), b"")), daemon=True)
    reader.start()
    try:
        try:
            proc.stdin.write(cloudpickle.dumps(payload))
            proc.stdin.close()
        except BrokenPipeError:  # the process died before it read its job: its exit status says how
            pass
        rc: int | None = proc.wait(timeout=None if timeout_min is None else timeout_min * 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    except BaseException:  # Ctrl-C, or the sweep stopped otherwise: the job stops with it
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(timeout=60)
        os.close(read_fd)
    try:
        return cloudpickle.loads(b"".join(chunks)), rc
    except Exception:  # noqa: BLE001 -- nothing, or a result cut short by the process's death
        return None, rc


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    """``hydra/launcher=process``: every job in turn, each in a process of its own."""
    if launcher.timeout_min is not None and not launcher.timeout_min > 0:
        refuse(f"hydra.launcher.timeout_min={launcher.timeout_min:g} is not accepted; minutes > 0 (null: no limit)")
    sweep_dir, nums, configs, skips, labels = start_sweep(launcher, job_overrides, initial_job_idx)
    log.info("Launching %d job%s into %s, one after another, each in a process of its own", len(configs),
             "s" * (len(configs) != 1), sweep_dir)
    progress, failures, returns = Progress(len(configs)), [], []
    for i, (cfg, overrides, num, label, skip) in enumerate(zip(configs, job_overrides, nums, labels, skips)):
        name = f"job {num} ({label})"
        if skip:
            log.info("sweep %d/%d: %s %s", i + 1, len(configs), name, skip)
            progress.finished(skipped=True)
            returns.append(job_return(cfg, overrides, JobStatus.COMPLETED))
            continue
        status = progress.status()
        log.info("sweep %d/%d: %s%s", i + 1, len(configs), name, f" -- {status}" if status else "")
        payload = {"hydra_context": launcher.hydra_context, "task_function": launcher.task_function,
                   "config": cfg, "singleton_state": Singleton.get_state()}
        ret, rc = run_in_process(payload, launcher.timeout_min)
        if ret is None:
            ret = job_return(cfg, overrides, JobStatus.FAILED, JobError(f"{name} {died(rc, launcher.timeout_min)} "
                                                                        f"(its folder: {output_dir(cfg)})"))
        elif rc:  # e.g. a crash in CUDA's teardown at exit: the job itself is done
            log.warning("%s reported its result, then its process %s", name,
                        f"died of {signal_name(rc)}" if rc < 0 else f"exited with status {rc}")
        if ret.status == JobStatus.FAILED:
            if not isinstance(ret._return_value, JobError):
                ret.return_value = JobError(f"{name} failed: {failure_line(ret)}")
            failures.append(str(ret._return_value))
            log.error("%s", ret._return_value)
        progress.finished()
        returns.append(ret)
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    summary(progress, failures)
    return returns
