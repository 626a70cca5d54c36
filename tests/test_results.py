"""The result tables: explicit schema, atomic writes, and a loader robust to sweeps."""

import pandas as pd
import pyarrow.parquet as pq
import pytest

from moebench import results


def _row(**kw):
    return {"bench": "pack", "stage": "pack", "status": "ok", "message": "", "time_us_median": 1.5,
            "expert_counts": [1, 2, 3], **kw}


def test_write_uses_the_explicit_schema(tmp_path):
    p = results.write([_row()], tmp_path / "results.parquet", {"cfg.router.name": "softmax_topk",
                                                               "cfg.capacity.cf": None, "cfg.seed": 17})
    schema = pq.read_schema(p)
    assert schema.names == results.COLUMNS + ["cfg.router.name", "cfg.capacity.cf", "cfg.seed"]
    assert str(schema.field("tokens").type) == "int64" and str(schema.field("expert_counts").type) in ("list<item: int64>", "list<element: int64>")
    assert str(schema.field("cfg.seed").type) == "int64"
    df = results.load(p)
    assert df.expert_counts[0].tolist() == [1, 2, 3] and df.status[0] == "ok"


def test_write_rejects_unknown_status_and_keeps_the_old_table(tmp_path):
    p = results.write([_row()], tmp_path / "results.parquet")
    before = p.read_bytes()
    with pytest.raises(ValueError, match="status 'fine'"):
        results.write([_row(status="fine")], p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["results.parquet"]


def test_load_sweeps_with_differing_columns_logs_and_globs(tmp_path):
    a = tmp_path / "sweep" / "0"
    b = tmp_path / "sweep" / "1"
    results.write([_row()], a / "results.parquet", {"cfg.a": 1})
    results.write([_row(stage="combine"), _row(stage="total")], b / "results.parquet", {"cfg.b": "x"})
    (a / "run.log").write_text("hydra log\n")
    (a / ".hydra").mkdir()
    (a / ".hydra" / "config.yaml").write_text("x: 1\n")
    df = results.load(tmp_path / "sweep")
    assert len(df) == 3 and df.source_file.nunique() == 2
    assert df["cfg.a"].notna().sum() == 1 and df["cfg.b"].notna().sum() == 2
    assert len(results.load(str(tmp_path / "sweep" / "*" / "*.parquet"))) == 3
    assert len(results.load([a, b / "results.parquet"])) == 3
    with pytest.raises(FileNotFoundError, match="no results at"):
        results.load(tmp_path / "nope")


def test_summary_is_compact():
    df = pd.DataFrame([{**_row(), "stage_impl": "torch", "message": "x" * 500, "bw_GBps_strict": 10.0,
                        "pct_of_copy": 5.0}])
    text = results.summary(df)
    assert "pack" in text and "x" * 61 not in text


def test_merge_compacts_a_sweep_into_one_table_load_reads(tmp_path):
    from moebench.app import run_job
    from moebench.config import compose

    for i, k in enumerate((1, 2)):
        run_job(compose(["shape=tiny", "bench=pack", f"topk={k}", "timing.repeats=2", "timing.warmup=0"]),
                tmp_path / "sweep" / str(i))
    before = results.load(tmp_path / "sweep")
    out = results.merge(tmp_path / "sweep", tmp_path / "merged" / "results.parquet")
    after = results.load(out)
    assert len(after) == len(before) == 2 and sorted(after.topk) == [1, 2]
    cols = [c for c in before.columns if c != "source_file"]
    pd.testing.assert_frame_equal(after[cols].sort_values("topk").reset_index(drop=True),
                                  before[cols].sort_values("topk").reset_index(drop=True))
    assert not list((tmp_path / "merged").glob(".results-*"))
    assert results.main(["merge", str(tmp_path / "nothing_here"), "--out", str(tmp_path / "x.parquet")]) == 2


def _every_option_composed():
    from moebench.config import compose, options

    for group in ("bench", "impl", "router", "logits", "capacity", "timing", "shape"):
        for opt in options(group):
            extra = {"group_limited": ["experts=16", "topk=2"], "from_file": ["logits.path=trace.pt"]}.get(opt, [])
            yield compose([f"{group}={opt}", *extra])


def test_a_config_key_has_one_column_type_in_every_job():
    """Typed by the schema, not the value: a null cf is a double column, an untyped leaf that
    holds 'auto' or true is a string column, in every option of every group."""
    seen: dict = {}
    for cfg in _every_option_composed():
        values, types = results.config_leaves(cfg)
        assert set(values) == set(types)
        for k, t in types.items():
            seen.setdefault(k, set()).add(str(t))
    mixed = {k: t for k, t in seen.items() if len(t) > 1}
    assert not mixed, mixed
    assert seen["cfg.capacity.cf"] == {"double"} and seen["cfg.tokens"] == {"int64"}
    assert seen["cfg.bench.fp32_reference"] == {"string"} and seen["cfg.impl.router_prefetch"] == {"bool"}


def test_duckdb_reads_every_bench_without_widening_config_columns(tmp_path):
    """Tables of every bench, whose configs differ in what is null (cf of a dropless job,
    world_size, quack_config) read with DuckDB's union_by_name: each cfg.* column keeps its type."""
    duckdb = pytest.importorskip("duckdb")
    from moebench.config import compose
    from moebench.runner import run_job

    fast = ["shape=tiny", "timing.warmup=1", "timing.repeats=2"]
    jobs = [["bench=pack"], ["bench=capacity", "capacity=cf", "capacity.cf=1.25"], ["bench=topk", "logits=zipf"],
            ["bench=routing", "router=sigmoid_bias", "impl=cute"], ["bench=combine", "bench.weighted=false"],
            ["bench=router"], ["bench=moe_layer", "bench.fp32_reference=true"], ["bench=ep_dispatch", "world_size=2"]]
    from moebench.benches import BENCHES

    assert {job[0].removeprefix("bench=") for job in jobs} == set(BENCHES)  # every bench's table
    types = {}
    for i, job in enumerate(jobs):
        cfg = compose([*fast, *job])
        run_job(cfg, tmp_path / str(i))
        types.update(results.config_leaves(cfg)[1])
    described = duckdb.connect().execute(
        f"describe select * from read_parquet('{tmp_path}/**/*.parquet', union_by_name=true)").fetchall()
    got = {name: kind for name, kind, *_ in described if name.startswith("cfg.")}
    want = {"int64": "BIGINT", "double": "DOUBLE", "bool": "BOOLEAN", "string": "VARCHAR"}
    assert got == {k: want[str(t)] for k, t in types.items() if not k.startswith("cfg.hydra.")}
    assert got["cfg.capacity.cf"] == "DOUBLE" and got["cfg.bench.weighted"] == "BOOLEAN"
    assert got["cfg.impl.router_prefetch"] == "BOOLEAN" and got["cfg.router.bias_std"] == "DOUBLE"
    assert got["cfg.world_size"] == "BIGINT" and got["cfg.bench.fp32_reference"] == "VARCHAR"
    n = duckdb.connect().execute(f"select count(*) from read_parquet('{tmp_path}/**/*.parquet', union_by_name=true)"
                                 " where \"cfg.capacity.cf\" = 1.25").fetchone()[0]
    assert n == len(results.load(tmp_path / "1"))
