"""The runner end to end on the CPU: composition, the job, its table, bad input."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from moebench import results
from moebench.app import JobFailed, run_job
from moebench.config import ConfigError, compose, options, resolve

REPO = Path(__file__).resolve().parent.parent
FAST = ["timing.warmup=1", "timing.repeats=3"]


def cfg_of(*overrides):
    return compose(overrides)


def run(*overrides, tmp):
    return run_job(cfg_of("shape=tiny", *FAST, *overrides), tmp)


GROUPS = ["bench", "impl", "shape", "router", "logits", "capacity", "timing"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes_and_resolves(group, tmp_path):
    opts = options(group)
    assert opts, group
    trace = tmp_path / "trace.pt"
    torch.save(torch.randn(16, 8), trace)
    for opt in opts:
        extra = []
        if group == "logits" and opt == "from_file":
            extra = [f"logits.path={trace}"]
        if group == "bench" and opt == "capacity":
            extra = []
        cfg = cfg_of(f"{group}={opt}", *extra)
        if group == "router" and opt == "group_limited":
            cfg = cfg_of(f"{group}={opt}", "experts=16", "topk=2")
        if group == "capacity" and opt != "dropless":
            assert cfg.capacity.cf is not None
        job = resolve(cfg)
        assert job.tokens > 0 and 1 <= job.topk <= job.experts


def test_shape_presets_match_published_configs():
    want = {"seed": (16384, 4096, 128, 2), "mixtral_8x7b": (16384, 4096, 8, 2),
            "qwen3_30b_a3b": (16384, 2048, 128, 8), "deepseek_v3": (16384, 7168, 256, 8),
            "deepseek_v2": (16384, 5120, 160, 6), "olmoe_1b_7b": (16384, 2048, 64, 8),
            "gpt_oss_120b": (16384, 2880, 128, 4), "kimi_k2": (16384, 7168, 384, 8),
            "deepseek_v3_decode": (16, 7168, 256, 8), "qwen3_30b_a3b_decode": (16, 2048, 128, 8),
            "gpt_oss_120b_decode": (16, 2880, 128, 4)}
    for name, dims in want.items():
        job = resolve(cfg_of(f"shape={name}"))
        assert (job.tokens, job.hidden, job.experts, job.topk) == dims, name
    # command-line keys override the preset
    job = resolve(cfg_of("shape=deepseek_v3", "tokens=128", "topk=4"))
    assert (job.tokens, job.hidden, job.experts, job.topk) == (128, 7168, 256, 4)


def test_auto_shape_is_tiny_on_cpu_and_top1_sets_topk():
    job = resolve(cfg_of())
    assert job.shape == "tiny" and job.device.type == "cpu" and job.bench == "routing"
    assert resolve(cfg_of("router=top1")).topk == 1
    with pytest.raises(ConfigError, match="topk=2"):
        resolve(cfg_of("router=top1", "topk=2"))


def test_job_writes_schema_table(tmp_path):
    df = run(tmp=tmp_path)
    path = tmp_path / "results.parquet"
    assert path.is_file() and not list(tmp_path.glob(".results-*"))
    schema = pq.read_schema(path)
    assert schema.names[: len(results.COLUMNS)] == results.COLUMNS
    assert any(n.startswith("cfg.router.name") for n in schema.names)
    assert list(df.stage) == ["route", "metadata", "pack", "combine", "total"]
    assert (df.status == "ok").all(), df.message.tolist()
    for col in ("time_us_median", "time_us_p10", "time_us_p90", "bw_GBps_strict", "bw_GiBps_strict",
                "pct_of_copy", "copy_GBps", "tokens_per_s", "first_call_ms", "load_cv"):
        assert df[col].notna().all() and (df[col] > 0).all(), col
    row = df.set_index("stage").loc["pack"]
    T, H, k = row.tokens, row.hidden, row.topk
    assert row.bytes_strict == (1 + k) * H * 2 * T and row.bytes_per_token_strict == (1 + k) * H * 2
    assert df.set_index("stage").loc["total"].bytes_strict == (2 + 2 * k) * H * 2 * T
    assert row.bw_GiBps_strict == pytest.approx(row.bw_GBps_strict * 1e9 / 2**30)
    assert row.pct_of_copy == pytest.approx(100 * row.bw_GBps_strict / row.copy_GBps)
    assert sum(row.expert_counts) == T * k and len(row.expert_counts) == row.experts
    assert (df.timing_mode == "wall").all() and (df.device == "cpu").all()
    assert df.time_us_p10.le(df.time_us_median).all() and df.time_us_median.le(df.time_us_p90).all()
    for col in ("torch_version", "host", "cutlass_dsl_version"):
        assert df[col].str.len().gt(0).all(), col
    assert df.timestamp_utc.notna().all()


def test_each_stage_records_its_implementation(tmp_path):
    df = run("impl_pack=compile", "bench=capacity", tmp=tmp_path)
    by = df.set_index("stage")
    assert by.loc["pack"].stage_impl == "compile" and by.loc["combine"].stage_impl == "torch"
    assert by.loc["total"].stage_impl == "metadata=torch,pack=compile,combine=torch"
    assert (df.impl_pack == "compile").all() and (df.impl_combine == "torch").all()


def test_missing_stage_is_an_unsupported_row_naming_it(tmp_path):
    df = run("impl._target_=moebench.impls.base.Impl", "impl.name=bare", tmp=tmp_path)
    assert (df.status == "unsupported").all()
    by = df.set_index("stage")
    assert by.loc["route"].message == "unsupported: impl=bare has no route stage"
    assert by.loc["pack"].message == "unsupported: impl=bare has no pack stage"
    assert "has no route stage" in by.loc["total"].message
    assert df.time_us_median.isna().all()


def test_gpu_only_impl_is_unsupported_on_cpu_not_replaced(tmp_path):
    df = run("bench=pack", "impl=cute", tmp=tmp_path)
    assert df.status.tolist() == ["unsupported"]
    assert "cuda" in df.message[0] and df.time_us_median.isna().all()


@pytest.mark.parametrize("impl,stage,what", [("SkipsLastRow", "pack", "unwritten"),
                                             ("SwapsExperts", "route", "expert ids")])
def test_wrong_result_is_a_mismatch_row_and_not_timed(tmp_path, impl, stage, what):
    bench = {"pack": "pack", "route": "topk"}[stage]
    if bench == "pack":  # its one row fails: the job fails, its table is written
        with pytest.raises(JobFailed, match="every row of bench=pack failed"):
            run(f"bench={bench}", f"impl._target_=fake_impls.{impl}", f"impl.name={impl}", tmp=tmp_path)
    else:  # the route row fails, the select row (the selection alone) is right
        run(f"bench={bench}", f"impl._target_=fake_impls.{impl}", f"impl.name={impl}", tmp=tmp_path)
    df = results.load(tmp_path).set_index("stage")
    row = df.loc[stage]
    assert row.status == "mismatch", row.message
    assert what in row.message and row.message.startswith("mismatch: ")
    assert row.time_us_median != row.time_us_median


def _run_py(*args, cwd=REPO, timeout=300):
    return subprocess.run([sys.executable, "run.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_run_py_default_job_end_to_end(tmp_path):
    p = _run_py(f"hydra.run.dir={tmp_path}", *FAST)
    assert p.returncode == 0, p.stderr
    df = results.load(tmp_path)
    assert set(df.stage) == {"route", "metadata", "pack", "combine", "total"}
    assert (df.status == "ok").all() and (df.shape_name == "tiny").all()
    assert "pct_of_copy" in p.stdout or "%copy" in p.stdout


@pytest.mark.slow
def test_multirun_writes_one_table_per_job_and_load_reads_them(tmp_path):
    p = _run_py("-m", "topk=1,2", "experts=4,8", "shape=tiny", f"hydra.sweep.dir={tmp_path}", *FAST)
    assert p.returncode == 0, p.stderr
    files = sorted(tmp_path.rglob("results.parquet"))
    assert len(files) == 4
    df = results.load(tmp_path)
    assert df.output_dir.nunique() == 4 and sorted(df.job_num.unique()) == [0, 1, 2, 3]
    assert set(zip(df.topk, df.experts)) == {(1, 4), (1, 8), (2, 4), (2, 8)}
    assert (df.sweep_dir == str(tmp_path)).all()
    # the same files read with plain pandas and with DuckDB
    assert len(pd.read_parquet([str(f) for f in files])) == len(df)
    duckdb = pytest.importorskip("duckdb")
    n = duckdb.connect().execute(
        f"select count(*) from read_parquet('{tmp_path}/**/*.parquet', union_by_name=true)").fetchone()[0]
    assert n == len(df)


@pytest.mark.slow
def test_multirun_with_a_bad_point_runs_nothing(tmp_path):
    """Every point of a sweep is checked before the first job measures anything."""
    p = _run_py("-m", "topk=2,9", "shape=tiny", f"hydra.sweep.dir={tmp_path}", *FAST)
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("moebench: error: topk=9 is not accepted with experts=8")
    assert "(sweep job: topk=9 " in lines[0]
    assert not list(tmp_path.rglob("results.parquet"))


def _run_py_fakes(*args, timeout=300):
    """run.py with the deliberately wrong implementations of tests/fake_impls.py importable."""
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_a_job_whose_rows_all_fail_writes_its_table_and_exits_nonzero(tmp_path):
    p = _run_py_fakes("bench=pack", "impl._target_=fake_impls.SkipsLastRow", "impl.name=skips",
                      f"hydra.run.dir={tmp_path}", *FAST)
    assert p.returncode == 1, p.stderr
    assert "moebench: every row of bench=pack failed (mismatch)" in p.stderr
    df = results.load(tmp_path)
    assert df.status.tolist() == ["mismatch"] and df.time_us_median.isna().all()


@pytest.mark.slow
def test_multirun_failing_job_does_not_stop_the_others(tmp_path):
    p = _run_py_fakes("-m", "bench=pack,combine", "impl._target_=fake_impls.SkipsLastRow", "impl.name=skips",
                      f"hydra.sweep.dir={tmp_path}", *FAST)
    assert p.returncode != 0
    assert "every row of bench=pack failed (mismatch)" in p.stderr
    df = results.load(tmp_path)  # both tables: the failed job's and the one after it
    assert sorted(df.bench) == ["combine", "pack"]
    assert df.set_index("bench").status.to_dict() == {"pack": "mismatch", "combine": "ok"}


BAD = [
    (["shape=foo"], "shape=foo is not a known shape; accepted: auto,"),
    (["bench=nope"], "bench=nope is not a known bench"),
    (["impl=fast"], "impl=fast is not a known impl"),
    (["tokens=0"], "tokens=0 is not accepted"),
    (["tokens=-5"], "tokens=-5 is not accepted"),
    (["topk=9", "experts=8"], "topk=9 is not accepted with experts=8"),
    (["dtype=int8"], "dtype='int8' is not accepted; accepted: bfloat16, float16, float32"),
    (["device=cuda"], "device=cuda but no CUDA GPU"),
    (["device=tpu"], "device='tpu' is not accepted; accepted: auto, cuda, cpu"),
    (["capacity.cf=-1"], "capacity.cf=-1 is not accepted"),
    (["capacity.drop_policy=random", "capacity.cf=1"], "capacity.drop_policy='random' is not accepted"),
    (["timing.mode=ncu"], "timing.mode='ncu' is not accepted"),
    (["impl_pack=nope"], "impl_pack='nope' is not accepted"),
    # unknown keys, wrong types and out-of-range values of the typed configs (moebench/config.py)
    (["+unknown_key=1"], "unknown_key=1 is not a moebench option; accepted: impl, router, logits,"),
    (["impl=cute", "impl.threads=100"], "impl.threads=100 is not accepted; accepted: 128, 256, 512, 1024"),
    (["impl=compile", "impl.mode=fast"], "impl.mode='fast' is not accepted; accepted: default, reduce-overhead,"),
    (["logits=zipf", "logits.alpha=-2"], "logits.alpha=-2 is not accepted; a number >= 0"),
    (["timing.repeats=0"], "timing.repeats=0 is not accepted; an integer >= 1"),
    (["timing.warmup=x"], "timing.warmup=x is not accepted; an integer"),
    (["+bench.foo=1"], "bench.foo=1 is not a moebench option of bench=routing; accepted: name, weighted"),
    (["impl.threads=256"], "impl.threads=256 is not an option of impl=torch; accepted: _target_, name"),
    (["router=softmax_topk", "router.temperature=2"],
     "router.temperature=2 is not an option of router=softmax_topk; accepted: name, renormalize"),
    (["bench=moe_layer", "bench.quack_tuned=maybe"], "bench.quack_tuned=maybe is not accepted; accepted: true, false"),
    (["world_size=2"], "world_size=2 is not accepted with bench=routing"),
    (["logits=from_file", "logits.path=/no/such/trace.pt"], "logits.path='/no/such/trace.pt' is not a file"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args,msg", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, msg):
    if args == ["device=cuda"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is visible")
    p = _run_py(*args, f"hydra.run.dir={tmp_path}", timeout=120)
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("moebench: error: "), p.stderr
    assert msg in lines[0]
    assert not list(tmp_path.rglob("*.parquet"))


def test_bad_input_leaves_existing_results_alone(tmp_path):
    run(tmp=tmp_path)
    before = (tmp_path / "results.parquet").read_bytes()
    with pytest.raises(ConfigError):
        run("tokens=0", tmp=tmp_path)
    assert (tmp_path / "results.parquet").read_bytes() == before


def test_capacity_strict_bytes_count_only_tokens_that_are_read(tmp_path):
    df = run("bench=capacity", "capacity.cf=0.5", "logits=zipf", tmp=tmp_path).set_index("stage")
    pack, comb = df.loc["pack"], df.loc["combine"]
    assert pack.token_drop_rate > 0
    T, H, b = pack.tokens, pack.hidden, 2
    rows = pack.experts * pack.capacity_per_expert
    read = T - round(pack.token_drop_rate * T)
    assert pack.bytes_strict == (read + min(rows, T * pack.topk)) * H * b
    assert comb.bytes_strict == (pack.kept_assignments + T) * H * b
    assert df.loc["total"].bytes_strict == pack.bytes_strict + comb.bytes_strict


def test_rotated_calls_read_their_own_input_copies_and_restore_the_inputs():
    from moebench.benches.stages import PACK, make_inputs, rotated_calls
    from moebench.timing import ROTATE_BYTES, rotations

    inp = make_inputs(resolve(cfg_of("shape=tiny", "tokens=64")))
    orig = (inp.logits, inp.x, inp.meta)
    seen = []
    rotation = rotated_calls(lambda: seen.append((inp.logits, inp.x, inp.meta)), inp, PACK.reads)
    calls = rotation.calls
    copy_bytes = inp.x.numel() * inp.x.element_size() + sum(
        t.numel() * t.element_size() for t in (inp.meta.counts, inp.meta.offsets, inp.meta.gather_idx,
                                                inp.meta.scatter_idx, inp.meta.weights, inp.meta.routed_counts))
    assert len(calls) == rotations(copy_bytes) and rotation.bytes == len(calls) * copy_bytes
    for c in calls:
        c()
    assert (inp.logits, inp.x, inp.meta) == orig  # restored after every call
    xs = [x for _, x, _ in seen]
    metas = [m for _, _, m in seen]
    assert len({x.data_ptr() for x in xs} | {orig[1].data_ptr()}) == len(calls) + 1  # all distinct buffers
    assert all(torch.equal(x, orig[1]) for x in xs)
    assert all(torch.equal(m.gather_idx, orig[2].gather_idx) and m.gather_idx.data_ptr() != orig[2].gather_idx.data_ptr()
               for m in metas)
    assert all(lg is orig[0] for lg, _, _ in seen)  # pack does not read the logits: not copied
    assert rotations(1) == 64 and rotations(ROTATE_BYTES) == 2 and rotations(ROTATE_BYTES // 4) == 4


def test_rotated_timing_on_cpu_is_the_wall_clock(tmp_path):
    df = run("timing=rotated", tmp=tmp_path)
    assert (df.status == "ok").all(), df.message.tolist()
    assert (df.timing_mode == "wall").all()
