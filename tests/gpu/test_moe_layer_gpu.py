"""bench=moe_layer on a GPU: every expert-GEMM path (torch loop, torch._grouped_mm, quack varlen,
gather-A, gated epilogue) checked against the torch implementation at a mid shape, with and
without a capacity, inside the job and directly; CUDA-graph timing; the layer's backward
(bench.direction) with impl=cute's routing backward and the grouped_mm / quack GEMM backward
(run with `pytest -m gpu`)."""

import pytest
import torch

from moebench.benches import moe_layer as ml
from moebench import routing
from moebench.app import run_job
from moebench.check import assert_close
from moebench.config import compose

pytestmark = pytest.mark.gpu

MID = ["tokens=2048", "hidden=1024", "intermediate=512", "experts=16", "topk=4", "timing.warmup=1",
       "timing.repeats=3"]
CAPS = {"dropless": [], "cf": ["capacity=cf", "capacity.cf=1.0"], "padded": ["capacity=padded"]}
#: rows a fused path does not measure on its own
FUSED = {"quack_gather": {"pack"}, "quack_gated": {"activation"}, "quack_gather_gated": {"pack", "activation"}}


def _skip_if_gated_epilogue_unavailable(message):
    if "gated epilogue cannot fingerprint" in str(message):
        pytest.skip(f"this installation: {message}")


def _run(tmp_path, *overrides):
    cfg = compose(["bench=moe_layer", *MID, *overrides])
    return run_job(cfg, tmp_path).set_index("stage")


@pytest.mark.parametrize("cap", list(CAPS))
@pytest.mark.parametrize("gemm", list(ml.GEMMS))
def test_every_gemm_path_checks_and_times_on_gpu(tmp_path, gemm, cap):
    df = _run(tmp_path, f"bench.gemm={gemm}", *CAPS[cap])
    _skip_if_gated_epilogue_unavailable(df.loc["gemm1", "message"])
    fused = FUSED.get(gemm, set())
    for stage, r in df.iterrows():
        if stage in fused:
            assert r.status == "unsupported" and "fused into gemm1" in r.message, (stage, r.message)
        else:
            assert r.status == "ok", (stage, r.message)
    assert (df.device == "cuda").all() and df.gpu_name.str.len().gt(0).all()
    assert df.loc["dense_gemm", "tflops"] > 10 and 0 < df.loc["experts", "pct_of_dense"] < 200
    # stages timed one by one (each from a flushed L2, launch-bound ones with their launch
    # latency) can add up to more than the chain: the share is > 0, not necessarily < 1
    assert df.loc["total", "routing_share"] > 0


@pytest.mark.parametrize("cap", list(CAPS))
@pytest.mark.parametrize("gemm", [g for g in ml.GEMMS if g != "loop"])
def test_gemm_paths_match_torch_directly(gemm, cap):
    spec = {"dropless": routing.CapacitySpec(), "cf": routing.CapacitySpec(0.75),
            "padded": routing.CapacitySpec(1.25, pad_to_capacity=True)}[cap]
    T, H, E, k, I = 3000, 1536, 32, 4, 768
    w = ml.make_weights(E, H, I, torch.bfloat16, "cuda", seed=9)
    x = ml.make_x(T, H, torch.bfloat16, "cuda", seed=9)
    ids, wt = routing.route(x @ w.wg, k, routing.RouterSpec())
    meta = routing.build_metadata(ids, wt, E, spec)
    packed, h, a, y, out = ml.torch_layer(x, w, meta)
    eg = ml.make_gemm(gemm)
    try:
        eg.check(x.device, x.dtype, "events", H, I)
    except ml.Unsupported as e:
        _skip_if_gated_epilogue_unavailable(e)
        raise
    bufs = ml.Buffers.allocate(T, H, E, I, meta.num_rows, x.dtype, x.device, gate_up=not eg.fuses_act)
    bufs.poison()
    got = ml.expert_ffn(eg, x if eg.fuses_pack else packed, meta, w, bufs)
    n = int(meta.offsets[-1])
    rows = (meta.gather_idx[:n] >= 0) if eg.fuses_pack else torch.ones(n, dtype=torch.bool, device=x.device)
    assert_close(got[:n][rows], y[:n][rows], f"{gemm} expert rows", torch.bfloat16)
    assert_close(routing.combine(got, meta), out, f"{gemm} layer", torch.bfloat16)
    ref32 = ml.moe_layer_reference(x, w, ids, meta.weights, meta.scatter_idx >= 0)
    rtol, atol = ml.FP32_REFERENCE_TOLERANCE[torch.bfloat16]
    assert_close(routing.combine(got, meta), ref32, f"{gemm} layer vs fp32", rtol=rtol, atol=atol)


@pytest.mark.parametrize("gemm", ["grouped_mm", "quack_varlen", "loop"])
def test_graph_timing(tmp_path, gemm):
    df = _run(tmp_path, f"bench.gemm={gemm}", "timing=graph", "timing.warmup=1", "timing.repeats=3")
    gemm_rows = ["gemm1", "gemm2", "experts", "total"]
    if gemm == "loop":
        assert (df.loc[gemm_rows, "status"] == "unsupported").all()
        assert df.loc["gemm1", "message"].endswith("cannot be captured with timing=graph")
    else:
        assert (df.status == "ok").all(), df.message.tolist()
    assert (df.timing_mode == "graph").all()


#: rows of a backward job that have no backward of their own
NO_BACKWARD = {"metadata": "no backward"}
FUSED_BACKWARD = {"quack_gated": {"gemm1", "activation", "gemm2"}}


@pytest.mark.parametrize("gemm,direction,extra", [
    ("grouped_mm", "fwdbwd", []), ("quack_varlen", "fwdbwd", []), ("quack_gated", "fwdbwd", []),
    ("quack_varlen", "bwd", ["capacity=cf", "capacity.cf=1.0"]), ("quack_gated", "bwd", ["capacity=padded"]),
])
def test_layer_backward_checks_and_times_on_gpu(tmp_path, gemm, direction, extra):
    df = _run(tmp_path, "impl=cute", f"bench.gemm={gemm}", f"bench.direction={direction}", *extra)
    _skip_if_gated_epilogue_unavailable(df.loc["experts", "message"])
    fused = FUSED_BACKWARD.get(gemm, set())
    for stage, r in df.iterrows():
        if stage in NO_BACKWARD:
            assert r.status == "unsupported" and NO_BACKWARD[stage] in r.message, (stage, r.message)
        elif stage in fused:
            assert r.status == "unsupported" and "gemm_dgated" in r.message, (stage, r.message)
        else:
            assert r.status == "ok", (stage, r.message)
    assert (df.direction == direction).all()
    assert df.loc["dense_gemm", "tflops"] > 10 and 0 < df.loc["experts", "pct_of_dense"] < 200
    assert df.loc["total", "stage_impl"].startswith("gate=torch,route=cute,metadata=cute,pack=cute")
