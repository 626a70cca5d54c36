# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # moebench: reading a sweep
#
# Loads one or more result tables (`results.parquet`, one per job) with
# `moebench.results.load`, ranks the implementations per case (the leaderboard) and draws one
# figure per question: bandwidth-bound stages against a copy, latency-bound stages against E,
# k or T, what a capacity factor costs, the MoE layer against a dense GEMM, and the expert load
# per routing distribution; then every row that is not `ok`.
#
# **Source of truth:** `notebooks/analysis.py` (jupytext percent format). After editing it,
# regenerate the notebook with `jupytext --sync notebooks/analysis.py` (the `.ipynb` is kept
# without outputs). The leaderboard and the figures come from `moebench/report/`, which also
# writes them as PNG plus `report.md` from the command line: `python -m moebench.report runs/sample`.
#
# **Which data:** the parameter cell below; by default `runs/sample` (the committed GPU
# sample) relative to the repository root, or the path(s) in `$MOEBENCH_RESULTS` (several
# joined with `os.pathsep`). Relative paths are taken from the repository root.

# %%
# Setup: find the repository root (from $MOEBENCH_ROOT, the notebook's location, the results
# path, or the working directory) and put it on sys.path so `moebench` imports without an install.
import os
import sys
from pathlib import Path


def _find_root():
    starts = []
    if os.environ.get("MOEBENCH_ROOT"):
        starts.append(Path(os.environ["MOEBENCH_ROOT"]))
    for name in ("__file__", "__vsc_ipynb_file__"):  # a script run; VS Code's notebook path
        if name in globals():
            starts.append(Path(globals()[name]).resolve().parent)
    if os.environ.get("JPY_SESSION_NAME"):  # Jupyter server: the notebook's path
        starts.append(Path(os.environ["JPY_SESSION_NAME"]).resolve().parent)
    starts += [Path(p) for p in os.environ.get("MOEBENCH_RESULTS", "").split(os.pathsep) if p]
    starts.append(Path.cwd())  # Jupyter starts kernels in the notebook's folder
    for start in starts:
        start = start.expanduser().resolve()
        for d in (start, *start.parents):
            if (d / "moebench" / "results.py").is_file() and (d / "conf").is_dir():
                return d
    return None


ROOT = _find_root()
if ROOT is not None and str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
print(f"repo root: {ROOT}")

import pandas as pd  # noqa: E402

from moebench import report, results  # noqa: E402

try:
    from IPython.display import display
except ImportError:  # run as a plain script without IPython
    display = print

pd.set_option("display.width", 200)
pd.set_option("display.max_columns", 40)

# %% tags=["parameters"]
# Sweep folder(s), job folder(s), results.parquet file(s) or globs: a string or a list.
RESULTS = os.environ.get("MOEBENCH_RESULTS", "runs/sample")
# Index label (in `df`) of the row whose per-expert load is drawn, or a list of them;
# None: the most imbalanced row of each routing distribution.
EXPERT_ROW = None

# %%
# Load
def _resolve(p):
    p = Path(os.path.expanduser(str(p)))
    if p.is_absolute():
        return p
    bases = [b for b in (ROOT, Path.cwd()) if b is not None]
    for base in bases:
        if any(ch in str(p) for ch in "*?[") or (base / p).exists():
            return base / p
    return bases[0] / p


paths = RESULTS.split(os.pathsep) if isinstance(RESULTS, str) else list(RESULTS)
paths = [str(_resolve(p)) for p in paths if str(p)]
try:
    df = results.load(paths)
except FileNotFoundError as e:
    print(f"no results: {e}")
    df = pd.DataFrame(columns=results.COLUMNS)
print(f"{len(df)} rows from {df['source_file'].nunique() if 'source_file' in df else 0} tables in {paths}")
for label, col in (("GPU", "gpu_name"), ("device", "device"), ("torch", "torch_version"), ("git", "git_sha")):
    values = sorted({str(v) for v in df[col].dropna().unique()} - {""}) if col in df else []
    if values:
        print(f"{label}: {', '.join(values)}")
if len(df):
    display(df.pivot_table(index="bench", columns="status", values="stage", aggfunc="count", fill_value=0))

# %% [markdown]
# ## Leaderboard
#
# Per card and timing mode (never ranked together), one row per case (stage, shape, dtype,
# direction, routing variant): the fastest implementation (each by its fastest ok row of the
# case), its median time, its % of the limit (a device-to-device copy for bandwidth-bound
# stages, a dense GEMM of the same FLOPs for the layer's GEMMs; none for latency-bound stages
# and chains), and every other implementation's time over the winner's. `board` is the same
# table as a DataFrame (`ratios`: a dict per case).

# %%
board = report.leaderboard(df)
print(report.leaderboard_text(board))
if report.cpu_rows_left_out(df):
    print(f"\n{report.cpu_rows_left_out(df)} ok CPU rows are not ranked: the data has GPU rows")

# %% [markdown]
# ## How close to a copy is each implementation of a bandwidth-bound stage?
#
# Strict bytes (the least a stage must move) over time, as % of a device-to-device copy
# measured in the same job; 100 % (dashed) is the copy limit. One row of axes per card and
# timing mode, one column per stage (pack, combine, ...).

# %%
report.show(report.fig_bandwidth(df), report.WHAT["bandwidth"])

# %% [markdown]
# ## How do the latency-bound stages scale with E, k and T?
#
# Route (top-k), select, metadata: median time on a log axis, against whichever of E, k, T
# varies most; line style: the other dimensions.

# %%
report.show(report.fig_latency(df), report.WHAT["latency"])

# %% [markdown]
# ## What does a capacity factor cost?
#
# `avg_drop_rate` (dropped (token, expert) assignments) and `padding_waste` (empty rows of the
# packed buffer) against the capacity factor, one line per routing distribution (`logits`),
# one column per card (no timing mode changes a routing).

# %%
report.show(report.fig_capacity(df), report.WHAT["capacity"])

# %% [markdown]
# ## Where does the MoE layer spend its time?
#
# Per GEMM path (its fastest job): the stages stacked, the measured total, a dense GEMM of the
# same FLOPs (dashed), and the layer's and the expert FFN's TFLOP/s.

# %%
report.show(report.fig_moe_layer(df), report.WHAT["moe_layer"])

# %% [markdown]
# ## How unbalanced is each routing distribution?
#
# `expert_counts` (routed assignments per expert, before any capacity), experts sorted by load,
# as load / mean; or, with `EXPERT_ROW` set, that row's counts with the mean and the capacity.

# %%
report.show(report.fig_expert_load(df, EXPERT_ROW), report.WHAT["expert_load"])

# %% [markdown]
# ## Rows that are not ok
#
# `unsupported` (an implementation cannot handle the case), `mismatch` (differs from the
# reference; not timed) and `error` rows, with their message — nothing hides.

# %%
fails = report.failures(df)
if fails.empty:
    print("no unsupported / mismatch / error rows")
else:
    with pd.option_context("display.max_colwidth", None):
        display(fails.drop(columns=["output_dir"], errors="ignore"))

# %% [markdown]
# ## The ok rows, per bench

# %%
benches = sorted(df["bench"].dropna().unique()) if len(df) else []
for bench in benches:
    t = report.ok_table(df, bench)
    if len(t):
        print(f"bench = {bench}")
        display(t)
if not benches:
    print("no rows for the per-bench tables")
