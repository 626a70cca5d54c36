"""The one job loop: resolve -> bench -> check-then-time every case -> rows -> one writer -> one
summary. Plain functions, callable from tests with ``moebench.config.compose`` and a temporary
output folder; ``moebench.app`` is the thin ``@hydra.main`` around :func:`run_job`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from moebench import results
from moebench.benches import BENCHES, Bench
from moebench.config import resolve
from moebench.env import environment
from moebench.errors import ConfigError
from moebench.job import JobSpec
from moebench.timing import Timer, copy_bandwidth_GBps

log = logging.getLogger("moebench")

#: statuses of a failed measurement: a job whose rows are all failed exits non-zero
FAILED = ("error", "mismatch")


#: top-level config keys that do not change what a job measures: left out of its config hash
UNHASHED = ("resume",)


class JobFailed(RuntimeError):
    """Every row of the job failed (its table is written all the same); the message says why."""


def plan(cfg: DictConfig) -> tuple[JobSpec, Bench]:
    """The job and its bench, every option checked; nothing allocated, nothing written."""
    job = resolve(cfg)
    return job, BENCHES[job.bench](job)


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
        "direction": getattr(job.bench_config, "direction", "fwd"), "capacity_align": c.align,
        "quant": getattr(job.bench_config, "quant", "none"),
    }


def config_container(cfg: DictConfig) -> dict:
    """The job's composed config, interpolations resolved, without Hydra's own node."""
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    return container


def config_hash(container: dict, job: JobSpec) -> str:
    """What identifies a job's measurement for ``resume``: its resolved config (without
    :data:`UNHASHED`) and the device ``device=auto`` resolved to. Code versions and cards are
    not in it (the table records both)."""
    keyed = {k: v for k, v in container.items() if k not in UNHASHED}
    blob = json.dumps({"config": keyed, "device": job.device.type}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resume_skip(output_dir: str | Path, digest: str) -> str | None:
    """``resume=true``: why the job is skipped (its table holds this config and no failed row),
    or None to run it (no table, or failed rows). A table that holds another config is a
    ConfigError: it is never overwritten."""
    path = Path(output_dir) / results.FILENAME
    if not path.is_file():
        return None
    how = "resume the same sweep command, or give a new hydra.sweep.dir"
    if "config_hash" not in pq.read_schema(path).names:
        raise ConfigError(f"resume=true: {path} has no config_hash (written before resume existed) and is not "
                          f"overwritten; {how}")
    table = pq.read_table(path, columns=["config_hash", "status"]).to_pydict()
    hashes = set(table["config_hash"])
    if not hashes:
        return None
    if hashes != {digest}:
        raise ConfigError(f"resume=true: {path} holds another config (config_hash {', '.join(sorted(map(str, hashes)))}"
                          f", this job {digest}) and is not overwritten; {how}")
    failed = sum(s in FAILED for s in table["status"])
    if failed:
        log.info("resume: %s has %d failed row(s): running the job again", path, failed)
        return None
    return f"skipped: {path} holds this config (config_hash {digest}) and no failed row (resume=true)"


def remove_partials(output_dir: str | Path) -> None:
    """Remove what a writer killed before its rename left in a job folder (``results.write``
    writes a temporary file, then renames it: a ``results.parquet`` is never partial)."""
    for partial in results.partial_files(output_dir):
        partial.unlink()
        log.info("removed %s: the unfinished table of a killed job", partial)


def progress(i: int, n: int, row: dict, seconds: float) -> None:
    t = row.get("time_us_median")
    what = f"{t:.1f} us" if t is not None else row.get("message", "")
    log.info("[%d/%d] %s %s: %s %s (%.1fs)", i, n, row["stage"], row["stage_impl"], row["status"], what, seconds)


def run_job(cfg: DictConfig, output_dir: str | Path, *, sweep_dir: str = "", job_num: int = 0,
            overrides: str = "") -> pd.DataFrame:
    """Resolve, measure, write ``results.parquet`` atomically into ``output_dir``, print the
    table, and return the rows. A bad config raises ConfigError before anything is written; a
    job whose rows all failed writes its table, then raises JobFailed. With ``resume=true`` a job
    whose table holds its config and no failed row is skipped (that table is returned)."""
    job, bench = plan(cfg)
    container = config_container(cfg)
    digest = config_hash(container, job)
    remove_partials(output_dir)
    if cfg.get("resume"):
        skip = resume_skip(output_dir, digest)
        if skip:
            log.info(skip)
            return results.load(Path(output_dir) / results.FILENAME)
    log.info(bench.describe())
    torch.manual_seed(job.seed)
    timer = Timer(job.timing, job.device)
    copy = copy_bandwidth_GBps(job.device) if bench.uses_copy else None
    bench.setup(timer)
    rows = bench.run(timer, progress)
    common = {
        **job_columns(job), **bench.columns(), **environment(job.device), "timing_mode": timer.mode,
        "copy_GBps": copy, "output_dir": str(Path(output_dir).resolve()), "sweep_dir": sweep_dir,
        "job_num": job_num, "overrides": overrides, "config": json.dumps(container, sort_keys=True, default=str),
        "config_hash": digest,
    }
    for r in rows:
        if copy and r.get("bw_GBps_strict") is not None:
            r["pct_of_copy"] = 100.0 * r["bw_GBps_strict"] / copy
    leaves, types = results.config_leaves(cfg)
    leaves = {k: v for k, v in leaves.items() if not k.startswith("cfg.hydra.")}
    path = results.write([{**common, **r} for r in rows], Path(output_dir) / results.FILENAME, leaves, types)
    df = results.load(path)
    where = common["gpu_name"] or "cpu"
    ceiling = f"copy {copy:.0f} GB/s, " if copy else ""
    print(f"\n{bench.headline()} on {where} ({ceiling}timing {timer.mode}) -> {path}")
    print(results.summary(df, bench.summary_columns or None))
    if rows and all(r["status"] in FAILED for r in rows):
        raise JobFailed(f"every row of bench={job.bench} failed ({', '.join(sorted({r['status'] for r in rows}))}); "
                        f"the table is {path}")
    return df
