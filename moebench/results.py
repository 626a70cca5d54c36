"""Result tables: one ``results.parquet`` per job, an explicit schema, and a loader for a
run, a sweep or many sweeps.

Every job's table reads with ``moebench.results.load``, ``pandas.read_parquet`` on a file
list, and DuckDB ``read_parquet('runs/**/*.parquet', union_by_name=true)``.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode

FILENAME = "results.parquet"
STATUSES = ("ok", "unsupported", "mismatch", "error")

_S, _I, _F, _B = pa.string(), pa.int64(), pa.float64(), pa.bool_()

#: Fixed columns, in order. Seed names kept: bw_GiBps_strict, bytes_per_token_strict,
#: load_cv, avg_drop_rate. Flattened config leaves are appended as ``cfg.<path>``.
FIELDS = [
    # what was measured
    ("bench", _S), ("stage", _S), ("impl", _S), ("stage_impl", _S),
    ("impl_route", _S), ("impl_metadata", _S), ("impl_pack", _S), ("impl_combine", _S),
    ("shape_name", _S), ("tokens", _I), ("hidden", _I), ("experts", _I), ("topk", _I), ("dtype", _S),
    ("seed", _I), ("device", _S),
    ("router", _S), ("logits", _S), ("capacity", _S), ("capacity_factor", _F), ("capacity_per_expert", _I),
    ("drop_policy", _S), ("pad_to_capacity", _B), ("renormalize_after_drop", _B), ("weighted", _B),
    ("timing_mode", _S), ("warmup", _I), ("repeats", _I), ("direction", _S),
    ("capacity_align", _I), ("quant", _S),
    # outcome
    ("status", _S), ("message", _S),
    ("time_us_median", _F), ("time_us_p10", _F), ("time_us_p90", _F), ("time_us_mean", _F), ("time_us_std", _F),
    ("time_us_samples", pa.list_(_F)), ("first_call_ms", _F), ("kernel_us", _F), ("rotations", _I),
    ("rotated_bytes", _I),
    ("bytes_strict", _I), ("bytes_per_token_strict", _F), ("bw_GBps_strict", _F), ("bw_GiBps_strict", _F),
    ("copy_GBps", _F), ("pct_of_copy", _F), ("tokens_per_s", _F),
    # routing balance
    ("load_mean", _F), ("load_max_over_mean", _F), ("load_cv", _F), ("expert_counts", pa.list_(_I)),
    ("kept_assignments", _I), ("avg_drop_rate", _F), ("token_drop_rate", _F), ("padding_waste", _F),
    ("gate_entropy", _F),
    # environment
    ("gpu_name", _S), ("gpu_sm_count", _I), ("driver", _S), ("cuda_version", _S), ("torch_version", _S),
    ("cutlass_dsl_version", _S), ("quack_version", _S), ("git_sha", _S), ("git_dirty", _B), ("host", _S),
    ("timestamp_utc", pa.timestamp("us")), ("output_dir", _S), ("sweep_dir", _S), ("job_num", _I),
    ("overrides", _S), ("config", _S),
    # --- expert parallelism (bench=ep_dispatch, moebench/ep.py): one row per rank and stage ---
    ("rank", _I), ("world_size", _I), ("backend", _S), ("rows_sent", _I), ("rows_received", _I),
    ("bytes_sent", _I), ("bytes_received", _I), ("algbw_GBps", _F), ("busbw_GBps", _F), ("pct_of_raw", _F),
    ("time_us_slowest_rank", _F), ("recv_imbalance", _F),
    # --- end expert parallelism ---
    # --- MoE layer (bench=moe_layer, moebench/moe_layer.py): expert FFN size, GEMM path, FLOP rates ---
    ("intermediate", _I), ("gemm_impl", _S), ("expert_rows", _I), ("flops", _F), ("tflops", _F),
    ("pct_of_dense", _F), ("routing_share", _F),
    # --- end MoE layer ---
    # --- resumable sweeps (moebench.runner): the hash of the job's resolved config ---
    ("config_hash", _S),
    # --- end resumable sweeps ---
]
COLUMNS = [name for name, _ in FIELDS]


def _leaf_type(v) -> pa.DataType:
    if isinstance(v, bool):
        return _B
    if isinstance(v, int):
        return _I
    if isinstance(v, float):
        return _F
    return _S


def flatten_config(cfg: dict, prefix: str = "cfg.") -> dict:
    """Every leaf of the composed config as ``cfg.<dotted.path>`` (lists as strings)."""
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(flatten_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


#: the column type of a typed config leaf; every other leaf (a string, an untyped ``Any``
#: leaf, a list) is a string column
_NODE_TYPES = {BooleanNode: _B, IntegerNode: _I, FloatNode: _F}


def config_leaves(cfg: DictConfig, prefix: str = "cfg.") -> tuple[dict, dict]:
    """Every leaf of a composed config as ``cfg.<dotted.path>``, typed by its schema rather than
    its value, so a key has one type in every job of every bench (``cfg.capacity.cf`` is a
    double where it is null too; an untyped leaf that holds ``auto`` in one job and ``true`` in
    another is a string in both): DuckDB's ``union_by_name`` then never widens a column to
    VARCHAR. Returns (values, types)."""
    values, types = {}, {}
    for k in cfg.keys():
        node, name = cfg._get_node(k), f"{prefix}{k}"
        if isinstance(node, DictConfig) and not node._is_none():
            v, t = config_leaves(node, f"{name}.")
            values.update(v)
            types.update(t)
            continue
        value = cfg[k]
        if isinstance(value, ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        kind = _NODE_TYPES.get(type(node), _S)
        values[name] = value if value is None or kind is not _S else str(value)
        types[name] = kind
    return values, types


def schema_for(config_columns: dict, config_types: dict | None = None) -> pa.Schema:
    """The fixed schema plus typed ``cfg.*`` columns for this job's config (``config_types``:
    a column's type where given, else the type of its value)."""
    types = config_types or {}
    extra = [(k, types.get(k) or _leaf_type(v)) for k, v in config_columns.items()]
    return pa.schema(FIELDS + extra)


#: the temporary file :func:`write` renames into place; one left behind is a killed writer's
PARTIAL_PREFIX, PARTIAL_SUFFIX = ".results-", ".parquet.tmp"


def partial_files(folder: str | Path) -> list[Path]:
    """The temporary files of writers killed before their rename (never a ``results.parquet``)."""
    return sorted(Path(folder).glob(f"{PARTIAL_PREFIX}*{PARTIAL_SUFFIX}"))


def write(rows: list[dict], path: str | Path, config_columns: dict | None = None,
          config_types: dict | None = None) -> Path:
    """Write rows atomically (temp file in the same folder, then rename)."""
    config_columns = config_columns or {}
    schema = schema_for(config_columns, config_types)
    full = [{**{c: None for c in schema.names}, **config_columns, **r} for r in rows]
    for r in full:
        if r["status"] not in STATUSES:
            raise ValueError(f"row status {r['status']!r}; accepted: {', '.join(STATUSES)}")
    table = pa.Table.from_pylist(full, schema=schema)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def find(paths) -> list[Path]:
    """Result files under folders, globs or files (Hydra's logs and configs are skipped)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        p = str(p)
        if any(ch in p for ch in "*?["):
            files += [Path(f) for f in glob.glob(p, recursive=True) if f.endswith(".parquet")]
        elif Path(p).is_dir():
            files += sorted(Path(p).rglob("*.parquet"))
        elif Path(p).is_file():
            files.append(Path(p))
        else:
            raise FileNotFoundError(f"no results at {p!r}: give a job or sweep folder, a .parquet file or a glob")
    return sorted({f.resolve() for f in files if not f.name.startswith(".")})


def _unified(tables: list[pa.Table]) -> list[pa.Table]:
    """The tables with one type per column: a column typed differently in different tables (a
    ``cfg.*`` leaf that is null in one job and a number in another) becomes a string column."""
    types: dict[str, set] = {}
    for t in tables:
        for f in t.schema:
            if not pa.types.is_null(f.type):
                types.setdefault(f.name, set()).add(f.type)
    clash = {n for n, ts in types.items() if len(ts) > 1}
    if not clash:
        return tables
    out = []
    for t in tables:
        for n in clash & set(t.column_names):
            i = t.schema.get_field_index(n)
            col = t.column(n)
            as_str = pa.array([None if v is None else str(v) for v in col.to_pylist()], type=pa.string())
            t = t.set_column(i, pa.field(n, pa.string()), as_str)
        out.append(t)
    return out


def merge(paths, out: str | Path) -> Path:
    """One table of every row under ``paths`` (as :func:`find` reads them), written atomically
    with zstd compression: a sweep compacted for archiving or committing (a sweep of 30 jobs
    shrinks from ~1 MB of per-job tables to ~60 KB). :func:`load` reads it like any table."""
    files = find(paths)
    if not files:
        raise FileNotFoundError(f"no .parquet results found under {paths!r}")
    table = pa.concat_tables(_unified([pq.read_table(f) for f in files]), promote_options="default")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results-", suffix=".parquet.tmp", dir=out.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=19)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(paths) -> pd.DataFrame:
    """One DataFrame for a run, a sweep or many sweeps; columns missing from some tables are
    filled with nulls. ``source_file`` names the table each row came from."""
    files = find(paths)
    if not files:
        raise FileNotFoundError(f"no .parquet results found under {paths!r}")
    frames = []
    for f in files:
        df = pq.read_table(f).to_pandas()
        df["source_file"] = str(f)
        frames.append(df)
    return pd.concat(frames, ignore_index=True, sort=False)


SUMMARY_COLUMNS = ("bench", "stage", "stage_impl", "dtype", "tokens", "hidden", "experts", "topk", "status",
                   "time_us_median", "bw_GBps_strict", "pct_of_copy", "avg_drop_rate", "message")
#: how the summary shows a column: its heading and its format
SUMMARY_FORMATS = {
    "time_us_median": ("us", "{:.1f}"), "time_us_slowest_rank": ("us_slowest", "{:.1f}"),
    "bw_GBps_strict": ("GB/s", "{:.0f}"), "pct_of_copy": ("%copy", "{:.1f}"), "avg_drop_rate": ("drop", "{:.3f}"),
    "tflops": ("TFLOP/s", "{:.1f}"), "pct_of_dense": ("%dense", "{:.1f}"), "routing_share": ("routing", "{:.3f}"),
    "algbw_GBps": ("algbw", "{:.2f}"), "busbw_GBps": ("busbw", "{:.2f}"), "pct_of_raw": ("%raw", "{:.1f}"),
    "recv_imbalance": ("imbal", "{:.3f}"), "rank": ("rank", "{:.0f}"),
}
#: byte columns, shown in MB
SUMMARY_MB = {"bytes_sent": "MB_sent", "bytes_received": "MB_recv"}


def summary(df: pd.DataFrame, columns=None, width: int = 60) -> str:
    """A compact terminal table of a job's (or sweep's) rows: ``columns`` (default
    SUMMARY_COLUMNS) that the table has, numbers formatted, messages cut to ``width``."""
    cols = [c for c in (columns or SUMMARY_COLUMNS) if c in df.columns]
    view = df[cols].copy()
    for c in ("message", "stage_impl"):
        if c in view:
            view[c] = view[c].fillna("").astype(str).str.slice(0, width)
    for c, (_, fmt) in SUMMARY_FORMATS.items():
        if c in view:
            view[c] = view[c].map(lambda v, f=fmt: "" if pd.isna(v) else f.format(v))
    for c in SUMMARY_MB:
        if c in view:
            view[c] = view[c].map(lambda v: "" if pd.isna(v) else f"{v / 1e6:.2f}")
    names = {c: h for c, (h, _) in SUMMARY_FORMATS.items()} | SUMMARY_MB
    return view.rename(columns=names).to_string(index=False)


def main(argv=None) -> int:
    """``python -m moebench.results merge PATH... --out FILE``: :func:`merge` from the command line."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m moebench.results")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="one zstd table of every row under PATH (job or sweep folders, files, globs)")
    m.add_argument("paths", nargs="+", metavar="PATH")
    m.add_argument("--out", required=True, metavar="FILE")
    args = ap.parse_args(argv)
    try:
        path = merge(args.paths, args.out)
    except FileNotFoundError as e:
        print(f"moebench.results: error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {pq.read_metadata(path).num_rows} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
