"""The leaderboard: for each case (card, timing mode, direction, stage, shape, dtype, routing
variant) of the ok rows, the fastest implementation, its time, how close it is to its limit
(% of copy for bandwidth-bound stages, % of a dense GEMM for the layer's GEMMs, none for
latency-bound ones and chains) and how many times slower every other implementation is.
One table per card and timing mode: times of different cards or modes are never ranked
together."""

from __future__ import annotations

import math

import pandas as pd

from moebench.report.cases import (CARD, CASE_KEY, DIRECTION, DTYPE_SHORT, LIMITS, TIMING, TIMING_NOTES,
                                   VARIANT_COLUMNS, case_sort_key, facet_label, facet_order, fastest_per_impl,
                                   ranked_rows, variant_text)
from moebench.report.tables import markdown_table

#: The columns of ``leaderboard``'s frame (besides the case's shape and variant columns).
COLUMNS = ["card", "timing", "direction", "stage", "kind", "shape", "dtype", "fastest", "us", "limit",
           "pct_of_limit", "runner_up", "runner_up_ratio", "ratios", "entrants", "rows"]


def leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """One row per case with at least one ok, timed row (multi-GPU ranks and measured ceilings
    such as ``dense_gemm`` are not ranked). Each implementation is represented by its fastest
    row of the case. ``us``: the winner's median time; ``pct_of_limit`` its % of ``limit``
    (NaN where the stage has none); ``runner_up`` / ``runner_up_ratio``: the second fastest and
    its time over the winner's; ``ratios``: every other implementation's time over the winner's,
    fastest first; ``entrants``: implementations ranked; ``rows``: rows behind them."""
    best = fastest_per_impl(ranked_rows(df))
    shape_cols = ["shape_name", "tokens", "hidden", "experts", "topk", "intermediate_"]
    if best.empty:
        return pd.DataFrame(columns=[*COLUMNS, *shape_cols, *VARIANT_COLUMNS])
    out = []
    for _, g in best.groupby(list(CASE_KEY), sort=False, dropna=False):
        g = g.sort_values(["time_us_median", "impl_label"], kind="stable")
        w = g.iloc[0]
        t0 = float(w["time_us_median"])
        names = _entrant_names(g) if w["kind"] == "chain" else dict(zip(g["impl_label"], g["impl_label"]))
        others = {names[r["impl_label"]]: float(r["time_us_median"]) / t0 if t0 > 0 else math.inf
                  for _, r in g.iloc[1:].iterrows()}
        col, name = LIMITS.get(w["kind"], (None, ""))
        if w["kind"] == "chain" and pd.notna(w.get("pct_of_dense", math.nan)):
            col, name = LIMITS["gemm"]  # the MoE layer's total: its % of the same job's dense GEMM
        pct = float(w[col]) if col and col in w.index and pd.notna(w[col]) else math.nan
        runner = next(iter(others), "")
        out.append({"card": w[CARD], "timing": w[TIMING], "direction": w[DIRECTION], "stage": w["stage_label"],
                    "kind": w["kind"], "shape": w["shape_label"], "dtype": w["dtype"],
                    "fastest": names[w["impl_label"]], "us": t0, "limit": name if not math.isnan(pct) else "",
                    "pct_of_limit": pct, "runner_up": runner, "runner_up_ratio": others.get(runner, math.nan),
                    "ratios": others, "entrants": len(g), "rows": int(g["n_rows"].sum()),
                    **{c: w[c] for c in shape_cols}, **{c: w[c] for c in VARIANT_COLUMNS},
                    "stage_label": w["stage_label"]})
    lb = pd.DataFrame(out)
    facets = facet_order(set(zip(lb["card"], lb["timing"])))
    rank = {f: i for i, f in enumerate(facets)}
    lb["_f"] = [rank[(c, t)] for c, t in zip(lb["card"], lb["timing"])]
    lb["_d"] = lb["direction"].map(lambda v: ("fwd", "bwd", "fwdbwd").index(v) if v in ("fwd", "bwd", "fwdbwd")
                                   else 9)
    lb["_c"] = lb.apply(case_sort_key, axis=1)
    lb = lb.sort_values(["_f", "_d", "_c"], kind="stable").drop(columns=["_f", "_d", "_c", "stage_label"])
    return lb.reset_index(drop=True)


def _entrant_names(g: pd.DataFrame) -> dict[str, str]:
    """Chains named without the stages every entrant of the case ran alike: ``cute (gate=torch,
    gemm=grouped_mm)`` is ``cute (gemm=grouped_mm)`` when every entrant's gate was torch (the
    full names where that would make two of them alike)."""
    labels = list(dict.fromkeys(g["impl_label"]))
    if len(labels) < 2:
        return {lab: lab for lab in labels}
    raw = {lab: [tuple(p.split("=", 1)) for p in str(si).split(",") if "=" in p]
           for lab, si in zip(g["impl_label"], g["stage_impl"])}
    common = set.intersection(*(set(v) for v in raw.values()))
    out = {}
    for lab in labels:
        base, _, rest = lab.partition(" (")
        if not rest:
            out[lab] = lab
            continue
        kept = [b for b in rest.rstrip(")").split(", ") if tuple(b.split("=", 1)) not in common]
        out[lab] = f"{base} ({', '.join(kept)})" if kept else base
    return out if len(set(out.values())) == len(out) else {lab: lab for lab in labels}


# -- formatting -------------------------------------------------------------------------

def _us(v: float) -> str:
    return f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _ratio(r: float) -> str:
    if math.isinf(r):
        return "inf"
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def leaderboard_tables(lb: pd.DataFrame, per_card: bool = False) -> list[tuple[str, str | None, pd.DataFrame]]:
    """``(card, timing, table)`` per card and timing mode (``per_card``: ``(card, None, table)``
    per card, its first column the timing mode; the rankings stay per mode), the table as text
    cells: stage, shape, dtype, direction (when not all fwd), case (the routing variants that
    differ inside the table), fastest, us, % of limit, runner-up, others (each ``name ratio×``:
    its time over the winner's)."""
    tables = []
    if lb is None or lb.empty:
        return tables
    facets = facet_order(set(zip(lb["card"], lb["timing"])))
    groups = list(dict.fromkeys(c for c, _ in facets)) if per_card else facets
    for group in groups:
        card, timing = (group, None) if per_card else group
        t = lb[(lb["card"] == card) & ((lb["timing"] == timing) if timing is not None else True)]
        varying = [c for c in VARIANT_COLUMNS if c in t.columns and t[c].astype(str).nunique() > 1]
        view = pd.DataFrame({
            **({"timing": t["timing"]} if per_card else {}),
            "stage": t["stage"], "shape": t["shape"],
            "dtype": t["dtype"].map(lambda v: DTYPE_SHORT.get(v, v)),
            **({"direction": t["direction"]} if set(t["direction"]) != {"fwd"} else {}),
            **({"case": t.apply(variant_text, axis=1, cols=varying)} if varying else {}),
            "fastest": t["fastest"], "us": t["us"].map(_us),
            "% of limit": [f"{p:.0f} % {lim}" if lim else "—" for p, lim in zip(t["pct_of_limit"], t["limit"])],
            "runner-up": [f"{n} {_ratio(r)}" if n else "—" for n, r in zip(t["runner_up"], t["runner_up_ratio"])],
            "others": [", ".join(f"{n} {_ratio(r)}" for n, r in list(rs.items())[1:]) or "—" for rs in t["ratios"]],
        })
        tables.append((card, timing, view.reset_index(drop=True)))
    return tables


def _title(card: str, timing: str | None, n: int) -> str:
    note = TIMING_NOTES.get(timing) if timing else None
    return f"{facet_label(card, timing)}{f' ({note})' if note else ''}: {n} case{'s' if n != 1 else ''}"


LEGEND = ("Per card and timing mode, one row per case: the fastest implementation (each implementation by its "
          "fastest ok row of the case), its median time, its % of the limit (a device-to-device copy for "
          "bandwidth-bound stages, a dense GEMM of the same FLOPs for the layer's GEMMs and its total, "
          "measured in the same job; none for latency-bound stages and other chains), and every other "
          "implementation's time over the winner's (runner-up first).")


def leaderboard_markdown(lb: pd.DataFrame, heading: str = "###", per_card: bool = False) -> str:
    """The leaderboard as Markdown: one table per card and timing mode (``per_card``: per card,
    with a timing column) under ``heading``."""
    tables = leaderboard_tables(lb, per_card=per_card)
    if not tables:
        return "No ok, timed rows to rank."
    lines = [LEGEND, ""]
    for card, timing, t in tables:
        lines += [f"{heading} {_title(card, timing, len(t))}", "", markdown_table(t), ""]
    return "\n".join(lines).rstrip() + "\n"


def leaderboard_text(lb: pd.DataFrame) -> str:
    """The leaderboard as plain text (the command line prints it)."""
    tables = leaderboard_tables(lb)
    if not tables:
        return "leaderboard: no ok, timed rows to rank"
    blocks = []
    for card, timing, t in tables:
        blocks.append(f"== {_title(card, timing, len(t))}\n{_text_table(t)}")
    return "\n\n".join(blocks)


def _text_table(t: pd.DataFrame) -> str:
    """Columns left-aligned (the times right-aligned), two spaces apart."""
    cols = list(t.columns)
    cells = [[str(c) for c in cols]] + [[str(v) for v in row] for row in t.itertuples(index=False, name=None)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cols))]
    right = {i for i, c in enumerate(cols) if c == "us"}
    lines = ["  ".join(v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in cells]
    return "\n".join(lines)
