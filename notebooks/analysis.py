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
# `moebench.results.load` and draws the roofline view, top-k time, drop rate vs capacity
# factor, the per-expert load, the stage breakdowns, and every row that is not `ok`.
#
# **Source of truth:** `notebooks/analysis.py` (jupytext percent format). After editing it,
# regenerate the notebook with `jupytext --sync notebooks/analysis.py` (the `.ipynb` is kept
# without outputs). The figures come from `moebench/report.py`, which also writes them as PNG
# plus `report.md` from the command line: `python -m moebench.report runs/sample`.
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
# ## Roofline view: % of copy bandwidth
#
# Strict bytes (the least a stage must move) over time, as a percentage of a device-to-device
# copy measured in the same job. 100 % (dashed) is the copy limit; one panel per shape.

# %%
report.show(report.fig_roofline(df), report.WHAT["roofline"])
table = report.roofline_table(df)
if len(table):
    display(table)

# %% [markdown]
# ## Top-k time against E and k
#
# Rows with `stage == "route"` (the `topk` bench and the first stage of `routing`).

# %%
report.show(report.fig_topk(df), report.WHAT["topk"])

# %% [markdown]
# ## Drop rate against the capacity factor
#
# `avg_drop_rate`: dropped (token, expert) assignments; `token_drop_rate`: tokens that lost
# every assignment. One line per routing distribution (`logits`).

# %%
report.show(report.fig_drop_rate(df), report.WHAT["drop_rate"])

# %% [markdown]
# ## Per-expert load
#
# `expert_counts` (routed assignments per expert, before any capacity) for `EXPERT_ROW`, with
# the mean and, when a capacity is enforced, the per-expert capacity.

# %%
report.show(report.fig_expert_load(df, EXPERT_ROW), report.WHAT["expert_load"])

# %% [markdown]
# ## Stage breakdowns
#
# Median time of each stage of the `routing` chain and of the MoE layer (`bench == "moe_layer"`),
# stacked, with the measured `total` as a mark.

# %%
report.show(report.fig_routing_stages(df), report.WHAT["routing_stages"])
report.show(report.fig_moe_layer(df), report.WHAT["moe_layer"])

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
