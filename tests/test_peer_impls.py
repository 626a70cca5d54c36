"""impl=compile and impl=quack on the CPU (CI): the compile impl matches the reference
through the harness; quack constructs without a GPU and reports every case as
unsupported with its reason."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hydra.utils import instantiate

from moebench import routing
from moebench.app import run_job
from moebench.config import compose
from moebench.impls.base import Unsupported
from moebench.impls.compile_impl import STAGE_FUNCTIONS, CompileImpl
from moebench.check import check_route
from moebench.impls.quack_impl import (NOT_INSTALLED, QuackImpl, decode_sign_positions, emulate_topk_fwd,
                                         row_divisibility, unsupported_reason)
from moebench.logits import make_logits
from moebench.routing import RouterSpec

FAST = ["shape=tiny", "device=cpu", "timing.repeats=3", "timing.warmup=1"]


def _run(tmp_path, overrides):
    cfg = compose(overrides)
    return run_job(cfg, tmp_path)


# -- impl=compile -----------------------------------------------------------------------------


def test_compile_config_instantiates():
    cfg = compose(["impl=compile"])
    im = instantiate(cfg.impl)
    assert isinstance(im, CompileImpl) and im.name == "compile"
    assert im.fullgraph is True and im.dynamic is False and im.backend == "inductor"


def test_compile_matches_reference_through_harness(tmp_path):
    df = _run(tmp_path, ["impl=compile", "bench=routing", *FAST])
    assert list(df["stage"]) == ["route", "metadata", "pack", "combine", "total"]
    assert (df["status"] == "ok").all(), df[["stage", "status", "message"]].to_string()
    assert (df["stage_impl"].iloc[:4] == "compile").all()
    assert df["first_call_ms"].notna().all() and df["time_us_median"].notna().all()


def test_compile_capacity_through_harness(tmp_path):
    df = _run(tmp_path, ["impl=compile", "bench=capacity", "capacity=cf", "router=topk_softmax", *FAST])
    assert (df["status"] == "ok").all(), df[["stage", "status", "message"]].to_string()


def test_compile_does_not_recompile_when_called_again():
    im = CompileImpl()
    x = make_logits("zipf", 37, 8, seed=3, dtype=torch.bfloat16)
    spec = RouterSpec("softmax_topk", renormalize=True)
    ref = routing.route(x, 2, spec)
    im.route(x, 2, spec)
    with torch.compiler.set_stance("fail_on_recompile"):
        ids, w = im.route(x, 2, spec)
    assert torch.equal(ids, ref[0])
    torch.testing.assert_close(w, ref[1], rtol=1e-5, atol=1e-6)


def test_compile_falls_back_to_graph_breaks(monkeypatch):
    def metadata_with_break(ids, weights, num_experts, capacity, num_rows=None):
        torch._dynamo.graph_break()
        return routing.build_metadata(ids, weights, num_experts, capacity, num_rows)

    monkeypatch.setitem(STAGE_FUNCTIONS, "metadata", metadata_with_break)
    im = CompileImpl(backend="eager")  # dynamo only: this test is about tracing, not codegen
    ids, w = routing.route(make_logits("uniform", 16, 8, seed=1), 2, RouterSpec())
    meta = im.metadata(ids, w, 8, routing.CapacitySpec(), 32)
    ref = routing.build_metadata(ids, w, 8, routing.CapacitySpec(), 32)
    assert torch.equal(meta.scatter_idx, ref.scatter_idx)
    assert "metadata" in im.graph_breaks


# -- impl=quack ---------------------------------------------------------------------------------


def test_quack_config_instantiates_without_gpu():
    cfg = compose(["impl=quack"])
    im = instantiate(cfg.impl)
    assert isinstance(im, QuackImpl) and im.name == "quack" and im.devices == ("cuda",)
    assert im.exact_ties is False


def test_quack_rows_unsupported_on_cpu(tmp_path):
    df = _run(tmp_path, ["impl=quack", "bench=routing", *FAST])
    assert (df["status"] == "unsupported").all()
    assert df["message"].str.contains("impl=quack runs on cuda only").all(), df["message"].tolist()


def test_quack_route_only_on_cpu(tmp_path):
    df = _run(tmp_path, ["impl=torch", "impl_route=quack", "bench=routing", *FAST]).set_index("stage")
    assert df.loc["route", "status"] == "unsupported" and "cuda only" in df.loc["route", "message"]
    assert (df.loc[["metadata", "pack", "combine"], "status"] == "ok").all()


def test_quack_stages_raise_unsupported_on_cpu():
    im = QuackImpl()
    x = make_logits("uniform", 4, 8, seed=0)
    with pytest.raises(Unsupported, match="runs on cuda only"):
        im.route(x, 2, RouterSpec())
    with pytest.raises(Unsupported, match="runs on cuda only"):
        im.check_device(torch.device("cpu"))
    with pytest.raises(Unsupported, match="impl=quack has no metadata stage"):
        im.metadata(None, None, 8, routing.CapacitySpec())
    with pytest.raises(Unsupported, match="impl=quack has no pack stage"):
        im.pack(None, None)
    with pytest.raises(Unsupported, match="impl=quack has no combine stage"):
        im.combine(None, None)


def test_quack_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "quack.topk", None)  # makes `from quack.topk import ...` fail
    with pytest.raises(Unsupported) as e:
        QuackImpl().kernel()
    assert str(e.value) == NOT_INSTALLED


@pytest.mark.parametrize("E,k,dtype,router,needle", [
    (160, 6, torch.bfloat16, "softmax_topk", "expert count to be a power of two <= 4096 (experts=160)"),
    (8192, 8, torch.bfloat16, "softmax_topk", "power of two <= 4096 (experts=8192)"),
    (128, 6, torch.bfloat16, "softmax_topk", "k to be a power of two <= 128 (topk=6)"),
    (256, 256, torch.float32, "topk_hard", "k to be a power of two <= 128 (topk=256)"),
    (4, 2, torch.bfloat16, "softmax_topk", "16-byte vectors"),
    (128, 2, torch.bfloat16, "hash", "router=hash"),
    (128, 2, torch.bfloat16, "expert_choice", "router=expert_choice"),
    (128, 2, torch.bfloat16, "group_limited", "router=group_limited"),
])
def test_quack_unsupported_reasons(E, k, dtype, router, needle):
    reason = unsupported_reason(E, k, dtype, RouterSpec(router))
    assert reason is not None and needle in reason


def test_quack_unsupported_router_options():
    bias = RouterSpec("sigmoid_bias", bias_std=0.1).expert_bias(128, "cpu")
    assert "without a bias" in unsupported_reason(128, 8, torch.bfloat16, RouterSpec("sigmoid_bias"), bias)
    assert unsupported_reason(128, 8, torch.bfloat16, RouterSpec("sigmoid_bias", bias_std=0.0)) is None
    s = RouterSpec("topk_softmax", normalize="sum")
    assert "16-bit" in unsupported_reason(128, 8, torch.float32, s)
    assert unsupported_reason(128, 8, torch.bfloat16, s) is None


@pytest.mark.parametrize("E,k,dtype", [(8, 1, torch.bfloat16), (128, 2, torch.float16), (256, 8, torch.float32),
                                       (4096, 128, torch.bfloat16), (4, 4, torch.float32)])
def test_quack_supported_shapes(E, k, dtype):
    for r in ("softmax_topk", "topk_softmax", "topk_hard"):
        assert unsupported_reason(E, k, dtype, RouterSpec(r)) is None


def test_quack_row_padding():
    assert row_divisibility(torch.bfloat16, 128) == 8 and row_divisibility(torch.float16, 8) == 8
    assert row_divisibility(torch.float32, 128) == 4 and row_divisibility(torch.float32, 8) == 4
    assert row_divisibility(torch.bfloat16, 4) == 4


def test_quack_route_tolerance():
    im = QuackImpl()
    x = torch.full((3, 128), -4.0)
    # 16-bit logits: exact selection; the fp32 epilogue's weights to the default 1e-5
    assert im.route_tolerance(torch.bfloat16, x.bfloat16(), RouterSpec("topk_hard"), 8) == {}
    assert im.route_tolerance(torch.float16, x.half(), RouterSpec("softmax_topk"), 8) == {}
    # quack's fused softmax (topk_softmax): its weights in the logits' dtype
    assert im.route_tolerance(torch.bfloat16, x.bfloat16(), RouterSpec("topk_softmax"), 2) == {
        "weight_rtol": 2.0 ** -8 + 1e-5}
    hard = im.route_tolerance(torch.float32, x, RouterSpec("topk_hard"), 8)
    assert hard == {"selection_rtol": 2.0 ** (7 - 22)}
    soft = im.route_tolerance(torch.float32, x, RouterSpec("softmax_topk"), 8)
    assert soft == {"selection_rtol": pytest.approx(math.expm1(4 * 2.0 ** -15))}  # weights: the exact epilogue
    fused = im.route_tolerance(torch.float32, x, RouterSpec("softmax_topk", renormalize=True), 8)
    assert 1e-5 < fused["weight_rtol"] < 1e-3
    # a shape whose decode the probe found wrong: no fused softmax, exact weights
    im._decode_q[(128, 8, torch.float32, x.device)] = torch.arange(8)
    assert "weight_rtol" not in im.route_tolerance(torch.float32, x, RouterSpec("softmax_topk", renormalize=True), 8)


# -- impl=quack's glue on the CPU, with a torch model of quack's kernel --------------------------


@pytest.fixture
def cpu_quack(monkeypatch):
    """QuackImpl running ``emulate_topk_fwd`` (quack's kernel, modelled in torch) on the CPU."""
    monkeypatch.setattr(QuackImpl, "devices", ("cpu", "cuda"))
    monkeypatch.setattr(QuackImpl, "kernel", lambda self: emulate_topk_fwd)
    return QuackImpl()


EMU_ROUTERS = [RouterSpec("softmax_topk"), RouterSpec("softmax_topk", renormalize=True), RouterSpec("topk_softmax"),
               RouterSpec("topk_softmax", temperature=0.7), RouterSpec("topk_softmax", normalize="sum"),
               RouterSpec("topk_hard"), RouterSpec("sigmoid_bias", scaling=2.5),
               RouterSpec("sigmoid_bias", score="softmax")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E,k", [(8, 1), (8, 8), (64, 4), (128, 2), (128, 8), (256, 8), (256, 32), (1024, 16)])
def test_quack_glue_matches_reference_with_emulated_kernel(cpu_quack, E, k, dtype):
    routers = EMU_ROUTERS + ([RouterSpec("top1")] if k == 1 else [])
    for T, kind in [(1, "uniform"), (67, "zipf"), (67, "hot")]:
        x = make_logits(kind, T, E, seed=E + k, dtype=dtype)
        for spec in routers:
            if unsupported_reason(E, k, dtype, spec):
                continue
            ref = routing.route(x, k, spec)
            got = cpu_quack.route(x, k, spec)
            fused = cpu_quack.fuses_softmax(spec, E, k, dtype, x.device)
            assert fused == (spec.router.softmax_over_selected() and (E < 128 or k < 8))  # the probe's verdict
            assert got[0].dtype == torch.int32 and got[0].shape == ref[0].shape
            assert got[1].dtype == (dtype if fused else torch.float32)
            check_route(got, ref, selection=routing.selection_scores(x, spec), exact_ties=cpu_quack.exact_ties,
                        weights_of=lambda ids: routing.reference_weights(x, ids, spec),
                        **cpu_quack.route_tolerance(dtype, x, spec, k))


def test_emulated_quack_decode_bug_is_repaired(cpu_quack):
    """Mixed-sign top-8 of 128 experts: quack's raw indices are wrong where predicted."""
    x = make_logits("zipf", 500, 128, seed=3, dtype=torch.bfloat16)
    vals = torch.empty(500, 8, dtype=x.dtype)
    idx = torch.empty(500, 8, dtype=torch.int32)
    emulate_topk_fwd(x, 8, False, vals, idx)
    ref_ids = routing.route(x, 8, RouterSpec("topk_hard"))[0]
    assert decode_sign_positions(128, 8) == [0, 1, 2, 3, 0, 1, 2, 3]
    bad = idx != ref_ids
    assert bad.any() and not bad[:, :4].any()
    assert torch.equal(cpu_quack.route(x, 8, RouterSpec("topk_hard"))[0], ref_ids)
    assert decode_sign_positions(128, 2) == [0, 1] and decode_sign_positions(64, 8) == list(range(8))
    assert decode_sign_positions(256, 16) == [0, 1, 2, 3] * 4


def test_emulated_quack_fp32_through_harness(cpu_quack, monkeypatch, tmp_path):
    df = _run(tmp_path, ["impl=torch", "impl_route=quack", "bench=routing", "dtype=float32", "logits=zipf",
                         "experts=128", "topk=8", "tokens=300", *FAST]).set_index("stage")
    assert df.loc["route", "status"] == "ok", df.loc["route", "message"]


def _sorting_topk_fwd(x, k, softmax, values, indices):
    """A quack without the decode bug: a stable sort."""
    v, i = routing.stable_topk(x.float(), k)
    values.copy_(v.to(values.dtype))
    indices.copy_(i.to(torch.int32))


def test_quack_probe_repairs_only_a_buggy_kernel(monkeypatch):
    monkeypatch.setattr(QuackImpl, "devices", ("cpu", "cuda"))
    x = make_logits("zipf", 200, 128, seed=9, dtype=torch.bfloat16)
    ref = routing.route(x, 8, RouterSpec("topk_hard"))[0]
    monkeypatch.setattr(QuackImpl, "kernel", lambda self: _sorting_topk_fwd)
    fixed = QuackImpl()
    assert torch.equal(fixed.route(x, 8, RouterSpec("topk_hard"))[0], ref)
    assert fixed._decode_q[(128, 8, torch.bfloat16, x.device)] is None  # probed: no repair

    def garbage(x, k, softmax, values, indices):
        _sorting_topk_fwd(x, k, softmax, values, indices)
        indices.copy_(indices.flip(1))

    monkeypatch.setattr(QuackImpl, "kernel", lambda self: garbage)
    with pytest.raises(RuntimeError, match="match neither"):
        QuackImpl().route(x, 8, RouterSpec("topk_hard"))
