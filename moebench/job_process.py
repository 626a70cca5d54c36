"""One job of a ``hydra/launcher=process`` sweep in a process of its own:
``python -m moebench.job_process RESULT_FD PARENT_PID`` (started by ``moebench.sweep``).

The job comes cloudpickled on stdin (Hydra's context, the task function, the job's config and
Hydra's singletons); it runs through Hydra's ``run_job`` exactly as in Hydra's own launcher, and
its JobReturn goes back cloudpickled on the pipe RESULT_FD when it is done -- a process that dies
sends none (or a cut-short one), and the sweep reports it with its exit signal. The process dies
with the sweep (Linux: ``PR_SET_PDEATHSIG``).
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
    result_fd, parent = map(int, argv)
    die_with_parent(parent)
    import cloudpickle
    from hydra.core.singleton import Singleton
    from hydra.core.utils import JobStatus, run_job, setup_globals

    from moebench.runner import JobFailed

    job = cloudpickle.load(sys.stdin.buffer)
    devnull = os.open(os.devnull, os.O_RDONLY)  # the job's stdin: not the pipe its job came on
    os.dup2(devnull, 0)
    os.close(devnull)
    Singleton.set_state(job["singleton_state"])
    setup_globals()
    ret = run_job(hydra_context=job["hydra_context"], task_function=job["task_function"], config=job["config"],
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    if ret.status == JobStatus.FAILED and not isinstance(ret._return_value, JobFailed):
        e = ret._return_value
        traceback.print_exception(type(e), e, e.__traceback__)  # the sweep's process gets its one line only
    with os.fdopen(result_fd, "wb") as f:
        f.write(cloudpickle.dumps(transportable(ret)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
