"""What ``run.py`` does with a composed config: plain functions, callable from tests with
``hydra.compose`` and a temporary output folder."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from moebench import results
from moebench.config import ConfigError, JobSpec, resolve
from moebench.env import environment
from moebench.harness import Harness, make_inputs
from moebench.metrics import routing_metrics
from moebench.timing import Timer, copy_bandwidth_GBps

log = logging.getLogger("moebench")


def job_columns(job: JobSpec) -> dict:
    c = job.capacity
    return {
        "bench": job.bench, "impl": job.impl,
        **{f"impl_{s}": job.stage_impls[s] for s in job.stage_impls},
        "shape_name": job.shape, "tokens": job.tokens, "hidden": job.hidden, "experts": job.experts,
        "topk": job.topk, "dtype": job.dtype_name, "seed": job.seed, "device": job.device.type,
        "router": job.router.name, "logits": job.logits["kind"], "capacity": job.capacity_name,
        "capacity_factor": float("nan") if c.factor is None else c.factor, "drop_policy": c.drop_policy,
        "pad_to_capacity": c.pad_to_capacity, "renormalize_after_drop": c.renormalize_after_drop,
        "weighted": job.weighted, "warmup": job.timing.warmup, "repeats": job.timing.repeats,
    }


def write_rows(stage_rows, common: dict, copy_GBps: float, output_dir: str | Path, container: dict):
    """One job's table: each stage row with the job's common columns and ``pct_of_copy`` (its
    strict bandwidth over the same job's copy), written atomically; returns (path, rows read back)."""
    rows = []
    for r in stage_rows:
        row = {**common, **r}
        if row.get("bw_GBps_strict") is not None:
            row["pct_of_copy"] = 100.0 * row["bw_GBps_strict"] / copy_GBps
        rows.append(row)
    path = results.write(rows, Path(output_dir) / results.FILENAME, results.flatten_config(container))
    return path, results.load(path)


def _progress(i: int, n: int, row: dict, seconds: float) -> None:
    t = row.get("time_us_median")
    what = f"{t:.1f} us" if t is not None else row.get("message", "")
    log.info("[%d/%d] %s %s: %s %s (%.1fs)", i, n, row["stage"], row["stage_impl"], row["status"], what, seconds)


def run_job(cfg: DictConfig, output_dir: str | Path, *, sweep_dir: str = "", job_num: int = 0,
            overrides: str = "") -> pd.DataFrame:
    """Resolve, measure, write ``results.parquet`` atomically into ``output_dir``, print the
    table, and return the rows. A bad config raises ConfigError before anything is written."""
    # --- bench=ep_dispatch: ranks in a process group, one table (moebench/ep.py) ---
    if cfg.bench.get("name") == "ep_dispatch":
        from moebench import ep
        return ep.run_job(cfg, output_dir, sweep_dir=sweep_dir, job_num=job_num, overrides=overrides)
    # --- end ep_dispatch ---
    # --- bench=moe_layer: weights, GEMM stages and the layer chain (moebench/moe_layer.py) ---
    if cfg.bench.get("name") == "moe_layer":
        from moebench import moe_layer
        return moe_layer.run_job(cfg, output_dir, sweep_dir=sweep_dir, job_num=job_num, overrides=overrides)
    # --- end moe_layer ---
    job = resolve(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    log.info("bench=%s impl=%s shape=%s T=%d H=%d E=%d k=%d dtype=%s device=%s", job.bench, job.impl, job.shape,
             job.tokens, job.hidden, job.experts, job.topk, job.dtype_name, job.device)
    torch.manual_seed(job.seed)
    timer = Timer(job.timing, job.device)
    copy = copy_bandwidth_GBps(job.device)
    inp = make_inputs(job)
    common = {
        **job_columns(job), **routing_metrics(inp.meta, inp.ids, inp.logits), **environment(job.device),
        "timing_mode": timer.mode, "copy_GBps": copy,
        "capacity_per_expert": inp.meta.capacity, "output_dir": str(Path(output_dir).resolve()),
        "sweep_dir": sweep_dir, "job_num": job_num, "overrides": overrides,
        "config": json.dumps(container, sort_keys=True, default=str),
    }
    path, df = write_rows(Harness(job, timer).run(inp, progress=_progress), common, copy, output_dir, container)
    print(f"\n{job.bench} on {common['gpu_name'] or 'cpu'} (copy {copy:.0f} GB/s, timing {timer.mode}) -> {path}")
    print(results.summary(df))
    return df


class JobFailed(RuntimeError):
    """Raised inside a multirun job so Hydra marks it failed and runs the others."""


def hydra_main(cfg: DictConfig) -> None:
    """The body of run.py's ``@hydra.main``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        run_job(cfg, hc.runtime.output_dir, sweep_dir=hc.sweep.dir if multirun else "",
                job_num=hc.job.num if multirun else 0, overrides=" ".join(hc.overrides.task))
    except (ConfigError, FileNotFoundError) as e:
        print(f"moebench: error: {e}", file=sys.stderr)
        if multirun:
            raise JobFailed(str(e)) from None
        sys.exit(2)
