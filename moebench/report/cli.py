"""``python -m moebench.report PATH... [--out DIR]``: prints the leaderboard and writes the
figures as PNG and ``report.md`` (the leaderboard, the figures, the failures, a table of ok rows
per bench), next to the sweep unless ``--out`` is given. PATH is anything
``moebench.results.load`` reads (a job or sweep folder, a .parquet file, a glob)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from moebench.report.cases import cpu_rows_left_out
from moebench.report.figures import FIGURES, TITLES, WHAT
from moebench.report.leaderboard import leaderboard, leaderboard_markdown, leaderboard_text
from moebench.report.tables import METRIC_COLUMNS, _fmt_num, failures, markdown_table, ok_table

CPU_NOTE = ("{n} ok CPU rows are neither ranked nor drawn in the timed figures: the data has GPU rows, and "
            "wall-clock CPU times compare with nothing on a card (their routing statistics are drawn; the rows "
            "are in {where}).")

def _uniq(df: pd.DataFrame, col: str) -> str:
    if col not in df.columns:
        return ""
    vals = sorted({str(v) for v in df[col].dropna().unique()} - {""})
    return ", ".join(vals)


def render_markdown(df: pd.DataFrame, figures: dict, sources, board: pd.DataFrame | None = None) -> str:
    """``report.md``: provenance, status counts, the leaderboard (``board``, by default
    ``leaderboard(df)``), the figures (or why one is missing), every failing row, and a table of
    ok rows per bench."""
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
    lines += ["", "## Leaderboard", ""]
    lines.append(leaderboard_markdown(leaderboard(df) if board is None else board, heading="###"))
    n_cpu = cpu_rows_left_out(df)
    if n_cpu:
        lines += ["", CPU_NOTE.format(n=n_cpu, where="the tables below")]
    lines += ["", "## Figures", ""]
    for name, png in figures.items():
        if png is None:
            lines.append(f"- *no rows for {WHAT.get(name, name)}*")
        else:
            lines += [f"### {TITLES.get(name, name)}", "", f"![{name}]({png})", ""]
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
    Returns ``{"report": path, "figures": {name: path or None}, "leaderboard": DataFrame}``."""
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
    board = leaderboard(df)
    md = render_markdown(df, {k: (v.name if v is not None else None) for k, v in written.items()},
                         [str(s) for s in sources], board=board)
    report = out / "report.md"
    report.write_text(md)
    return {"report": report, "figures": written, "leaderboard": board}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m moebench.report",
                                 description="PNG figures and a Markdown summary of moebench result tables.")
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="job or sweep folders, results.parquet files or globs")
    ap.add_argument("--out", metavar="DIR", help="where to write (default: the first PATH if a folder, else its parent)")
    args = ap.parse_args(argv)
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("moebench.report: error: the figures need matplotlib, which the notebook extra installs: "
              "pip install -e '.[notebook]'", file=sys.stderr)
        return 2
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
    print()
    print(leaderboard_text(res["leaderboard"]))
    n_cpu = cpu_rows_left_out(df)
    if n_cpu:
        print("\n" + CPU_NOTE.format(n=n_cpu, where="report.md's tables"))
    print()
    for name, path in res["figures"].items():
        print(f"  {path.resolve()}" if path is not None else f"  (no rows for {WHAT[name]})")
    print(f"  {res['report'].resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
