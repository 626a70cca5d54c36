"""``python -m moebench.compare``: on real sweeps (a re-run of the same code: nothing flagged; a
planted 2x slowdown: flagged, and the gate fails), and its rules on tables built here: the rank
test, rows of different cards never compared, broken rows, bad input."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moebench import results
from moebench.compare import Row, compare, main, mann_whitney_u

REPO = Path(__file__).resolve().parent.parent
#: the stages of these sweeps sleep a fixed 10 ms (tests/fake_impls.py) around a tiny pack or
#: combine on one thread: two runs of the same code measure alike on a loaded machine too, as GPU
#: kernels do (two threads spinning on a busy 2-core machine swing the CPU ops by milliseconds)
SWEEP = ["-m", "bench=pack,combine", "shape=tiny", "timing.warmup=2", "timing.repeats=25", "impl.name=sleeps"]


def sweep(folder, impl):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "run.py", *SWEEP, f"impl._target_=fake_impls.{impl}",
                        f"hydra.sweep.dir={folder}"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return folder


def compare_cli(*args):
    return subprocess.run([sys.executable, "-m", "moebench.compare", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    return {"base": sweep(root / "base", "SleepsInPackAndCombine"),
            "rerun": sweep(root / "rerun", "SleepsInPackAndCombine"),
            "slower": sweep(root / "slower", "SleepsTwiceAsLongInPack")}


@pytest.mark.slow
def test_a_rerun_of_the_same_code_is_not_flagged(sweeps, tmp_path):
    p = compare_cli(sweeps["base"], sweeps["rerun"], "--fail-above", "1.5", "--out", tmp_path / "report.md")
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert p.stderr.strip() == ("moebench.compare: 2 rows compared: 0 slower, 0 faster, 0 broken -- pass "
                                "(--fail-above 1.5)")
    assert "**slower**" not in p.stdout and "**faster**" not in p.stdout and "## Flagged" not in p.stdout
    assert (tmp_path / "report.md").read_text() == p.stdout
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| pack ") or ln.startswith("| combine ")]
    assert len(rows) == 2 and all("| sleeps | tiny | bfloat16 | cpu |" in r for r in rows), p.stdout


@pytest.mark.slow
def test_a_planted_2x_slowdown_is_flagged_and_fails_the_gate(sweeps):
    p = compare_cli(sweeps["base"], sweeps["slower"], "--fail-above", "1.5")
    assert p.returncode == 1, (p.stdout, p.stderr)
    flagged = p.stdout.split("## Flagged", 1)[1].split("## Every compared row", 1)[0]
    lines = [ln for ln in flagged.splitlines() if ln.startswith("| pack ")]
    assert len(lines) == 1 and lines[0].endswith("| **slower** |"), p.stdout
    ratio = float(lines[0].split(" | ")[-3].rstrip("x"))
    assert 1.8 < ratio < 2.2
    assert "| combine " not in flagged  # unchanged: not flagged
    assert p.stderr.startswith("moebench.compare: 2 rows compared: 1 slower, 0 faster, 0 broken; worst pack/pack "
                               f"sleeps tiny: {ratio:.2f}x -- FAIL (--fail-above 1.5)")
    assert compare_cli(sweeps["base"], sweeps["slower"]).returncode == 0  # without a gate: a report only
    assert compare_cli(sweeps["base"], sweeps["slower"], "--fail-above", "2.5").returncode == 0


@pytest.mark.slow
def test_rows_of_different_cards_are_never_compared(sweeps, tmp_path):
    other = tmp_path / "h100"
    shutil.copytree(sweeps["slower"], other)
    for f in results.find(other):
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("gpu_name"), "gpu_name",
                                    pa.array(["NVIDIA H100"] * t.num_rows)), f)
    p = compare_cli(sweeps["base"], other, "--fail-above", "1.5")
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip() == ("moebench.compare: error: no row of NEW matches a row of BASE (cards: BASE cpu; NEW "
                                "NVIDIA H100; rows of different cards are never compared): nothing compared")
    # both cards in NEW: only the same card's rows are compared (the planted slowdown is on the H100 only)
    shutil.copytree(sweeps["rerun"], tmp_path / "cpu")
    p = compare_cli(sweeps["base"], f"{tmp_path}/**/*.parquet", "--fail-above", "1.5")
    assert p.returncode == 0 and "0 slower" in p.stderr and "Only in NEW" in p.stdout, (p.stdout, p.stderr)


def _table(samples: dict, **cols) -> pd.DataFrame:
    """Rows of one job: stage -> per-repeat samples (None: a failed row)."""
    rows = []
    for stage, s in samples.items():
        row = {"bench": "routing", "stage": stage, "stage_impl": "cute", "shape_name": "seed", "tokens": 16384,
               "hidden": 4096, "experts": 128, "topk": 2, "dtype": "bfloat16", "router": "softmax_topk",
               "logits": "uniform", "capacity": "dropless", "timing_mode": "events", "gpu_name": "NVIDIA H200",
               "seed": 17, "status": "ok" if s is not None else "mismatch",
               "time_us_median": float(np.median(s)) if s is not None else None,
               "time_us_samples": list(s) if s is not None else None, **cols}
        rows.append(row)
    return pd.DataFrame(rows)


def test_the_rank_test():
    # scipy.stats.mannwhitneyu([1, 2, 3], [4, 5, 6], method="asymptotic") -> pvalue 0.0808556
    assert mann_whitney_u([1, 2, 3], [4, 5, 6]) == pytest.approx(0.0808556, abs=1e-6)
    assert mann_whitney_u([4, 5, 6], [1, 2, 3]) == pytest.approx(0.0808556, abs=1e-6)  # two-sided
    # scipy.stats.mannwhitneyu([1, 2, 2, 3], [2, 3, 3, 4, 5], method="asymptotic") -> pvalue 0.0993422 (ties)
    assert mann_whitney_u([1, 2, 2, 3], [2, 3, 3, 4, 5]) == pytest.approx(0.0993422, abs=1e-6)
    assert mann_whitney_u([5, 5, 5], [5, 5, 5]) == 1.0
    rng = np.random.default_rng(0)
    a = rng.normal(100, 1, 50)
    assert mann_whitney_u(a, a + 10) < 1e-15 and mann_whitney_u(a, rng.normal(100, 1, 50)) > 0.01


def test_flagged_only_where_the_spreads_separate():
    rng = np.random.default_rng(1)
    base = rng.normal(100, 5, 50)
    wide = Row((), base, rng.normal(108, 30, 50), 100.0, 108.0, 0.001)  # significant, but the spreads overlap
    assert wide.verdict == "" and wide.flag(0.01) == ""
    apart = Row((), base, base * 2, float(np.median(base)), float(np.median(base * 2)), 1e-12)
    assert apart.flag(0.01) == "slower" and apart.flag(1e-13) == ""  # the rank test must reject too
    tight = Row((), np.full(50, 100.0) + rng.normal(0, 0.01, 50), np.full(50, 101.0), 100.0, 101.0, 1e-12)
    assert tight.flag(0.01) == "" and tight.flag(0.01, min_change=0.005) == "slower"  # 1 %: under --min-change


def test_a_row_that_broke_is_listed_and_fails_the_gate(tmp_path):
    s = np.linspace(10, 11, 30)
    results.write(_table({"pack": s, "combine": s}).to_dict("records"), tmp_path / "base" / results.FILENAME)
    results.write(_table({"pack": s, "combine": None}).to_dict("records"), tmp_path / "new" / results.FILENAME)
    base, new = results.load(tmp_path / "base"), results.load(tmp_path / "new")
    rows, other = compare(base, new)
    assert [r.key[1] for r in rows] == ["pack"] and [k[1] for k in other["broken"]] == ["combine"]
    assert main([str(tmp_path / "base"), str(tmp_path / "new")]) == 0
    assert main([str(tmp_path / "base"), str(tmp_path / "new"), "--fail-above", "1.1"]) == 1


def test_rows_without_samples_are_compared_but_never_flagged(tmp_path, capsys):
    old = _table({"pack": [10.0] * 5}).drop(columns=["time_us_samples"])
    results.write(old.to_dict("records"), tmp_path / "base" / results.FILENAME)
    results.write(_table({"pack": [20.0] * 5}).to_dict("records"), tmp_path / "new" / results.FILENAME)
    assert main([str(tmp_path / "base"), str(tmp_path / "new"), "--fail-above", "1.1"]) == 0
    out = capsys.readouterr().out
    assert "| 10.0 | 20.0 | 2.00x | no samples |  |" in out


@pytest.mark.parametrize("args,line", [
    (["--fail-above", "0.9"], "--fail-above=0.9 is not accepted; a ratio above 1, e.g. 1.1"),
    (["--fail-above", "x"], "--fail-above=x is not accepted; a ratio above 1"),
    (["--alpha", "1"], "--alpha=1 is not accepted; a significance level between 0 and 1"),
    (["--min-change", "-0.1"], "--min-change=-0.1 is not accepted; a relative change >= 0"),
])
def test_bad_options_are_one_line(args, line, tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"moebench.compare: error: {line}"), err


def test_no_tables_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "moebench.compare: error: no results at" in err
