"""``python -m moebench.compare BASE NEW [--fail-above RATIO] [--alpha A] [--min-change C] [--out FILE]``:
is NEW slower than BASE? BASE and NEW are anything ``moebench.results.load`` reads (job or sweep
folders, ``.parquet`` files, globs).

For each measured row -- (bench, stage, stage_impl, shape, tokens, hidden, experts, topk, dtype,
router, logits, capacity, timing mode, card), the bench's, implementation's, router's, logits' and
capacity's options, and the seed -- present and ``ok`` in both: the ratio of the medians of the
per-repeat samples (``time_us_samples``; rows measured more than once pool their samples), and a
Mann-Whitney U rank test of the two sample sets. A row is **flagged** only where the two runs'
spreads separate -- the rank test rejects at ``--alpha`` *and* the middle 80 % of the repeats
(p10..p90) of one run lies wholly above the other's -- and the medians differ by ``--min-change``
or more (5 % by default: most machines drift that much between runs). Rows measured on
different cards (``gpu_name``) are never compared. Rows ``ok`` in BASE that fail (``error`` /
``mismatch``) in NEW are listed as broken.

Prints a Markdown report (also written to ``--out``) and a one-line verdict on stderr. Exit 0;
1 with ``--fail-above R`` where a flagged row is more than R times slower or a row broke (a gate
for CI); 2 for bad input or nothing to compare.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moebench import results

#: the row identity of every comparison, in the report's order
KEY = ("bench", "stage", "stage_impl", "shape_name", "tokens", "hidden", "experts", "topk", "dtype", "router",
       "logits", "capacity", "timing_mode", "gpu_name")
#: more identity where a table has it: bench-specific columns, the seed, the options of each group
EXTRA_KEY = ("gemm_impl", "intermediate", "world_size", "rank", "weighted", "drop_policy", "pad_to_capacity",
             "renormalize_after_drop", "seed")
OPTION_PREFIXES = ("cfg.bench.", "cfg.impl.", "cfg.router.", "cfg.logits.", "cfg.capacity.")
#: option columns that name a thing rather than change it
NOT_KEY = ("cfg.impl._target_",)
FAILED = ("error", "mismatch")
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_CHANGE = 0.05


@dataclass
class Row:
    key: tuple
    base: np.ndarray
    new: np.ndarray
    base_median: float
    new_median: float
    p: float | None  # None: a side without per-repeat samples
    verdict: str = ""  # "slower" / "faster" where flagged

    @property
    def ratio(self) -> float:
        return self.new_median / self.base_median

    def separated(self) -> bool:
        """The middle 80 % of one run's repeats wholly above the other's."""
        b10, b90 = np.quantile(self.base, [0.1, 0.9])
        n10, n90 = np.quantile(self.new, [0.1, 0.9])
        return bool(n10 > b90 or b10 > n90)

    def flag(self, alpha: float, min_change: float = DEFAULT_MIN_CHANGE) -> str:
        """``slower`` / ``faster`` where the spreads separate and the change is large enough."""
        big = self.ratio >= 1 + min_change or self.ratio <= 1 / (1 + min_change)
        if self.p is None or self.p >= alpha or not big or not self.separated():
            return ""
        return "slower" if self.ratio > 1 else "faster"


def mann_whitney_u(x, y) -> float:
    """Two-sided p-value of the Mann-Whitney U test: the normal approximation with the tie
    correction and a continuity correction (exact enough from ~10 repeats a side)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        return 1.0
    both = np.concatenate([x, y])
    values, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # average ranks of ties
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    var = n1 * n2 / 12.0 * ((n + 1) - (counts**3 - counts).sum() / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 1.0
    d = u - n1 * n2 / 2.0
    z = (abs(d) - 0.5) / math.sqrt(var) if abs(d) >= 0.5 else 0.0
    return math.erfc(z / math.sqrt(2.0))


def _plain(v):
    """A key value comparable across tables (NaN and None alike, 512.0 == 512)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return int(v)
    return v.item() if isinstance(v, np.generic) else v


def key_columns(*frames: pd.DataFrame) -> list[str]:
    cols = set().union(*(f.columns for f in frames))
    missing = [c for c in KEY if c not in cols]
    if missing:
        raise ValueError(f"the tables have no {', '.join(missing)} column: not moebench result tables?")
    options = sorted(c for c in cols if c.startswith(OPTION_PREFIXES) and c not in NOT_KEY)
    return [*KEY, *(c for c in EXTRA_KEY if c in cols), *options]


def _groups(df: pd.DataFrame, cols: list[str]) -> dict[tuple, list[int]]:
    """Row positions by key (a key may hold None: no pandas groupby)."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(df.reindex(columns=cols).itertuples(index=False)):
        groups.setdefault(tuple(_plain(v) for v in row), []).append(i)
    return groups


def _samples(rows: pd.DataFrame) -> tuple[np.ndarray, float, bool]:
    """(pooled per-repeat samples, their median, whether every row had samples)."""
    parts = [np.asarray(s, float) for s in rows.get("time_us_samples", pd.Series([None] * len(rows)))
             if s is not None and not (isinstance(s, float) and math.isnan(s)) and len(s)]
    if len(parts) == len(rows) and parts:
        pooled = np.concatenate(parts)
        return pooled, float(np.median(pooled)), True
    return np.asarray(rows.time_us_median, float), float(rows.time_us_median.mean()), False


def compare(base: pd.DataFrame, new: pd.DataFrame, alpha: float = DEFAULT_ALPHA,
            min_change: float = DEFAULT_MIN_CHANGE) -> tuple[list[Row], dict]:
    """The compared rows (flagged: ``Row.verdict``), and what was not compared: ``{"only_base",
    "only_new", "broken", "cols"}`` (key lists; ``broken``: ok in BASE, failed in NEW)."""
    cols = key_columns(base, new)
    timed = [df[(df.status == "ok") & df.time_us_median.notna()].reset_index(drop=True) for df in (base, new)]
    (b, bg), (n, ng) = ((df, _groups(df, cols)) for df in timed)
    order = lambda keys: sorted(keys, key=lambda k: tuple(str(v) for v in k))  # noqa: E731
    rows = []
    for key in order(set(bg) & set(ng)):
        bs, bm, b_ok = _samples(b.iloc[bg[key]])
        ns, nm, n_ok = _samples(n.iloc[ng[key]])
        row = Row(key, bs, ns, bm, nm, mann_whitney_u(bs, ns) if b_ok and n_ok else None)
        row.verdict = row.flag(alpha, min_change)
        rows.append(row)
    failed_new = set(_groups(new[new.status.isin(FAILED)], cols))
    other = {"only_base": order(set(bg) - set(ng) - failed_new), "only_new": order(set(ng) - set(bg)),
             "broken": order(set(bg) & failed_new - set(ng)), "cols": cols}
    return rows, other


# -- the report -----------------------------------------------------------------------------

def _card(d: dict) -> str:
    return d["gpu_name"] or "cpu"


def _p(p: float | None) -> str:
    if p is None:
        return "no samples"
    return "<1e-10" if p < 1e-10 else f"{p:.0e}" if p < 1e-3 else f"{p:.3f}"


def _describe(df: pd.DataFrame, path) -> str:
    bits = [f"`{path}`", f"{len(df)} rows"]
    for label, col in (("git", "git_sha"), ("cards", "gpu_name")):
        if col in df:
            vals = sorted({str(v)[:12] if col == "git_sha" else str(v) or "cpu" for v in df[col].dropna()})
            if vals:
                bits.append(f"{label} {', '.join(vals)}")
    return ", ".join(bits)


#: what a report line shows of its key
SHOWN = ("bench", "stage", "stage_impl", "shape_name", "dtype", "gpu_name")


def variant_columns(rows: list[Row], cols: list[str]) -> list[str]:
    """The key columns beyond SHOWN that tell apart rows a report line would show alike (a
    kernel variant's option, a rank, a GEMM path)."""
    shown = [cols.index(c) for c in SHOWN]
    seen: dict[tuple, set] = {}
    for r in rows:
        seen.setdefault(tuple(r.key[i] for i in shown), set()).add(r.key)
    out = []
    for j, c in enumerate(cols):
        if c not in SHOWN and any(len({k[j] for k in keys}) > 1 for keys in seen.values()):
            out.append(c)
    return out


def markdown(rows: list[Row], other: dict, sources: tuple[str, str], alpha: float = DEFAULT_ALPHA,
             min_change: float = DEFAULT_MIN_CHANGE) -> str:
    cols = other["cols"]
    varying = variant_columns(rows, cols)
    head = ["bench", "stage", "impl", "shape", "dtype", "card", *(["variant"] if varying else []),
            "base us", "new us", "ratio", "p", "flag"]

    def line(r: Row) -> str:
        d = dict(zip(cols, r.key))
        variant = [" ".join(f"{c.removeprefix('cfg.')}={d[c]}" for c in varying if d[c] is not None)] if varying else []
        cells = [d["bench"], d["stage"], d["stage_impl"], d["shape_name"], d["dtype"], _card(d), *variant,
                 f"{r.base_median:.1f}", f"{r.new_median:.1f}", f"{r.ratio:.2f}x", _p(r.p),
                 f"**{r.verdict}**" if r.verdict else ""]
        return "| " + " | ".join(str(c) for c in cells) + " |"

    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    flagged = [r for r in rows if r.verdict]
    out = ["# moebench compare", "", f"- BASE: {sources[0]}", f"- NEW: {sources[1]}", "",
           f"{len(rows)} rows compared (median of the repeats; ratio = NEW / BASE); **flagged** where a Mann-Whitney "
           f"U test rejects at alpha = {alpha:g}, the middle 80 % of the two runs' repeats do not overlap, and the "
           f"medians differ by {100 * min_change:g} % or more.", ""]
    if flagged:
        out += ["## Flagged", "", *table, *(line(r) for r in sorted(flagged, key=lambda r: -r.ratio)), ""]
    out += ["## Every compared row", "", *table, *(line(r) for r in rows), ""]
    if other["broken"]:
        out += ["## Broken in NEW (ok in BASE, error or mismatch in NEW)", ""]
        out += [f"- {' '.join(str(v) for v in k[:4])} ({_card(dict(zip(cols, k)))})" for k in other["broken"]] + [""]
    for what, label in (("only_base", "BASE"), ("only_new", "NEW")):
        if other[what]:
            out.append(f"Only in {label} (not compared: no row of the same bench, stage, impl, shape, options "
                       f"and card in the other): {len(other[what])} rows.")
    return "\n".join(out).rstrip() + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        print(f"moebench.compare: error: {message} (python -m moebench.compare --help)", file=sys.stderr)
        sys.exit(2)


#: the numeric options: (the check, what is accepted)
CHECKS = {"fail_above": (lambda v: 1 < v < math.inf, "a ratio above 1, e.g. 1.1: exit 1 where a flagged row is "
                                                       "over 10 % slower"),
          "alpha": (lambda v: 0 < v < 1, "a significance level between 0 and 1, e.g. 0.01"),
          "min_change": (lambda v: 0 <= v < math.inf, "a relative change >= 0, e.g. 0.05: changes under 5 % are "
                                                       "never flagged")}


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def main(argv=None) -> int:
    ap = _Parser(prog="python -m moebench.compare", description=__doc__.split("\n\n")[1])
    ap.add_argument("base", metavar="BASE", help="the reference run: a job or sweep folder, a .parquet file, a glob")
    ap.add_argument("new", metavar="NEW", help="the run to check, the same way")
    ap.add_argument("--fail-above", metavar="RATIO", help=_help("exit 1 past it: " + CHECKS['fail_above'][1]))
    ap.add_argument("--alpha", metavar="A", default=str(DEFAULT_ALPHA),
                    help=_help(f"{CHECKS['alpha'][1]} (default {DEFAULT_ALPHA})"))
    ap.add_argument("--min-change", metavar="C", default=str(DEFAULT_MIN_CHANGE),
                    help=_help(f"{CHECKS['min_change'][1]} (default {DEFAULT_MIN_CHANGE})"))
    ap.add_argument("--out", metavar="FILE", help="also write the Markdown report here")
    args = ap.parse_args(argv)
    for name, (ok, accepted) in CHECKS.items():
        text = getattr(args, name)
        if text is None:
            continue
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not ok(value):
            print(f"moebench.compare: error: --{name.replace('_', '-')}={text} is not accepted; {accepted}",
                  file=sys.stderr)
            return 2
        setattr(args, name, value)
    try:
        base, new = results.load(args.base), results.load(args.new)
        rows, other = compare(base, new, args.alpha, args.min_change)
    except (FileNotFoundError, ValueError) as e:
        print(f"moebench.compare: error: {e}", file=sys.stderr)
        return 2
    if not rows and not other["broken"]:
        cards = lambda df: ", ".join(sorted({str(v) or "cpu" for v in df.gpu_name.dropna()})) or "none"  # noqa: E731
        print(f"moebench.compare: error: no row of NEW matches a row of BASE (cards: BASE {cards(base)}; NEW "
              f"{cards(new)}; rows of different cards are never compared): nothing compared", file=sys.stderr)
        return 2
    text = markdown(rows, other, (_describe(base, args.base), _describe(new, args.new)), args.alpha, args.min_change)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    slower = [r for r in rows if r.verdict == "slower"]
    faster = [r for r in rows if r.verdict == "faster"]
    worst = max(slower, key=lambda r: r.ratio, default=None)
    verdict = (f"moebench.compare: {len(rows)} rows compared: {len(slower)} slower, {len(faster)} faster, "
               f"{len(other['broken'])} broken")
    if worst is not None:
        d = dict(zip(other["cols"], worst.key))
        verdict += f"; worst {d['bench']}/{d['stage']} {d['stage_impl']} {d['shape_name']}: {worst.ratio:.2f}x"
    gate = args.fail_above is not None and (other["broken"] or (worst is not None and worst.ratio > args.fail_above))
    if args.fail_above is not None:
        verdict += f" -- {'FAIL' if gate else 'pass'} (--fail-above {args.fail_above:g})"
    print(verdict, file=sys.stderr)
    return 1 if gate else 0


if __name__ == "__main__":
    sys.exit(main())
