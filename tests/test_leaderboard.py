"""The leaderboard against a case computed by hand, what it ranks (ok rows, one card, one
timing mode and direction at a time) and what not, and the stage classification it uses."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from moebench.report import STAGE_KINDS, leaderboard, leaderboard_markdown, leaderboard_text, stage_kind
from moebench.report.cases import cpu_rows_left_out, impl_name

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
NAN = float("nan")


def row(**kw) -> dict:
    base = {"bench": "pack", "stage": "pack", "impl": "torch", "stage_impl": "torch", "shape_name": "seed",
            "tokens": 16384, "hidden": 4096, "experts": 128, "topk": 2, "dtype": "bfloat16", "device": "cuda",
            "router": "softmax_topk", "logits": "uniform", "capacity": "dropless", "timing_mode": "events",
            "status": "ok", "message": "", "time_us_median": 100.0, "pct_of_copy": 50.0, "gpu_name": H200}
    return {**base, **kw}


def hand_case() -> pd.DataFrame:
    """pack on the H200 with events: cute twice (the faster run counts), compile, torch, and a
    quack and a sonic row that are not ok; the same case timed rotated and on an H100 (ranked
    apart), a route case (latency-bound: no limit), and a CPU row (not ranked beside cards)."""
    rows = [
        row(stage_impl="cute", impl="cute", time_us_median=120.0, pct_of_copy=75.0),
        row(stage_impl="cute", impl="cute", time_us_median=100.0, pct_of_copy=90.0, bench="routing"),
        row(stage_impl="compile", impl="compile", time_us_median=130.0, pct_of_copy=69.0),
        row(stage_impl="torch", impl="torch", time_us_median=250.0, pct_of_copy=36.0),
        row(stage_impl="quack", impl="quack", status="unsupported", time_us_median=NAN, pct_of_copy=NAN),
        row(stage_impl="sonic", impl="sonic", status="mismatch", time_us_median=10.0, pct_of_copy=900.0),
        # the same case, rotated: torch wins there
        row(stage_impl="cute", impl="cute", timing_mode="rotated", time_us_median=80.0),
        row(stage_impl="torch", impl="torch", timing_mode="rotated", time_us_median=40.0),
        # the same case on another card
        row(stage_impl="torch", impl="torch", gpu_name=H100, time_us_median=300.0),
        # a latency-bound stage: no limit, whatever its pct_of_copy
        row(bench="topk", stage="route", stage_impl="quack", impl="quack", time_us_median=20.0, pct_of_copy=5.0),
        row(bench="topk", stage="route", stage_impl="torch", impl="torch", time_us_median=70.0, pct_of_copy=1.4),
        # a CPU row: wall clock, not ranked while there are GPU rows
        row(stage_impl="torch", impl="torch", gpu_name="", device="cpu", timing_mode="wall", time_us_median=9e4),
    ]
    return pd.DataFrame(rows)


def case(lb, **kw):
    m = pd.Series(True, index=lb.index)
    for k, v in kw.items():
        m &= lb[k] == v
    assert m.sum() == 1, (kw, lb[m])
    return lb[m].iloc[0]


def test_the_winner_and_its_ratios_match_the_hand_computed_case():
    lb = leaderboard(hand_case())
    r = case(lb, card=H200, timing="events", stage="pack")
    assert r["fastest"] == "cute" and r["us"] == 100.0
    assert r["limit"] == "copy" and r["pct_of_limit"] == 90.0  # the winning row's, not its other run's
    assert r["runner_up"] == "compile" and r["runner_up_ratio"] == pytest.approx(1.3)
    assert r["ratios"] == pytest.approx({"compile": 1.3, "torch": 2.5})
    assert list(r["ratios"]) == ["compile", "torch"]  # fastest first
    assert r["entrants"] == 3 and r["rows"] == 4  # quack (unsupported) and sonic (mismatch) are not ranked
    assert r["direction"] == "fwd"  # no direction column: forward


def test_each_timing_mode_and_card_is_ranked_apart():
    lb = leaderboard(hand_case())
    rot = case(lb, card=H200, timing="rotated", stage="pack")
    assert rot["fastest"] == "torch" and rot["ratios"] == pytest.approx({"cute": 2.0})
    h100 = case(lb, card=H100, stage="pack")
    assert h100["fastest"] == "torch" and h100["entrants"] == 1 and h100["runner_up"] == ""
    assert math.isnan(h100["runner_up_ratio"])
    assert set(zip(lb["card"], lb["timing"])) == {(H200, "events"), (H200, "rotated"), (H100, "events")}


def test_latency_bound_stages_have_no_limit():
    r = case(leaderboard(hand_case()), card=H200, timing="events", stage="route")
    assert r["kind"] == "latency" and r["limit"] == "" and math.isnan(r["pct_of_limit"])
    assert r["fastest"] == "quack" and r["ratios"] == pytest.approx({"torch": 3.5})


def test_cpu_rows_are_ranked_only_without_gpu_rows():
    df = hand_case()
    assert "CPU" not in set(leaderboard(df)["card"]) and cpu_rows_left_out(df) == 1
    cpu = df[df["gpu_name"] == ""]
    lb = leaderboard(cpu)
    assert list(lb["card"]) == ["CPU"] and lb["timing"].iloc[0] == "wall" and cpu_rows_left_out(cpu) == 0


def test_a_direction_column_splits_cases():
    df = pd.concat([hand_case(), pd.DataFrame([row(stage_impl="cute", impl="cute", direction="bwd",
                                                   time_us_median=300.0)])], ignore_index=True)
    lb = leaderboard(df)
    assert case(lb, card=H200, timing="events", stage="pack", direction="fwd")["fastest"] == "cute"
    bwd = case(lb, card=H200, timing="events", stage="pack", direction="bwd")
    assert bwd["us"] == 300.0 and bwd["entrants"] == 1
    assert "direction" in leaderboard_markdown(lb)


def test_routing_variants_and_chains_are_separate_cases():
    df = pd.DataFrame([
        row(stage_impl="cute", impl="cute", time_us_median=100.0),
        row(stage_impl="torch", impl="torch", capacity="cf=1.25", capacity_factor=1.25, time_us_median=90.0),
        row(bench="routing", stage="total", stage_impl="route=torch,metadata=cute,pack=cute,combine=cute",
            time_us_median=500.0),
        row(bench="capacity", stage="total", stage_impl="metadata=torch,pack=torch,combine=torch",
            time_us_median=400.0),
        row(bench="moe_layer", stage="dense_gemm", time_us_median=1.0),  # a ceiling: never ranked
    ])
    lb = leaderboard(df)
    assert sorted(lb["stage"]) == ["capacity total", "pack", "pack", "routing total"]
    assert case(lb, stage="routing total")["fastest"] == "cute (route=torch)"
    assert case(lb, stage="capacity total")["fastest"] == "torch"


def test_markdown_and_text_show_one_table_per_card_and_timing_mode():
    lb = leaderboard(hand_case())
    md = leaderboard_markdown(lb)
    assert md.count("\n### ") == 3 and "### NVIDIA H200 · events (CUDA events, L2 flushed): 2 cases" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| pack |") and "compile 1.30×" in ln)
    assert "| cute | 100.0 | 90 % copy | compile 1.30× | torch 2.50× |" in line
    per_card = leaderboard_markdown(lb, per_card=True)
    assert per_card.count("\n### ") == 2 and "### NVIDIA H200: 3 cases" in per_card
    assert "| rotated | pack | seed T16384 H4096 E128 k2 | bf16 | torch | 40.0 | 50 % copy | cute 2.00× | — |" in per_card
    text = leaderboard_text(lb)
    assert text.count("== ") == 3 and "compile 1.30×" in text
    assert leaderboard_markdown(leaderboard(pd.DataFrame())) == "No ok, timed rows to rank."


@pytest.mark.parametrize("stage, has_bytes, kind", [
    ("route", True, "latency"), ("select", False, "latency"), ("metadata", True, "latency"),
    ("route_metadata", True, "latency"), ("pack", True, "bandwidth"), ("combine", False, "bandwidth"),
    ("pack_fp8", True, "bandwidth"), ("combine_bwd", True, "bandwidth"), ("route_bwd", True, "latency"),
    ("gather_backward", False, "bandwidth"), ("gemm1", False, "gemm"), ("total", True, "chain"),
    ("dense_gemm", False, "ceiling"), ("raw_a2a", False, "ceiling"),
    ("something_new", True, "bandwidth"), ("something_new", False, "latency"),
])
def test_stage_kinds(stage, has_bytes, kind):
    assert stage_kind(stage, has_bytes) == kind


def test_every_kind_in_the_table_is_one_the_report_knows():
    assert set(STAGE_KINDS.values()) == {"latency", "bandwidth", "gemm", "chain", "ceiling"}


@pytest.mark.parametrize("stage_impl, name", [
    ("torch", "torch"), ("route=torch,metadata=torch", "torch"),
    ("metadata=torch,pack=cute,combine=cute", "cute (metadata=torch)"),
    ("gate=torch,route=cute,metadata=cute,pack=cute,gemm=grouped_mm,combine=cute",
     "cute (gate=torch, gemm=grouped_mm)"),
])
def test_implementation_names(stage_impl, name):
    assert impl_name(stage_impl) == name


def test_the_layers_total_is_a_chain_shown_against_its_dense_gemm():
    """bench=moe_layer's total carries its % of the same job's dense GEMM (how rows of calls on
    a card whose speed moved, or of another Python stack, compare); other chains have no limit."""
    layer = dict(bench="moe_layer", stage="total", pct_of_copy=NAN, intermediate=768)
    df = pd.DataFrame([
        row(**layer, stage_impl="sonic:layer", impl="sonic", time_us_median=2286.0, pct_of_dense=76.8),
        row(**layer, stage_impl="route=cute,pack=cute,combine=cute", impl="cute", time_us_median=2235.0,
            pct_of_dense=75.8),
        row(bench="routing", stage="total", stage_impl="route=cute,pack=cute", pct_of_copy=NAN, time_us_median=9.0),
    ])
    lb = leaderboard(df)
    total = case(lb, stage="moe_layer total")
    assert total["fastest"] == "cute" and total["limit"] == "dense GEMM" and total["pct_of_limit"] == 75.8
    assert total["runner_up"] == "sonic:layer"
    assert case(lb, stage="routing total")["limit"] == "" and math.isnan(case(lb, stage="routing total")["pct_of_limit"])
    assert "| cute | 2,235 | 76 % dense GEMM | sonic:layer 1.02× |" in leaderboard_markdown(lb)
