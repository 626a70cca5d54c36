"""Figures and a Markdown summary of result tables, shared by ``notebooks/analysis.ipynb``
and the command line::

    python -m moebench.report PATH... [--out DIR]

PATH is anything ``moebench.results.load`` reads (a job or sweep folder, a .parquet file, a
glob). The PNGs and ``report.md`` go to ``--out``, by default next to the sweep: the first
PATH if it is a folder, else its parent.

Every ``fig_*`` function takes a results DataFrame and returns a matplotlib ``Figure``, or
``None`` when the selection it draws is empty (``WHAT[name]`` says which rows it needs). The
figures are built with the object-oriented API (``matplotlib.figure.Figure``), never through
pyplot, so they neither depend on nor change the active backend; PNGs are rendered by Agg.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

#: Order of stages in tables and figures (unknown stages follow, alphabetically).
STAGE_ORDER = ["gate", "route", "metadata", "pack", "gemm1", "activation", "gemm2", "experts", "expert_ffn", "ffn",
               "combine", "total", "dense_gemm"]
#: rows that aggregate or stand beside a chain's stages: never stacked in the stage breakdown
#: (moe_layer: experts = gemm1 + activation + gemm2, dense_gemm = the same job's ceiling)
NOT_STACKED = ("total", "experts", "dense_gemm", "raw_a2a")
PER_STAGE_IMPLS = ["route", "metadata", "pack", "combine"]
FAIL_STATUSES = ("unsupported", "mismatch", "error")

#: What each figure draws, for the "no rows for ..." line when its selection is empty.
WHAT = {
    "roofline": "the roofline view (ok rows with pct_of_copy)",
    "topk": "top-k time (ok rows with stage == 'route' and a time)",
    "drop_rate": "drop rate vs capacity factor (rows with capacity_factor and avg_drop_rate)",
    "expert_load": "the per-expert load histogram (rows with expert_counts)",
    "routing_stages": "the routing stage breakdown (ok rows with bench == 'routing')",
    "moe_layer": "the MoE-layer stage breakdown (ok rows with bench == 'moe_layer')",
}


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


def _varying(df: pd.DataFrame, keys) -> list[str]:
    """The keys (present in df) that take more than one value in it."""
    return [k for k in keys if k in df.columns and df[k].astype(str).nunique() > 1]


def _join(row, keys, fmt=None) -> str:
    fmt = fmt or {}
    return " ".join(fmt.get(k, f"{k}={{}}").format(row[k]) for k in keys)


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


def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


# -- figures ----------------------------------------------------------------------------

def fig_roofline(df: pd.DataFrame):
    """% of the device-to-device copy bandwidth per implementation (bars) for every bench /
    stage, one panel per ``shape_name``, with the 100 % line. Problem sizes that vary inside a
    shape (``tokens=...`` overrides) are separate bars; repeated cases (e.g. several routing
    distributions) are summarised by their median."""
    d = ok_rows(df)
    if not _has(d, "pct_of_copy", "stage", "stage_impl"):
        return None
    d = d[d["pct_of_copy"].notna()].copy()
    if d.empty:
        return None
    for c in ("bench", "shape_name"):
        d[c] = d[c].fillna("?").astype(str) if c in d.columns else "?"
    d["_impl"] = d["stage_impl"].map(_short_impl)
    dims = [("T", "tokens"), ("H", "hidden"), ("E", "experts"), ("k", "topk")]
    shapes = sorted(d["shape_name"].unique())
    impls = sorted(d["_impl"].unique())
    colors = {impl: f"C{i % 10}" for i, impl in enumerate(impls)}
    panels = []
    for shape in shapes:
        s = d[d["shape_name"] == shape].copy()
        vary = _varying(s, [c for _, c in dims] + ["dtype"])
        fixed = " ".join(f"{p}{int(s[c].iloc[0])}" for p, c in dims if c in s.columns and c not in vary
                         and pd.notna(s[c].iloc[0]))
        def label(r, vary=vary):
            bits = [f"{p}{r[c]}" for p, c in dims if c in vary] + ([str(r["dtype"])] if "dtype" in vary else [])
            head = [str(r["stage"])] if r["bench"] == str(r["stage"]) else [str(r["stage"]), r["bench"]]
            return "\n".join([*head, *([" ".join(bits)] if bits else [])])
        s["_x"] = s.apply(label, axis=1)
        s["_xkey"] = s.apply(lambda r, vary=vary: (r["bench"], *(r[c] for c in vary), _stage_key(r["stage"])), axis=1)
        panels.append((f"{shape} {fixed}".strip(), s))
    ncat = max(s["_x"].nunique() for _, s in panels)
    fig = _new_figure(min(26.0, max(6.0, 1.2 + ncat * (0.45 + 0.22 * len(impls)))), 1.0 + 3.2 * len(panels))
    axs = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, s) in zip(axs, panels):
        g = s.groupby(["_x", "_impl"])["pct_of_copy"].median()
        xs = [x for _, x in sorted(set(zip(s["_xkey"], s["_x"])))]
        here = [i for i in impls if i in set(s["_impl"])]
        width = 0.8 / len(here)
        ymax = 100.0
        for j, impl in enumerate(here):
            pos, vals = [], []
            for i, x in enumerate(xs):
                if (x, impl) in g.index:
                    pos.append(i - 0.4 + width * (j + 0.5))
                    vals.append(float(g[(x, impl)]))
            if not vals:
                continue
            bars = ax.bar(pos, vals, width, label=impl, color=colors[impl])
            if len(xs) * len(impls) <= 40:
                ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in vals], fontsize=7)
            ymax = max(ymax, max(vals))
        ax.axhline(100.0, color="k", ls="--", lw=1, label="copy (100 %)")
        ax.set_xticks(range(len(xs)), xs, fontsize=7 if len(xs) > 12 else 8)
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_ylim(0, ymax * 1.15)
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(title, fontsize=10)
    handles = {}
    for ax in axs:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), fontsize=8, ncols=min(6, len(handles)), loc="outside lower center")
    fig.suptitle("Strict bandwidth as % of a device-to-device copy")
    return fig


def fig_topk(df: pd.DataFrame):
    """Top-k routing time (median µs, ``stage == "route"``) against the number of experts E
    (one line per implementation and k) and against k (one line per implementation and E)."""
    d = ok_rows(df)
    if not _has(d, "stage", "time_us_median", "experts", "topk"):
        return None
    d = d[(d["stage"] == "route") & d["time_us_median"].notna()].copy()
    if d.empty:
        return None
    d["_impl"] = d["stage_impl"].map(_short_impl) if "stage_impl" in d.columns else "?"
    extra = _varying(d, ["tokens", "dtype", "router", "device"])
    fmt = {"tokens": "T={}", "experts": "E={}", "topk": "k={}", "_impl": "{}"}
    fig = _new_figure(11, 4.2)
    axs = fig.subplots(1, 2)
    for ax, x, line in ((axs[0], "experts", "topk"), (axs[1], "topk", "experts")):
        keys = ["_impl", line, *extra]
        g = d.groupby([*keys, x])["time_us_median"].median().reset_index()
        for i, (key, part) in enumerate(g.groupby(keys, sort=True)):
            key = key if isinstance(key, tuple) else (key,)
            label = _join(dict(zip(keys, key)), keys, fmt)
            part = part.sort_values(x)
            ax.plot(part[x], part["time_us_median"], marker="o", label=label, color=f"C{i % 10}")
        ax.set_xlabel("experts E" if x == "experts" else "top-k k")
        ax.set_ylabel("median time (µs)")
        xs = sorted(d[x].unique())
        if x == "experts" and len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(int(v)) for v in xs])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Top-k routing time")
    return fig


def fig_drop_rate(df: pd.DataFrame):
    """Dropped assignments (``avg_drop_rate``) and fully dropped tokens (``token_drop_rate``)
    against the capacity factor, one line per routing distribution (``logits``). Drop rates
    describe the job's routing, so every row of a job (any status) carries them."""
    if not _has(df, "capacity_factor", "avg_drop_rate"):
        return None
    d = df[df["capacity_factor"].notna() & df["avg_drop_rate"].notna()].copy()
    if d.empty:
        return None
    if "logits" not in d.columns:
        d["logits"] = "?"
    keys = ["logits", *_varying(d, ["experts", "topk", "tokens", "router", "drop_policy", "cfg.logits.alpha",
                                    "shape_name"])]
    fmt = {"logits": "{}", "experts": "E={}", "topk": "k={}", "tokens": "T={}", "cfg.logits.alpha": "alpha={}"}
    metrics = [m for m in ("avg_drop_rate", "token_drop_rate") if m in d.columns]
    from matplotlib.ticker import PercentFormatter

    fig = _new_figure(5.5 * len(metrics), 4.2)
    axs = np.atleast_1d(fig.subplots(1, len(metrics)))
    titles = {"avg_drop_rate": "dropped assignments (avg_drop_rate)",
              "token_drop_rate": "tokens with every assignment dropped (token_drop_rate)"}
    for ax, m in zip(axs, metrics):
        g = d.groupby([*keys, "capacity_factor"])[m].median().reset_index()
        for i, (key, part) in enumerate(g.groupby(keys, sort=True)):
            key = key if isinstance(key, tuple) else (key,)
            part = part.sort_values("capacity_factor")
            ax.plot(part["capacity_factor"], part[m], marker="o", label=_join(dict(zip(keys, key)), keys, fmt),
                    color=f"C{i % 10}")
        ax.set_xlabel("capacity factor")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.set_ylim(bottom=0)
        ax.set_title(titles[m], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="logits", title_fontsize=7)
    fig.suptitle("Drop rate vs capacity factor")
    return fig


def _expert_rows(df: pd.DataFrame, row=None) -> pd.DataFrame:
    if not _has(df, "expert_counts"):
        return pd.DataFrame()
    has = df["expert_counts"].map(lambda v: v is not None and not (isinstance(v, float)) and len(v) > 0)
    d = df[has]
    if d.empty:
        return d
    if row is not None:
        labels = list(row) if isinstance(row, (list, tuple, np.ndarray, pd.Index)) else [row]
        return d.loc[[r for r in labels if r in d.index]]
    # one row per routing distribution: the most imbalanced case of each
    key = "logits" if "logits" in d.columns else None
    order = d.assign(_imb=d["load_max_over_mean"] if "load_max_over_mean" in d.columns else 0.0,
                     _cap=d["capacity_per_expert"].notna() if "capacity_per_expert" in d.columns else False)
    order = order.sort_values(["_imb", "_cap"], ascending=False, kind="stable").drop(columns=["_imb", "_cap"])
    if key is None:
        return order.iloc[:1]
    return order.drop_duplicates(subset=[key]).sort_values(key).iloc[:6]


def fig_expert_load(df: pd.DataFrame, row=None):
    """Per-expert routed load (``expert_counts``, before any capacity) for one row — ``row`` is
    an index label of ``df`` or a list of them; by default the most imbalanced row of each
    routing distribution. The mean load and, with a capacity, the per-expert capacity are lines."""
    d = _expert_rows(df, row)
    if d.empty:
        return None
    n = len(d)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = _new_figure(max(5.0, 4.6 * ncols), 3.6 * nrows)
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, (idx, r) in zip(axs, d.iterrows()):
        counts = np.asarray(list(r["expert_counts"]), dtype=float)
        ax.bar(np.arange(len(counts)), counts, width=1.0 if len(counts) > 64 else 0.8, color="C0")
        mean = counts.mean()
        ax.axhline(mean, color="k", ls="--", lw=1, label=f"mean {mean:.0f}")
        cap = r.get("capacity_per_expert")
        if cap is not None and pd.notna(cap):
            ax.axhline(float(cap), color="C3", lw=1.2, label=f"capacity {float(cap):.0f}")
        ax.set_xlabel("expert")
        ax.set_ylabel("assignments")
        ax.set_xlim(-0.6, len(counts) - 0.4)
        bits = [f"row {idx}", r.get("bench"), r.get("logits"), r.get("router"), r.get("capacity")]
        bits2 = [_shape_label(r)]
        if "load_max_over_mean" in r and pd.notna(r["load_max_over_mean"]):
            bits2.append(f"max/mean {r['load_max_over_mean']:.2f}")
        ax.set_title(" · ".join(b for b in bits if isinstance(b, str) and b) + "\n"
                     + " · ".join(bits2), fontsize=8)
        ax.legend(fontsize=7)
    for ax in axs[n:]:
        ax.set_visible(False)
    fig.suptitle("Per-expert load (routed assignments)")
    return fig


def fig_stage_breakdown(df: pd.DataFrame, bench: str = "moe_layer"):
    """Stacked median time of each stage of ``bench`` (all stages but ``NOT_STACKED``) per
    implementation and shape (and distribution when several); a measured ``total`` is a
    black mark."""
    d = ok_rows(df)
    if not _has(d, "bench", "stage", "time_us_median"):
        return None
    d = d[(d["bench"] == bench) & d["time_us_median"].notna()].copy()
    if d.empty:
        return None
    d["_impl"] = d.apply(_impl_label, axis=1)
    d["_shape"] = d.apply(_shape_label, axis=1)
    extra = _varying(d, ["logits", "capacity", "dtype", "router", "timing_mode"])
    d["_bar"] = d.apply(lambda r: " · ".join([r["_impl"], r["_shape"], *(str(r[c]) for c in extra)]), axis=1)
    g = d.groupby(["_bar", "stage"])["time_us_median"].median().unstack("stage")
    stages = sorted([s for s in g.columns if s not in NOT_STACKED], key=_stage_key)
    bars = sorted(g.index)
    fig = _new_figure(10, 1.8 + 0.45 * len(bars))
    ax = fig.subplots()
    left = np.zeros(len(bars))
    for i, s in enumerate(stages):
        vals = g.loc[bars, s].fillna(0.0).to_numpy(dtype=float)
        ax.barh(range(len(bars)), vals, left=left, label=s, color=f"C{i % 10}")
        left += vals
    if "total" in g.columns:
        tot = g.loc[bars, "total"].to_numpy(dtype=float)
        ok = ~np.isnan(tot)
        if ok.any():
            ax.scatter(tot[ok], np.arange(len(bars))[ok], marker="|", s=300, color="k", zorder=3,
                       label="total (measured)")
    ax.set_yticks(range(len(bars)), bars, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("median time (µs)")
    fig.legend(*ax.get_legend_handles_labels(), fontsize=8, ncols=min(len(stages) + 1, 7), loc="outside lower center")
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{bench}: time per stage")
    return fig


def fig_routing_stages(df: pd.DataFrame):
    """The ``routing`` bench's chain (route → metadata → pack → experts → combine)."""
    return fig_stage_breakdown(df, "routing")


def fig_moe_layer(df: pd.DataFrame):
    """The ``moe_layer`` bench's stages (None until such rows exist)."""
    return fig_stage_breakdown(df, "moe_layer")


#: name -> figure function; ``python -m moebench.report`` writes ``<name>.png`` for each.
FIGURES = {
    "roofline": fig_roofline,
    "topk": fig_topk,
    "drop_rate": fig_drop_rate,
    "expert_load": fig_expert_load,
    "routing_stages": fig_routing_stages,
    "moe_layer": fig_moe_layer,
}


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig, what: str) -> None:
    """Notebook helper: display ``fig`` as a PNG, or print ``no rows for <what>`` when None."""
    if fig is None:
        print(f"no rows for {what}")
        return
    try:
        from IPython import get_ipython
        from IPython.display import Image, display
    except ImportError:
        get_ipython = None
    if get_ipython is not None and get_ipython() is not None:
        display(Image(data=png_bytes(fig)))
    else:
        print(f"[figure: {fig.texts[0].get_text() if fig.texts else what}]")


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


def roofline_table(df: pd.DataFrame) -> pd.DataFrame:
    """``pct_of_copy`` of the ok rows: (shape_name, bench, stage) × implementation, medians."""
    d = ok_rows(df)
    if not _has(d, "pct_of_copy", "stage", "stage_impl", "shape_name", "bench"):
        return pd.DataFrame()
    d = d[d["pct_of_copy"].notna()]
    if d.empty:
        return pd.DataFrame()
    d = d.assign(impl=d["stage_impl"].map(_short_impl))
    t = d.pivot_table(index=["shape_name", "bench", "stage"], columns="impl", values="pct_of_copy", aggfunc="median")
    order = sorted(t.index, key=lambda i: (i[0], i[1], _stage_key(i[2])))
    return t.loc[order].round(1)


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


def render_markdown(df: pd.DataFrame, figures: dict, sources) -> str:
    """``report.md``: provenance, status counts, the figures (or why one is missing), a table
    of ok rows per bench, and every failing row."""
    lines = ["# moebench report", ""]
    lines.append("Sources: " + ", ".join(f"`{s}`" for s in sources))
    lines.append("")
    for label, col in (("GPU", "gpu_name"), ("device", "device"), ("torch", "torch_version"),
                       ("git", "git_sha"), ("timing", "timing_mode")):
        v = _uniq(df, col)
        if v:
            lines.append(f"- {label}: {v}")
    if "git_dirty" in df.columns and df["git_dirty"].fillna(False).astype(bool).any():
        lines.append("- git_dirty: some jobs ran with uncommitted changes")
    if "status" in df.columns:
        counts = df["status"].value_counts()
        lines.append("- rows: " + ", ".join(f"{int(n)} {s}" for s, n in counts.items()) + f" ({len(df)} in all)")
    lines += ["", "## Figures", ""]
    for name, png in figures.items():
        title = WHAT[name] if name in WHAT else name
        if png is None:
            lines.append(f"- *no rows for {title}*")
        else:
            lines += [f"### {title[0].upper()}{title[1:]}", "", f"![{name}]({png})", ""]
    fails = failures(df)
    lines += ["", "## Failures (unsupported / mismatch / error)", ""]
    if fails.empty:
        lines.append("None: every row is ok.")
    else:
        fails = fails.drop(columns=[c for c in ("output_dir",) if c in fails.columns])
        keep = [c for c in fails.columns if c in ("status", "message") or fails[c].notna().any()]
        lines.append(markdown_table(fails[keep]))
    lines += ["", "## Results (ok rows)", ""]
    benches = sorted(df["bench"].dropna().unique()) if "bench" in df.columns else []
    any_ok = False
    for b in benches:
        t = ok_table(df, b)
        if t.empty:
            continue
        any_ok = True
        lines += [f"### {b}", ""]
        common = [c for c in t.columns if c not in METRIC_COLUMNS and c != "stage" and t[c].astype(str).nunique() == 1]
        if common and len(t) > 1:
            lines += ["All rows: " + ", ".join(f"{c}={_fmt_num(t[c].iloc[0])}" for c in common) + ".", ""]
            t = t.drop(columns=common)
        lines += [markdown_table(t), ""]
    if not any_ok:
        lines += ["No ok rows.", ""]
    lines.append("")
    return "\n".join(lines)


# -- the command ------------------------------------------------------------------------

def default_out(paths) -> Path:
    """The first PATH if it is a folder, else its parent (a glob: its fixed leading folders)."""
    first = str(paths[0])
    if any(ch in first for ch in "*?["):
        fixed = []
        for part in Path(first).parts:
            if any(ch in part for ch in "*?["):
                break
            fixed.append(part)
        return Path(*fixed) if fixed else Path(".")
    p = Path(first)
    return p if p.is_dir() else p.parent


def write_report(df: pd.DataFrame, out: str | Path, sources=(), dpi: int = 110) -> dict:
    """Write ``<name>.png`` for every figure with data and ``report.md`` into ``out``.
    Returns ``{"report": path, "figures": {name: path or None}}``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path | None] = {}
    for name, fn in FIGURES.items():
        fig = fn(df)
        if fig is None:
            written[name] = None
            (out / f"{name}.png").unlink(missing_ok=True)  # a stale figure from an earlier report
            continue
        path = out / f"{name}.png"
        fig.savefig(path, dpi=dpi)
        written[name] = path
    md = render_markdown(df, {k: (v.name if v is not None else None) for k, v in written.items()},
                         [str(s) for s in sources])
    report = out / "report.md"
    report.write_text(md)
    return {"report": report, "figures": written}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moebench.report",
                                 description="PNG figures and a Markdown summary of moebench result tables.")
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="job or sweep folders, results.parquet files or globs")
    ap.add_argument("--out", metavar="DIR", help="where to write (default: the first PATH if a folder, else its parent)")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # no display, no browser (the figures never go through pyplot anyway)
    from moebench import results

    try:
        df = results.load(args.paths)
    except FileNotFoundError as e:
        print(f"moebench.report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else default_out(args.paths)
    res = write_report(df, out, sources=args.paths)
    figs = {k: v for k, v in res["figures"].items() if v is not None}
    print(f"moebench.report: {len(df)} rows -> {len(figs)} figures and report.md in {out.resolve()}")
    for name, path in res["figures"].items():
        print(f"  {path.resolve()}" if path is not None else f"  (no rows for {WHAT[name]})")
    print(f"  {res['report'].resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
