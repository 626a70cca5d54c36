"""Selections and tables of result rows: ok rows, failures, labels, the tables of the report."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

#: Order of stages in tables and figures (unknown stages follow, alphabetically).
STAGE_ORDER = ["gate", "route", "select", "metadata", "route_metadata", "pack", "gemm1", "activation", "gemm2",
               "experts", "expert_ffn", "ffn", "combine", "total", "dense_gemm"]
#: rows that aggregate or stand beside a chain's stages: never stacked in the stage breakdown
#: (moe_layer: experts = gemm1 + activation + gemm2, dense_gemm = the same job's ceiling)
NOT_STACKED = ("total", "experts", "dense_gemm", "raw_a2a")
PER_STAGE_IMPLS = ["route", "metadata", "pack", "combine"]
FAIL_STATUSES = ("unsupported", "mismatch", "error")

# -- selections -------------------------------------------------------------------------

def _has(df: pd.DataFrame | None, *cols: str) -> bool:
    return df is not None and len(df) > 0 and all(c in df.columns for c in cols)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows with ``status == "ok"`` (an empty frame when there are none or no status column)."""
    if not _has(df, "status"):
        return df.iloc[0:0] if df is not None else pd.DataFrame()
    return df[df["status"] == "ok"]


def failures(df: pd.DataFrame) -> pd.DataFrame:
    """The ``unsupported`` / ``mismatch`` / ``error`` rows with what they were and why."""
    cols = ["status", "bench", "stage", "stage_impl", "shape_name", "tokens", "hidden", "experts", "topk",
            "dtype", "router", "logits", "capacity", "device", "message", "output_dir"]
    if not _has(df, "status"):
        return pd.DataFrame(columns=["status", "message"])
    bad = df[df["status"] != "ok"]  # unsupported, mismatch, error (and anything unexpected)
    view = bad[[c for c in cols if c in bad.columns]]
    keys = [c for c in ("status", "bench", "shape_name", "stage") if c in view.columns]
    return view.sort_values(keys, kind="stable").reset_index(drop=True)


def _stage_key(stage) -> tuple:
    s = str(stage)
    return (STAGE_ORDER.index(s), "") if s in STAGE_ORDER else (len(STAGE_ORDER), s)


def _short_impl(stage_impl) -> str:
    """``route=torch,pack=torch,...`` (the ``total`` rows) shortened to ``torch`` when every
    stage used the same implementation."""
    s = str(stage_impl)
    if "=" not in s:
        return s
    vals = {part.split("=", 1)[1] for part in s.split(",") if "=" in part}
    return vals.pop() if len(vals) == 1 else s


def _impl_label(row) -> str:
    """The job's ``impl`` plus the per-stage overrides that differ from it."""
    base = row.get("impl")
    if base is None or (isinstance(base, float) and math.isnan(base)):
        return _short_impl(row.get("stage_impl", "?"))
    diffs = []
    for s in PER_STAGE_IMPLS:
        v = row.get(f"impl_{s}")
        if isinstance(v, str) and v and v != base:
            diffs.append(f"{s}={v}")
    return f"{base} ({','.join(diffs)})" if diffs else str(base)


def _shape_label(row) -> str:
    name = row.get("shape_name")
    dims = " ".join(f"{p}{int(row[c])}" for p, c in (("T", "tokens"), ("H", "hidden"), ("E", "experts"),
                                                       ("k", "topk")) if c in row and pd.notna(row[c]))
    return f"{name} {dims}".strip() if isinstance(name, str) else dims


def _fmt_num(v) -> str:
    if v is None or (np.isscalar(v) and pd.isna(v)) or v is pd.NA:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        av = abs(float(v))
        if av == 0:
            return "0"
        if av >= 1000:
            return f"{float(v):.0f}"
        return f"{float(v):.4g}"
    return str(v)



# -- tables -----------------------------------------------------------------------------

OK_COLUMNS = ["stage", "stage_impl", "shape_name", "tokens", "hidden", "experts", "topk", "dtype", "device",
              "router", "logits", "capacity", "time_us_median", "time_us_p10", "time_us_p90", "bw_GBps_strict",
              "pct_of_copy", "avg_drop_rate", "token_drop_rate", "load_max_over_mean"]


METRIC_COLUMNS = {"time_us_median", "time_us_p10", "time_us_p90", "bw_GBps_strict", "pct_of_copy",
                  "avg_drop_rate", "token_drop_rate", "load_max_over_mean"}


def ok_table(df: pd.DataFrame, bench: str) -> pd.DataFrame:
    """The ok rows of one bench with the columns worth reading (all-empty ones dropped)."""
    d = ok_rows(df)
    if not _has(d, "bench"):
        return pd.DataFrame()
    d = d[d["bench"] == bench]
    view = d[[c for c in OK_COLUMNS if c in d.columns]].dropna(axis=1, how="all")
    if "stage_impl" in view.columns:
        view = view.assign(stage_impl=view["stage_impl"].map(_short_impl))
    keys = [c for c in ("shape_name", "tokens", "hidden", "experts", "topk", "dtype", "logits", "capacity")
            if c in view.columns]
    view = view.assign(_job=d.apply(_impl_label, axis=1) if len(d) else "",
                       _o=view["stage"].map(_stage_key) if "stage" in view.columns else 0)
    view = view.sort_values([*keys, "_job", "_o"], kind="stable").drop(columns=["_job", "_o"])
    return view.reset_index(drop=True)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub Markdown table (no tabulate needed)."""
    def cell(v) -> str:
        return _fmt_num(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join([head, sep, *body])


def _uniq(df: pd.DataFrame, col: str) -> str:
    if col not in df.columns:
        return ""
    vals = sorted({str(v) for v in df[col].dropna().unique()} - {""})
    return ", ".join(vals)


