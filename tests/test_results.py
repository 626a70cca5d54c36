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
