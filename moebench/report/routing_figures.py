"""Figures of the routing itself, which no timing mode changes: one column (or row) of axes
per card, since each card's generator draws its own logits (never two cards on one axis).

- ``fig_capacity``: what does a capacity factor cost, in dropped assignments and in empty
  (padding) rows, per routing distribution?
- ``fig_expert_load``: how unbalanced is each routing distribution's per-expert load?

Drop rates and loads describe a job's routing, so every row of a job (any status) carries them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from moebench.report.cases import CARD, facet_label, facet_order, single_card, with_cases
from moebench.report.styles import (FALLBACK_MARKERS, LIMIT_COLOR, LINESTYLES, distribution_style, legend_right,
                                    mark_facet, new_figure, plain_log_ticks)
from moebench.report.tables import _has, _shape_label

#: The routing dimensions a line of these figures keeps fixed (the hidden size and the
#: implementations do not change a routing).
ROUTING_DIMS = ("tokens", "experts", "topk", "router", "drop_policy", "pad_to_capacity")
CAPACITY_METRICS = {"avg_drop_rate": "dropped assignments (avg_drop_rate)",
                    "padding_waste": "empty rows of the packed buffer (padding_waste)"}


def _lower_median(values) -> float:
    """The lower median: a value of the series itself (identical rows agree on it anyway)."""
    v = np.sort(np.asarray(values, dtype=float))
    return float(v[(len(v) - 1) // 2])


def _distribution(r) -> str:
    a = str(r.get("cfg.logits.alpha", ""))
    return f"{r['logits']} alpha={a}" if a else str(r["logits"] or "?")


def _dims_label(r, cols) -> str:
    fmt = {"tokens": "T{}", "experts": "E{}", "topk": "k{}", "drop_policy": "drop by {}"}
    out = []
    for c in cols:
        v = str(r[c])
        if c == "pad_to_capacity":
            out.append("padded" if v == "True" else "unpadded")
        elif v:
            out.append(fmt.get(c, "{}").format(v))
    return " ".join(out)


def _routing_rows(df: pd.DataFrame, *need: str) -> pd.DataFrame:
    if not _has(df, *need):
        return pd.DataFrame()
    mask = single_card(df)
    for c in need:
        mask &= df[c].notna() if c != "expert_counts" else df[c].map(
            lambda v: v is not None and not isinstance(v, float) and len(v) > 0)
    d = df[mask]
    if d.empty:
        return d
    d = with_cases(d)
    d["distribution"] = [_distribution(r) for r in d[["logits", "cfg.logits.alpha"]].to_dict("records")]
    return d


# -- capacity -----------------------------------------------------------------------------

def fig_capacity(df: pd.DataFrame):
    """Dropped assignments and padding waste against the capacity factor, one line per routing
    distribution (its colour and marker) and per routing shape (line style); one column per
    card, one row per metric."""
    d = _routing_rows(df, "capacity_factor", "avg_drop_rate")
    if d.empty:
        return None
    from matplotlib.ticker import PercentFormatter

    metrics = [m for m in CAPACITY_METRICS if m in d.columns and d[m].notna().any()]
    cards = facet_order(set(d[CARD]))
    fig = new_figure(max(6.5, 6.4 * len(cards)), 1.0 + 3.4 * len(metrics))
    axs = np.atleast_2d(fig.subplots(len(metrics), len(cards), squeeze=False))
    for ci, card in enumerate(cards):
        s = d[d[CARD] == card]
        dims = [c for c in ROUTING_DIMS if s[c].astype(str).nunique() > 1]
        fixed = _dims_label(s.iloc[0], [c for c in ROUTING_DIMS if c not in dims])
        lines = sorted({(r["distribution"], _dims_label(r, dims)) for _, r in s.iterrows()})
        shapes = sorted({b for _, b in lines})
        handles = {}
        for mi, m in enumerate(metrics):
            ax = axs[mi, ci]
            for k, (dist, dims_text) in enumerate(lines):
                part = s[(s["distribution"] == dist) & (s.apply(lambda r: _dims_label(r, dims), axis=1) == dims_text)]
                part = part[part[m].notna()]
                if part.empty:
                    continue
                g = part.groupby("capacity_factor")[m].agg(_lower_median).sort_index()
                st = distribution_style(part["logits"].iloc[0], k)
                h, = ax.plot(g.index, g.to_numpy(), color=st.color, marker=st.marker, ms=5, lw=1.4,
                             ls=LINESTYLES[shapes.index(dims_text) % len(LINESTYLES)])
                handles.setdefault(f"{dist} {dims_text}".strip(), h)
            cfs = sorted(s["capacity_factor"].unique())
            ax.set_xticks(cfs, [f"{v:g}" for v in cfs], fontsize=8)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(bottom=0)
            ax.set_xlabel("capacity factor", fontsize=8)
            ax.grid(alpha=0.3)
            ax.set_title(f"{facet_label(card)} · {fixed}\n{CAPACITY_METRICS[m]}", fontsize=9)
            mark_facet(ax, card, None)
        legend_right(axs[0, ci], handles, title="distribution")
    fig.suptitle("Capacity: what a capacity factor costs (routing only: no timing mode changes it)", fontsize=10)
    return fig


# -- expert load --------------------------------------------------------------------------

def _load_cases(df: pd.DataFrame) -> pd.DataFrame:
    """One row per card, distribution and routing shape: the first row of each (the rows of
    one routing agree on its load)."""
    d = _routing_rows(df, "expert_counts")
    if d.empty:
        return d
    dims = ("tokens", "experts", "topk", "router")
    d["routing"] = [_dims_label(r, dims) for _, r in d[list(dims)].iterrows()]
    d = d.drop_duplicates(subset=[CARD, "distribution", "routing"])
    varying = [c for c in dims if d[c].astype(str).nunique() > 1]
    d["routing"] = [_dims_label(r, varying) or "one routing" for _, r in d[list(dims)].iterrows()]
    d.attrs["fixed"] = _dims_label(d.iloc[0], [c for c in dims if c not in varying])
    return d


def fig_expert_load(df: pd.DataFrame, row=None, max_lines: int = 8):
    """Per-expert routed load (``expert_counts``, before any capacity). By default, one axis per
    card and routing distribution (in its colour), cards in turn: each routing shape's experts
    sorted by load (line style), as load / mean against the fraction of experts (a log axis
    where it spans more than 4x), the mean as a line (a capacity factor cf drops what lies above cf). With ``row`` (an index label
    of ``df`` or a list of them): those rows' counts as bars, with the mean and the capacity."""
    if row is not None:
        return _fig_rows_load(df, row)
    d = _load_cases(df)
    if d.empty:
        return None
    dists = sorted(set(d["distribution"]))
    panels = [(card, dist) for card in facet_order(set(d[CARD])) for dist in dists
              if ((d[CARD] == card) & (d["distribution"] == dist)).any()]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(max(6.5, 6.2 * ncols), 1.0 + 3.3 * nrows)
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    used = set()
    for ax, (card, dist) in zip(axs, panels):
        ci = dists.index(dist)
        s = d[(d[CARD] == card) & (d["distribution"] == dist)]
        used.add(ax)

        def order(i, s=s):
            return tuple(float(s.loc[i, c]) if s.loc[i, c] else math.inf for c in ("experts", "topk", "tokens"))
        s = s.loc[sorted(s.index, key=order)]
        shown = s.iloc[:max_lines]
        handles = {}
        for k, (_, r) in enumerate(shown.iterrows()):
            counts = np.sort(np.asarray(list(r["expert_counts"]), dtype=float))[::-1]
            mean = counts.mean()
            if mean <= 0:
                continue
            x = (np.arange(len(counts)) + 0.5) / len(counts)
            st = distribution_style(r["logits"], ci)
            h, = ax.plot(x, counts / mean, color=st.color, ls=LINESTYLES[k % len(LINESTYLES)], lw=1.5,
                         marker=FALLBACK_MARKERS[k % len(FALLBACK_MARKERS)] if len(shown) > 1 else None,
                         markevery=max(1, len(counts) // 6), ms=5, drawstyle="steps-mid")
            handles[f"{r['routing']} (max/mean {counts.max() / mean:.2f})"] = h
        ax.axhline(1.0, color=LIMIT_COLOR, ls="--", lw=1, gid="limit")
        lo, hi = ax.dataLim.y0, ax.dataLim.y1
        log = lo > 0 and hi / lo > 4  # a log axis only where the load spans a range worth it
        if log:
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
        ax.set_xlim(0, 1)
        ax.set_xlabel("experts, most loaded first (fraction of E)", fontsize=8)
        ax.set_ylabel(f"load / mean{' (log)' if log else ''}; dashed: the mean", fontsize=8)
        ax.grid(alpha=0.3, which="major")
        more = f" (+{len(s) - len(shown)} more)" if len(s) > len(shown) else ""
        ax.set_title(f"{dist} · {facet_label(card)}{more}", fontsize=9)
        legend_right(ax, handles, title="routing")
        mark_facet(ax, card, None)
    for ax in axs.ravel():
        if ax not in used:
            ax.set_visible(False)
    fixed = d.attrs.get("fixed", "")
    fig.suptitle("Expert load per routing distribution (routed assignments, before any capacity)"
                 + (f": {fixed}" if fixed else ""), fontsize=10)
    return fig


def _fig_rows_load(df: pd.DataFrame, row):
    """The chosen rows' per-expert counts as bars (mean and capacity as lines)."""
    if not _has(df, "expert_counts"):
        return None
    labels = list(row) if isinstance(row, (list, tuple, np.ndarray, pd.Index)) else [row]
    d = df.loc[[r for r in labels if r in df.index]]
    d = d[d["expert_counts"].map(lambda v: v is not None and not isinstance(v, float) and len(v) > 0)]
    if d.empty:
        return None
    n = len(d)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = new_figure(max(5.0, 4.6 * ncols), 3.6 * nrows)
    axs = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cards = with_cases(d)[CARD]
    for ax, (idx, r) in zip(axs, d.iterrows()):
        counts = np.asarray(list(r["expert_counts"]), dtype=float)
        ax.bar(np.arange(len(counts)), counts, width=1.0 if len(counts) > 64 else 0.8, color="0.45")
        mean = counts.mean()
        ax.axhline(mean, color=LIMIT_COLOR, ls="--", lw=1, label=f"mean {mean:.0f}", gid="limit")
        cap = r.get("capacity_per_expert")
        if cap is not None and pd.notna(cap):
            ax.axhline(float(cap), color="#882255", lw=1.2, label=f"capacity {float(cap):.0f}", gid="limit")
        ax.set_xlabel("expert")
        ax.set_ylabel("assignments")
        ax.set_xlim(-0.6, len(counts) - 0.4)
        bits = [f"row {idx}", cards.loc[idx], r.get("bench"), r.get("logits"), r.get("router"), r.get("capacity")]
        bits2 = [_shape_label(r)]
        if "load_max_over_mean" in r and pd.notna(r["load_max_over_mean"]):
            bits2.append(f"max/mean {r['load_max_over_mean']:.2f}")
        ax.set_title(" · ".join(b for b in bits if isinstance(b, str) and b) + "\n" + " · ".join(bits2), fontsize=8)
        legend_right(ax, dict(zip(*reversed(ax.get_legend_handles_labels()))))
        mark_facet(ax, cards.loc[idx], None)
    for ax in axs[n:]:
        ax.set_visible(False)
    fig.suptitle("Per-expert load (routed assignments)")
    return fig
