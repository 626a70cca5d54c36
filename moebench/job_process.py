"""One job of a ``hydra/launcher=process`` sweep in a process of its own:
``python -m moebench.job_process JOB RESULT PARENT_PID`` (started by ``moebench.sweep``).

JOB is the job cloudpickled (Hydra's context, the task function, the job's config and Hydra's
singletons); the job runs through Hydra's ``run_job`` exactly as in Hydra's own launcher, and its
JobReturn is written to RESULT atomically -- a process that dies leaves no RESULT, and the sweep
reports it with its exit signal. The process dies with the sweep (Linux: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import traceback


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the sweep's process dies (Linux; elsewhere a killed sweep
    leaves its current job running to its end)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the sweep died before prctl
        os._exit(1)


def transportable(ret):
    """The JobReturn with an exception the sweep's process can unpickle (else its one line)."""
    import cloudpickle

    try:
        cloudpickle.loads(cloudpickle.dumps(ret._return_value))
    except Exception:  # noqa: BLE001 -- any pickling failure: carry the exception's line instead
        e = ret._return_value
        ret.return_value = RuntimeError(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    return ret


def main(argv: list[str]) -> int:
    job_file, result_file, parent = argv
    die_with_parent(int(parent))
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals

    from moebench.runner import JobFailed

    with open(job_file, "rb") as f:
        job = cloudpickle.load(f)
    Singleton.set_state(job["singleton_state"])
    setup_globals()
    ret = run_job(hydra_context=job["hydra_context"], task_function=job["task_function"], config=job["config"],
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    if ret.status == JobStatus.FAILED and not isinstance(ret._return_value, JobFailed):
        e = ret._return_value
        traceback.print_exception(type(e), e, e.__traceback__)  # the sweep's process gets its one line only
    tmp = f"{result_file}.tmp"
    with open(tmp, "wb") as f:
        cloudpickle.dump(transportable(ret), f)
    os.replace(tmp, result_file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
