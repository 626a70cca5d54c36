"""moebench.report: the leaderboard, the figures and report.md over a real CPU sweep and
hand-made tables (failures, a moe_layer bench, several impls / shapes / capacity factors), and
empty data. tests/test_report_figures.py checks the figures over two cards and timing modes."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moebench import report, results

pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parent.parent
SWEEP_ARGS = ["-m", "bench=routing,capacity,topk", "logits=uniform,zipf", "shape=tiny",
              "timing.repeats=3", "timing.warmup=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_sweep(dest: Path) -> Path:
    """Run the real runner on the CPU: 6 jobs (routing, capacity, topk × uniform, zipf)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "run.py", *SWEEP_ARGS, f"hydra.sweep.dir={dest}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(results.find(dest)) == 6, list(dest.rglob("*"))
    return dest


_SHARED: dict = {}


def shared_sweep(tmp_path_factory) -> Path:
    """The CPU sweep, made once per test session (tests/test_notebook.py uses it too)."""
    if "sweep" not in _SHARED:
        _SHARED["sweep"] = make_sweep(tmp_path_factory.mktemp("cpu_sweep") / "sweep")
    return _SHARED["sweep"]


@pytest.fixture(scope="session")
def cpu_sweep(tmp_path_factory) -> Path:
    return shared_sweep(tmp_path_factory)


def row(**kw) -> dict:
    base = {"bench": "pack", "stage": "pack", "impl": "torch", "stage_impl": "torch", "shape_name": "seed",
            "tokens": 16384, "hidden": 4096, "experts": 128, "topk": 2, "dtype": "bfloat16", "device": "cuda",
            "router": "softmax_topk", "logits": "uniform", "capacity": "dropless", "capacity_factor": float("nan"),
            "capacity_per_expert": None, "status": "ok", "message": "", "time_us_median": 100.0,
            "time_us_p10": 95.0, "time_us_p90": 110.0, "bw_GBps_strict": 2000.0, "copy_GBps": 3000.0,
            "pct_of_copy": 66.7, "avg_drop_rate": 0.0, "token_drop_rate": 0.0, "load_max_over_mean": 1.1,
            "expert_counts": [256] * 128, "gpu_name": "NVIDIA H100 80GB HBM3", "torch_version": "2.13.0",
            "timing_mode": "events"}
    return {**base, **kw}


def hand_frame() -> pd.DataFrame:
    """A GPU-like sweep: three impls and two shapes, top-k over E and k, capacity factors per
    distribution, a moe_layer bench, and one failing row of each kind."""
    rows = []
    for shape, (T, H, E, k) in {"seed": (16384, 4096, 128, 2), "deepseek_v3": (16384, 7168, 256, 8)}.items():
        for impl, pct in (("torch", 40.0), ("compile", 60.0), ("cute", 92.0)):
            for stage in ("pack", "combine"):
                rows.append(row(bench=stage, stage=stage, impl=impl, stage_impl=impl, shape_name=shape, tokens=T,
                                hidden=H, experts=E, topk=k, pct_of_copy=pct + (5 if stage == "pack" else 0)))
    for impl in ("torch", "quack"):
        for E in (64, 128, 256):
            for k in (1, 2, 8):
                rows.append(row(bench="topk", stage="route", impl=impl, stage_impl=impl, shape_name="auto",
                                experts=E, topk=k, time_us_median=(5 if impl == "quack" else 20) + E * k / 50,
                                pct_of_copy=10.0))
    for logits, skew in (("uniform", 0.0), ("zipf", 0.3), ("hot", 0.6)):
        for cf in (1.0, 1.1, 1.25, 1.5):
            drop = max(0.0, skew - (cf - 1) * 0.4) + (0.02 if cf < 1.1 else 0.0)
            rows.append(row(bench="capacity", stage="total", impl="torch", logits=logits, capacity=f"cf={cf}",
                            capacity_factor=cf, capacity_per_expert=int(256 * cf), avg_drop_rate=drop,
                            token_drop_rate=drop / 3, load_max_over_mean=1 + 3 * skew,
                            expert_counts=[int(256 * (1 + 3 * skew))] + [250] * 127))
    for impl, ffn in (("torch", 900.0), ("cute", 700.0)):
        parts = {"route": 20.0, "pack": 60.0, "expert_ffn": ffn, "combine": 50.0}
        for stage, t in parts.items():
            rows.append(row(bench="moe_layer", stage=stage, impl=impl, stage_impl=impl, time_us_median=t))
        rows.append(row(bench="moe_layer", stage="total", impl=impl, time_us_median=sum(parts.values()) * 1.05,
                        stage_impl=",".join(f"{s}={impl}" for s in parts)))
    for pack_impl in ("torch", "cute"):  # bench=routing impl=torch [impl_pack=cute]
        for stage, t in {"route": 30.0, "metadata": 25.0, "pack": 80.0 if pack_impl == "torch" else 40.0,
                         "combine": 70.0, "total": 0.0}.items():
            rows.append(row(bench="routing", stage=stage, impl="torch", impl_pack=pack_impl,
                            stage_impl=pack_impl if stage == "pack" else "torch",
                            time_us_median=t or (205.0 if pack_impl == "torch" else 170.0)))
    nan = float("nan")
    fails = [("unsupported", "quack", "quack needs sm_90 (found cpu)"),
             ("mismatch", "cute", "pack: 12 of 4096 rows differ | max abs err 3.5"),
             ("error", "compile", "RuntimeError: boom")]
    for status, impl, msg in fails:
        rows.append(row(status=status, impl=impl, stage_impl=impl, message=msg, time_us_median=nan,
                        pct_of_copy=nan, bw_GBps_strict=nan))
    return pd.DataFrame(rows)


def hand_sweep(dest: Path) -> Path:
    """The hand-made rows written as a job table, read back like a real one."""
    df = hand_frame()
    df = df[[c for c in df.columns if c in results.COLUMNS]].astype(object)
    rows = df.where(df.notna(), None).to_dict("records")
    results.write(rows, dest / results.FILENAME)
    return dest


# -- the figure functions ---------------------------------------------------------------

EMPTIES = {
    "no frame": pd.DataFrame(),
    "no rows": pd.DataFrame(columns=results.COLUMNS),
    "only failures": hand_frame().query("status != 'ok'").assign(capacity_factor=float("nan"),
                                                                 expert_counts=None),
}


@pytest.mark.parametrize("case", list(EMPTIES))
@pytest.mark.parametrize("name", list(report.FIGURES))
def test_figures_are_none_without_data(name, case):
    assert report.FIGURES[name](EMPTIES[case]) is None


@pytest.mark.parametrize("name", list(report.FIGURES))
def test_figures_draw_hand_made_rows(name):
    fig = report.FIGURES[name](hand_frame())
    assert fig is not None and fig.axes
    assert report.png_bytes(fig).startswith(PNG_MAGIC)


def test_bandwidth_has_one_axis_per_stage_and_the_100_percent_line():
    fig = report.fig_bandwidth(hand_frame())
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert sorted(ax.get_title().split(" · ")[0] for ax in panels) == ["combine", "pack"]  # not route: latency
    for ax in panels:
        assert any(list(line.get_xdata()) == [100.0, 100.0] for line in ax.get_lines())
        assert [t.get_text().split("\n")[0] for t in ax.get_yticklabels()] == [
            "deepseek_v3 T16384 H7168 E256 k8", "seed T16384 H4096 E128 k2"]


def test_latency_draws_top_k_against_e_on_a_log_axis():
    fig = report.fig_latency(hand_frame())
    route = next(ax for ax in fig.axes if ax.get_visible() and ax.get_title().startswith("route "))
    assert route.get_yscale() == "log" and route.get_xlabel() == "experts E"
    # one line per implementation and k: the top-k rows' torch and quack, k = 1, 2, 8, over E;
    # and the moe_layer's cute route, one point (E128, k2)
    lines = [ln for ln in route.get_lines() if ln.get_gid() != "limit" and len(ln.get_xdata())]
    assert sorted(len(ln.get_xdata()) for ln in lines) == [1, 3, 3, 3, 3, 3, 3]
    assert all(list(ln.get_xdata()) == [64, 128, 256] for ln in lines if len(ln.get_xdata()) == 3)


def test_expert_load_for_a_chosen_row_and_the_default_choice():
    df = hand_frame()
    i = df.index[(df.logits == "hot") & (df.capacity_factor == 1.25)][0]
    fig = report.fig_expert_load(df, row=i)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 1
    assert f"row {i}" in fig.axes[0].get_title()
    # default: the most imbalanced row of each distribution
    assert len([ax for ax in report.fig_expert_load(df).axes if ax.get_visible()]) == 3
    assert report.fig_expert_load(df, row=10**6) is None


def test_failures_lists_every_non_ok_row():
    f = report.failures(hand_frame())
    assert sorted(f.status) == ["error", "mismatch", "unsupported"]
    assert "quack needs sm_90 (found cpu)" in set(f.message)
    assert report.failures(pd.DataFrame()).empty


def test_moe_layer_needs_its_bench(cpu_sweep):
    df = results.load(cpu_sweep)
    assert report.fig_moe_layer(df) is None
    assert report.fig_moe_layer(hand_frame()) is not None


# -- the command ------------------------------------------------------------------------

def test_report_on_a_cpu_sweep(cpu_sweep, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "moebench.report", str(cpu_sweep), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert str(out.resolve()) in proc.stdout
    for name in ("bandwidth", "latency", "capacity", "expert_load"):
        png = out / f"{name}.png"
        assert png.stat().st_size > 5000 and png.read_bytes().startswith(PNG_MAGIC), name
        assert f"]({name}.png)" in (out / "report.md").read_text()
    assert not (out / "moe_layer.png").exists()
    md = (out / "report.md").read_text()
    assert f"no rows for {report.WHAT['moe_layer']}" in md
    # the leaderboard, printed and in report.md: the CPU's, wall clock, torch alone on tiny
    assert "== CPU · wall (wall clock):" in proc.stdout
    assert "## Leaderboard" in md and "### CPU · wall (wall clock):" in md
    pack = next(ln for ln in md.splitlines() if ln.startswith("| pack | tiny T512 H256 E8 k2 |"))
    assert "| torch |" in pack and "% copy |" in pack
    for bench in ("routing", "capacity", "topk"):
        assert f"### {bench}" in md
    assert "None: every row is ok." in md


def test_report_lists_failures_and_defaults_next_to_the_sweep(tmp_path):
    sweep = hand_sweep(tmp_path / "hand")
    assert report.main([str(sweep)]) == 0  # default --out: the sweep folder itself
    md = (sweep / "report.md").read_text()
    assert "## Failures" in md
    for status, msg in (("unsupported", "quack needs sm_90 (found cpu)"), ("error", "RuntimeError: boom"),
                        ("mismatch", "12 of 4096 rows differ \\| max abs err 3.5")):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {status} |"))
        assert msg in line
    for name in report.FIGURES:  # every figure has data here, moe_layer included
        assert (sweep / f"{name}.png").stat().st_size > 5000, name
    # a results file or a glob as PATH: next to it
    assert report.default_out([str(sweep / results.FILENAME)]) == sweep
    assert report.default_out([f"{tmp_path}/**/*.parquet"]) == tmp_path


def test_report_on_nothing_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing")]) == 2
    assert "no results at" in capsys.readouterr().err


SAMPLE = REPO / "runs" / "sample"


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="runs/sample (the committed GPU sample) is not here")
def test_report_on_the_committed_sample(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moebench.report", str(SAMPLE), "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in report.FIGURES:  # the sample has rows for every figure
        assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name
    # both cards, each timing mode apart; the CPU capacity grid's times not ranked beside them
    for facet in ("NVIDIA H200 · events", "NVIDIA H200 · graph", "NVIDIA H100 80GB HBM3 · events",
                  "NVIDIA H100 80GB HBM3 · graph", "NVIDIA H100 80GB HBM3 · rotated"):
        assert f"== {facet} (" in proc.stdout, facet
    assert "== CPU" not in proc.stdout and "ok CPU rows are neither ranked nor drawn" in proc.stdout
    md = (tmp_path / "report.md").read_text()
    assert "## Leaderboard" in md and md.index("## Leaderboard") < md.index("## Figures")


def test_report_without_matplotlib_names_the_extra(tmp_path):
    """Without the notebook extra: one line saying which extra to install, exit 2."""
    hide = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.argv = ['moebench.report', sys.argv[1]]; "
            "runpy.run_module('moebench.report', run_name='__main__', alter_sys=True)")
    p = subprocess.run([sys.executable, "-c", hide, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == ("moebench.report: error: the figures need matplotlib, which the notebook extra installs: "
                        "pip install -e '.[notebook]'\n")
