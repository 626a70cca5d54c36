"""The figures of a results DataFrame. Every ``fig_*`` function returns a matplotlib ``Figure``,
or ``None`` when the selection it draws is empty (``WHAT[name]`` says which rows it needs). They
are built with the object-oriented API (``matplotlib.figure.Figure``), never through pyplot,
so they neither depend on nor change the active backend; PNGs are rendered by Agg."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd

from moebench.report.tables import (NOT_STACKED, _has, _impl_label, _join, _shape_label, _short_impl, _stage_key,
                                    _varying, ok_rows)

#: What each figure draws, for the "no rows for ..." line when its selection is empty.
WHAT = {
    "roofline": "the roofline view (ok rows with pct_of_copy)",
    "topk": "top-k time (ok rows with stage == 'route' and a time)",
    "drop_rate": "drop rate vs capacity factor (rows with capacity_factor and avg_drop_rate)",
    "expert_load": "the per-expert load histogram (rows with expert_counts)",
    "routing_stages": "the routing stage breakdown (ok rows with bench == 'routing')",
    "moe_layer": "the MoE-layer stage breakdown (ok rows with bench == 'moe_layer')",
}



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


