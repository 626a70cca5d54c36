"""Figures of times, one question each, one row of axes per card and timing mode (never two
of either on one axis):

- ``fig_bandwidth``: how close to a copy is each implementation of a bandwidth-bound stage?
- ``fig_latency``: how do latency-bound stages scale with E, k or T (log time)?
- ``fig_moe_layer``: where does the MoE layer spend its time, against a dense GEMM of the
  same FLOPs, and at how many TFLOP/s?

Every implementation is drawn by its fastest ok row of a case, as the leaderboard ranks it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moebench.report.cases import (CARD, DIRECTION, TIMING, VARIANT_COLUMNS, case_sort_key, facet_label,
                                   facet_order, fastest_per_impl, impl_name, ranked_rows, shape_text, stage_sort_key,
                                   variant_text, with_cases)
from moebench.report.styles import (LIMIT_COLOR, LINESTYLES, impl_order, impl_styles, legend_below, legend_right,
                                    mark_facet, new_figure, plain_log_ticks, stage_color)
from moebench.report.tables import NOT_STACKED, _stage_key, ok_rows


def all_impls(df: pd.DataFrame) -> list[str]:
    """Every implementation label of ``df`` (any row), for styles that agree across figures."""
    if df is None or "stage_impl" not in df.columns:
        return []
    return sorted({impl_name(v) for v in df["stage_impl"].dropna().unique()})


def _varying(d: pd.DataFrame, cols) -> list[str]:
    return [c for c in cols if c in d.columns and d[c].astype(str).nunique() > 1]


def _grid(fig, nrows: int, ncols: int, **kw):
    return np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False, **kw))


def _hide_empty(axs, used) -> None:
    for ax in axs.ravel():
        if ax not in used:
            ax.set_visible(False)


# -- bandwidth-bound stages -------------------------------------------------------------

def fig_bandwidth(df: pd.DataFrame):
    """% of the same job's device-to-device copy (``pct_of_copy``) per implementation (bars) and
    case (shape, dtype, routing distribution) of every bandwidth-bound stage, with the 100 % line:
    one row of axes per card and timing mode, one column per stage. Where an axis has dropless
    cases, cases under a capacity are left to the leaderboard (the title counts them)."""
    d = ranked_rows(df, kinds=("bandwidth",))
    if d.empty or "pct_of_copy" not in d.columns:
        return None
    d = fastest_per_impl(d[d["pct_of_copy"].notna()])
    if d.empty:
        return None
    styles = impl_styles(all_impls(df))
    facets = facet_order(set(zip(d[CARD], d[TIMING])))
    stages = sorted(d["stage_label"].unique(), key=stage_sort_key)
    per_axis, capped = {}, {}
    for fi, (card, timing) in enumerate(facets):
        for si, stage in enumerate(stages):
            s = d[(d[CARD] == card) & (d[TIMING] == timing) & (d["stage_label"] == stage)]
            s, n_capacity = _dropless_first(s)
            if n_capacity:
                capped[(fi, si)] = n_capacity
            if not s.empty:
                per_axis[(fi, si)] = s
    ncase = {fi: max(len(_cases(s)[0]) * (0.25 + 0.13 * s["impl_label"].nunique()) for (f, _), s in per_axis.items()
                     if f == fi) for fi in range(len(facets))}
    fig = new_figure(max(7.0, 6.2 * len(stages)), 1.4 + sum(0.9 + v for v in ncase.values()))
    axs = _grid(fig, len(facets), len(stages), gridspec_kw={"height_ratios": [0.9 + ncase[i] for i in
                                                                              range(len(facets))]})
    xmax = max(110.0, float(d["pct_of_copy"].max()) * 1.12)
    handles, used = {}, set()
    for (fi, si), s in per_axis.items():
        ax = axs[fi, si]
        used.add(ax)
        cases, label_of = _cases(s)
        here = impl_order(s["impl_label"].unique())
        h = 0.8 / len(here)
        for j, impl in enumerate(here):
            part = s[s["impl_label"] == impl]
            ys = [cases.index(label_of[i]) - 0.4 + h * (j + 0.5) for i in part.index]
            vals = part["pct_of_copy"].astype(float).to_numpy()
            bars = ax.barh(ys, vals, h, color=styles[impl].color, label=impl)
            if len(cases) * len(here) <= 48:
                ax.bar_label(bars, labels=[f"{v:.0f}" for v in vals], fontsize=6, padding=1)
            handles.setdefault(impl, bars)
        line = ax.axvline(100.0, color=LIMIT_COLOR, ls="--", lw=1, gid="limit")
        handles["copy (100 %)"] = line
        ax.set_yticks(range(len(cases)), cases, fontsize=7)
        ax.set_ylim(len(cases) - 0.5, -0.5)
        ax.set_xlim(0, xmax)
        ax.set_xlabel("% of copy bandwidth", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        more = f"\n(dropless; {capped[(fi, si)]} capacity cases in the leaderboard)" if (fi, si) in capped else ""
        ax.set_title(f"{stages[si]} · {facet_label(*facets[fi])}{more}", fontsize=9)
        mark_facet(ax, *facets[fi])
    _hide_empty(axs, used)
    order = [k for k in impl_order([k for k in handles if k != "copy (100 %)"])] + ["copy (100 %)"]
    legend_below(fig, {k: handles[k] for k in order})
    fig.suptitle("Bandwidth-bound stages: strict bytes as % of a device-to-device copy (each implementation's "
                 "fastest row)", fontsize=10)
    return fig


def _dropless_first(s: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """An axis's dropless rows where it has some, and how many cases under a capacity that
    leaves to the leaderboard (the capacity figure draws what a capacity costs)."""
    dropless = s["capacity"].isin(["", "dropless"])
    if not dropless.any() or dropless.all():
        return s, 0
    return s[dropless], len(set(map(tuple, s.loc[~dropless, ["shape_label", "dtype", *VARIANT_COLUMNS]].to_numpy())))


def _cases(s: pd.DataFrame):
    """The case labels of one axis in case order, and each row's label."""
    varying = _varying(s, ["dtype", DIRECTION, *VARIANT_COLUMNS])
    label_of = {}
    for i, r in s.iterrows():
        extra = [str(r[c]) for c in ("dtype", DIRECTION) if c in varying]
        variant = variant_text(r, [c for c in VARIANT_COLUMNS if c in varying])
        label_of[i] = "\n".join([r["shape_label"], *([" ".join(extra + ([variant] if variant else []))]
                                                     if extra or variant else [])])
    order = sorted(s.index, key=lambda i: case_sort_key(s.loc[i]))
    cases = list(dict.fromkeys(label_of[i] for i in order))
    return cases, label_of


# -- latency-bound stages ---------------------------------------------------------------

#: what a latency-bound stage's time can be drawn against (the hidden size does not enter:
#: these stages read logits [T, E] or expert ids [T, k])
LATENCY_AXES = (("experts", "experts E"), ("topk", "top-k k"), ("tokens", "tokens T"))


def fig_latency(df: pd.DataFrame):
    """Median time (log axis) of every latency-bound stage (route, select, metadata, ...) per
    implementation, against whichever of E, k, T varies most on the axis; one line per
    implementation (its colour and marker) and per combination of the other dimensions (line
    style, legend beside the axis). One row of axes per card and timing mode, one column per
    stage; as in ``fig_bandwidth``, cases under a capacity are left to the leaderboard where an
    axis has dropless ones."""
    from matplotlib.ticker import NullLocator

    d = ranked_rows(df, kinds=("latency",))
    if d.empty:
        return None
    key = [CARD, TIMING, DIRECTION, "stage_label", "tokens", "experts", "topk", "dtype", *VARIANT_COLUMNS]
    d = fastest_per_impl(d, key=key).copy()
    for c, _ in LATENCY_AXES:
        d[c] = pd.to_numeric(d[c], errors="coerce")
    styles = impl_styles(all_impls(df))
    facets = facet_order(set(zip(d[CARD], d[TIMING])))
    stages = sorted(d["stage_label"].unique(), key=stage_sort_key)
    fig = new_figure(max(7.0, 5.6 * len(stages)), 1.2 + 3.3 * len(facets))
    axs = _grid(fig, len(facets), len(stages))
    handles, used = {}, set()
    for fi, (card, timing) in enumerate(facets):
        for si, stage in enumerate(stages):
            s = d[(d[CARD] == card) & (d[TIMING] == timing) & (d["stage_label"] == stage)]
            if s.empty:
                continue
            s, n_capacity = _dropless_first(s)
            ax = axs[fi, si]
            used.add(ax)
            x, xlabel = max(LATENCY_AXES, key=lambda a: (s[a[0]].nunique(), -LATENCY_AXES.index(a)))
            rest = _varying(s, [c for c, _ in LATENCY_AXES if c != x] + ["dtype", DIRECTION, *VARIANT_COLUMNS])
            combos = sorted({tuple(str(v) for v in r) for r in s[rest].itertuples(index=False)}) if rest else [()]
            style_of = {c: LINESTYLES[i % len(LINESTYLES)] for i, c in enumerate(combos)}
            for impl in impl_order(s["impl_label"].unique()):
                part = s[s["impl_label"] == impl]
                for combo, line in (part.groupby(rest, sort=True) if rest else [((), part)]):
                    combo = tuple(str(v) for v in (combo if isinstance(combo, tuple) else (combo,)))
                    line = line.sort_values(x)
                    h, = ax.plot(line[x], line["time_us_median"], color=styles[impl].color,
                                 marker=styles[impl].marker, ls=style_of[combo], ms=5, lw=1.3, label=impl)
                    handles.setdefault(impl, h)
            if len(combos) > 1:
                legend_right(ax, {_combo_label(rest, c): ax.plot([], [], color="0.3", ls=style_of[c])[0]
                                  for c in combos}, title="line style")
            ax.set_yscale("log")
            plain_log_ticks(ax.yaxis)
            ax.margins(y=0.12)
            xs = sorted(s[x].dropna().unique())
            if x != "topk" and len(xs) > 1 and xs[-1] / max(xs[0], 1) >= 4:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(int(v)) for v in xs])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("median time (µs, log)", fontsize=8)
            ax.grid(alpha=0.3, which="both")
            more = f"\n(dropless; {n_capacity} capacity cases in the leaderboard)" if n_capacity else ""
            ax.set_title(f"{stage} · {facet_label(card, timing)}{more}", fontsize=9)
            mark_facet(ax, card, timing)
    _hide_empty(axs, used)
    legend_below(fig, {k: handles[k] for k in impl_order(handles)})
    fig.suptitle("Latency-bound stages: median time (each implementation's fastest row)", fontsize=10)
    return fig


def _combo_label(cols, combo) -> str:
    names = {"experts": "E={}", "topk": "k={}", "tokens": "T={}", "cfg.logits.alpha": "alpha={}"}
    out = []
    for c, v in zip(cols, combo):
        if v in ("", "nan"):
            continue
        if c in ("experts", "topk", "tokens"):
            v = v[:-2] if v.endswith(".0") else v
        out.append(names.get(c, "{}").format(v) if c not in ("pad_to_capacity", "weighted")
                   else (("padded" if v == "True" else "unpadded") if c == "pad_to_capacity"
                         else ("weighted" if v == "True" else "unweighted")))
    return " ".join(out) or "—"


# -- the MoE layer ----------------------------------------------------------------------

def _layer_rows(df: pd.DataFrame) -> pd.DataFrame:
    d = ok_rows(df)
    if d is None or d.empty or not all(c in d.columns for c in ("bench", "stage", "time_us_median")):
        return pd.DataFrame()
    d = d[(d["bench"] == "moe_layer") & d["time_us_median"].notna()]
    if d.empty:
        return d
    d = with_cases(d)
    path = d["gemm_impl"].astype(object).where(d["gemm_impl"].notna(), "") if "gemm_impl" in d.columns else ""
    d["path"] = [p if p else impl for p, impl in zip(pd.Series(path, index=d.index), d["impl_label"])]
    inter = d["intermediate"].astype(object).where(d["intermediate"].notna(), "") if "intermediate" in d.columns \
        else pd.Series("", index=d.index)
    d["layer_shape"] = [shape_text({**r, "intermediate_": str(i)[:-2] if str(i).endswith(".0") else str(i)})
                        for r, i in zip(d[["shape_name", "tokens", "hidden", "experts", "topk"]].to_dict("records"),
                                        inter)]
    d["layer_shape"] += [f" {dt}" if dt else "" for dt in d["dtype"]]
    job = pd.Series("", index=d.index, dtype=object)
    for c in ("source_file", "output_dir"):  # a job's folder; else the table it came from
        if c in d.columns:
            job = d[c].astype(object).where(d[c].notna() & (d[c].astype(object) != ""), job)
    d["job"] = job.map(str)
    return d


def _fastest_jobs(d: pd.DataFrame) -> pd.DataFrame:
    """Per (card, timing, shape, path): the rows of its job with the fastest measured total
    (the sum of its stages where no total was measured), so a bar stacks one job's stages."""
    keep = []
    for _, g in d.groupby([CARD, TIMING, "layer_shape", "path"], sort=False):
        tot = g[g["stage"] == "total"]
        if len(tot):
            job = tot.sort_values("time_us_median", kind="stable")["job"].iloc[0]
        else:
            job = g[~g["stage"].isin(NOT_STACKED)].groupby("job")["time_us_median"].sum().idxmin()
        keep.append(g[g["job"] == job])
    return pd.concat(keep)


def fig_moe_layer(df: pd.DataFrame):
    """The ``moe_layer`` bench per card, timing mode and shape: each GEMM path's stages stacked
    (one job: the path's fastest), its measured total, and a dense GEMM of the same FLOPs
    (dashed); beside it the layer's and the expert FFN's TFLOP/s against the dense GEMM's."""
    d = _layer_rows(df)
    if d.empty:
        return None
    d = _fastest_jobs(d)
    triples = set(zip(d[CARD], d[TIMING], d["layer_shape"]))
    panels = [(c, t, s) for c, t in facet_order({p[:2] for p in triples})
              for s in sorted(s for c2, t2, s in triples if (c2, t2) == (c, t))]
    npaths = [d[(d[CARD] == c) & (d[TIMING] == t) & (d["layer_shape"] == s)]["path"].nunique() for c, t, s in panels]
    fig = new_figure(15.0, 1.6 + sum(1.0 + 0.42 * n for n in npaths))
    axs = _grid(fig, len(panels), 2, gridspec_kw={"width_ratios": [2.2, 1.0], "height_ratios":
                                                   [1.0 + 0.42 * n for n in npaths]})
    handles = {}
    for row, (card, timing, shape) in enumerate(panels):
        s = d[(d[CARD] == card) & (d[TIMING] == timing) & (d["layer_shape"] == shape)]
        g = s.pivot_table(index="path", columns="stage", values="time_us_median", aggfunc="first")
        fl = s.pivot_table(index="path", columns="stage", values="tflops", aggfunc="first") \
            if "tflops" in s.columns else pd.DataFrame(index=g.index)
        paths = sorted(g.index, key=lambda p: (g.loc[p].get("total", np.nan), p))
        ys = np.arange(len(paths))
        ax, axf = axs[row, 0], axs[row, 1]
        left = np.zeros(len(paths))
        for i, st in enumerate(sorted([c for c in g.columns if c not in NOT_STACKED], key=_stage_key)):
            vals = g.loc[paths, st].to_numpy(dtype=float)
            ok = ~np.isnan(vals)
            bars = ax.barh(ys[ok], vals[ok], 0.7, left=left[ok], color=stage_color(st, i), label=st,
                           edgecolor="white", linewidth=0.4)
            handles.setdefault(st, bars)
            left[ok] += vals[ok]
        if "total" in g.columns:
            tot = g.loc[paths, "total"].to_numpy(dtype=float)
            ok = ~np.isnan(tot)
            handles["total (measured)"] = ax.scatter(tot[ok], ys[ok], marker="|", s=260, color=LIMIT_COLOR,
                                                     linewidths=2, zorder=3, label="total (measured)")
            for y, t, end in zip(ys[ok], tot[ok], left[ok]):
                ax.annotate(f"{t / 1000:.2f} ms" if t >= 1000 else f"{t:.0f} µs", (max(t, end), y), xytext=(6, 0),
                            textcoords="offset points", va="center", fontsize=7)
        if "dense_gemm" in g.columns:
            dense = g.loc[paths, "dense_gemm"].to_numpy(dtype=float)
            ok = ~np.isnan(dense)
            handles["dense GEMM, same FLOPs"] = ax.vlines(dense[ok], ys[ok] - 0.42, ys[ok] + 0.42, colors=LIMIT_COLOR,
                                                          linestyles="--", lw=1.2, gid="limit")
        ax.set_yticks(ys, paths, fontsize=8)
        ax.set_ylim(len(paths) - 0.5, -0.6)
        ax.set_xlim(0, float(np.nanmax(left)) * 1.18)
        ax.set_xlabel("median time (µs)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{shape} · {facet_label(card, timing)}: time per stage", fontsize=9)
        mark_facet(ax, card, timing)
        for j, (st, name, color) in enumerate((("total", "layer", "0.35"), ("experts", "expert FFN", "0.72"))):
            if st in fl.columns:
                vals = fl.reindex(paths)[st].to_numpy(dtype=float)
                ok = ~np.isnan(vals)
                handles[f"TFLOP/s: {name}"] = axf.barh(ys[ok] - 0.2 + 0.4 * j, vals[ok], 0.38, color=color)
        if "dense_gemm" in fl.columns:
            dense = fl.reindex(paths)["dense_gemm"].to_numpy(dtype=float)
            ok = ~np.isnan(dense)
            axf.vlines(dense[ok], ys[ok] - 0.42, ys[ok] + 0.42, colors=LIMIT_COLOR, linestyles="--", lw=1.2,
                       gid="limit")
        axf.set_yticks(ys, [""] * len(paths))
        axf.set_ylim(len(paths) - 0.5, -0.6)
        axf.set_xlabel("TFLOP/s", fontsize=8)
        axf.grid(axis="x", alpha=0.3)
        axf.set_title(f"TFLOP/s · {facet_label(card, timing)}\n(dashed: the dense GEMM)", fontsize=9)
        mark_facet(axf, card, timing)
    legend_below(fig, handles, ncols=min(len(handles), 8))
    fig.suptitle("MoE layer: each GEMM path's stages (its fastest job), the dense GEMM of the same FLOPs, TFLOP/s",
                 fontsize=10)
    return fig
