"""The body of ``run.py``'s ``@hydra.main``: one job through the job loop (``moebench.runner``),
its errors as one line and an exit status."""

from __future__ import annotations

import sys

from omegaconf import DictConfig

from moebench.errors import ConfigError
from moebench.runner import JobFailed, run_job

__all__ = ["JobFailed", "hydra_main", "run_job"]


def hydra_main(cfg: DictConfig) -> None:
    """A bad config: one line, exit 2, nothing written. Every row failed: the table is written,
    one line, exit 1. In a sweep (``-m``) both mark the job failed and the others run on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_job(cfg, hc.runtime.output_dir, sweep_dir=hc.sweep.dir if multirun else "",
                job_num=hc.job.num if multirun else 0, overrides=" ".join(hc.overrides.task))
    except ConfigError as e:
        print(f"moebench: error: {e}", file=sys.stderr)
        if multirun:
            raise JobFailed(str(e)) from None
        sys.exit(2)
    except JobFailed as e:
        print(f"moebench: {e}", file=sys.stderr)
        if multirun:
            raise
        sys.exit(1)
