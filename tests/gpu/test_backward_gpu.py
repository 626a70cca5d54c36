"""impl=cute's backward kernels on a GPU, against torch autograd of the reference in fp32, and
moebench.ops on CUDA (the kernels, compiled with fullgraph, replayed in a CUDA graph)."""

import dataclasses

import pytest
import torch

from moebench import ops
from moebench import routing as R
from moebench.app import run_job
from moebench.check import TOLERANCE, assert_close
from moebench.config import compose
from moebench.impls.cute_impl import CuteImpl
from moebench.logits import make_logits
from moebench.routing import CapacitySpec, RouterSpec

pytestmark = pytest.mark.gpu
DEV = "cuda"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ROUTERS = [RouterSpec(), RouterSpec(renormalize=True), RouterSpec("topk_softmax", temperature=0.7),
           RouterSpec("topk_softmax", normalize="sum"), RouterSpec("topk_hard"),
           RouterSpec("sigmoid_bias", bias_std=0.1, scaling=2.5), RouterSpec("sigmoid_bias", score="softmax"),
           RouterSpec("group_limited", n_group=8, topk_group=4, bias_std=0.1, scaling=2.5)]


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("T,E,k", [(4099, 128, 8), (1, 256, 8), (1537, 1024, 16), (333, 8, 1), (2048, 64, 2)])
def test_route_backward_matches_autograd_of_the_reference(dt, T, E, k):
    im = CuteImpl()
    for kind, spec in [(kd, s) for kd in ("uniform", "zipf") for s in ROUTERS]:
        if spec.name == "group_limited" and (E % 8 or E // 8 > 32 or k > 4 * E // 8):
            continue
        x = make_logits(kind, T, E, seed=T + E, dtype=DTYPES[dt], device=DEV)
        bias = spec.expert_bias(E, DEV, 1)
        ids, w = R.route(x, k, spec, bias)
        dw = torch.randn(ids.shape, device=DEV)
        got = im.route_backward(x, ids, w, dw, spec, bias)
        ref = R.route_backward(x.float(), ids, dw, spec, bias)
        assert got.dtype == x.dtype and got.shape == x.shape
        if spec.name == "topk_softmax" and spec.normalize == "sum":
            # w = l / sum(l) over the k signed logits: where the sum nearly cancels, its gradient
            # (~1 / sum^2) amplifies any rounding -- compare the well-conditioned tokens
            sel = x.float().gather(1, ids.long())
            well = sel.sum(1).abs() > 0.05 * sel.abs().sum(1)
            assert bool(well.float().mean() > 0.5)
            # and the gradient's own scale per token (|d_w| / |sum|): the rounding is relative to it
            scale = (dw.abs().sum(1) / sel.sum(1).abs()).clamp(min=1)[:, None]
            got, ref = (got.float() / scale)[well].to(got.dtype), (ref / scale)[well]
        assert_close(got, ref, f"d_logits {kind} {spec}", DTYPES[dt])


CAPS = [CapacitySpec(), CapacitySpec(1.0), CapacitySpec(0.6), CapacitySpec(1.25, pad_to_capacity=True)]


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("T,H,E,k", [(4099, 4096, 128, 2), (1000, 7168, 256, 8), (1, 64, 8, 1), (777, 200, 16, 16)])
@pytest.mark.parametrize("cap", CAPS, ids=lambda c: f"cf={c.factor},pad={c.pad_to_capacity}")
def test_pack_and_combine_backward_match_autograd_of_the_reference(dt, T, H, E, k, cap):
    dtype, im = DTYPES[dt], CuteImpl()
    x = make_logits("zipf", T, E, seed=3, device=DEV)
    ids, w = R.route(x, k, RouterSpec())
    meta = R.build_metadata(ids, w, E, cap)
    y = torch.randn(meta.num_rows, H, device=DEV).to(dtype)
    d_out = torch.randn(T, H, device=DEV).to(dtype)
    for weighted in (True, False):
        d_y, d_w = im.combine_backward(d_out, y, meta, weighted)
        ref_y, ref_w = R.combine_backward(d_out.float(), y.float(), meta, weighted)
        assert_close(d_y, ref_y, "d_y", dtype)
        assert_close(d_w, ref_w, "d_w", rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1] * H ** 0.5)
    d_packed = torch.randn(meta.num_rows, H, device=DEV).to(dtype)
    assert_close(im.pack_backward(d_packed, meta), R.pack_backward(d_packed.float(), meta), "d_x", dtype)


@pytest.mark.parametrize("bench", ["routing", "capacity"])
@pytest.mark.parametrize("direction", ["bwd", "fwdbwd"])
def test_backward_rows_on_gpu(tmp_path, bench, direction):
    df = run_job(compose([f"bench={bench}", "impl=cute", f"bench.direction={direction}", "tokens=4099",
                          "timing.repeats=5", "timing.warmup=2"]), tmp_path).set_index("stage")
    for stage in ("pack", "combine", "total"):
        assert df.loc[stage, "status"] == "ok", (stage, df.loc[stage, "message"])
        assert df.loc[stage, "kernel_us"] > 0


def _block(x, lg, k, E):
    ids, w = ops.route(lg, k)
    packed, r = ops.dispatch(x, ids, w, E)
    return ops.combine(packed * 2, r)


def test_ops_on_cuda_match_the_reference_compile_and_replay():
    T, H, E, k = 4099, 512, 128, 8
    x = torch.randn(T, H, device=DEV).bfloat16().requires_grad_()
    lg = torch.randn(T, E, device=DEV).bfloat16().requires_grad_()
    out = _block(x, lg, k, E)
    out.float().sum().backward()
    x2, lg2 = x.detach().float().requires_grad_(), lg.detach().float().requires_grad_()
    ids = R.route(lg.detach(), k, RouterSpec())[0]
    w = R.reference_weights(lg2, ids, RouterSpec())
    meta = R.build_metadata(ids, w.detach(), E)
    R.combine(R.pack(x2, meta) * 2, dataclasses.replace(meta, weights=w)).sum().backward()
    assert_close(out, R.combine(R.pack(x2.detach(), meta) * 2, meta), "ops forward", torch.bfloat16)
    assert_close(x.grad, x2.grad, "ops d_x", torch.bfloat16)
    assert_close(lg.grad, lg2.grad, "ops d_logits", torch.bfloat16)
    explain = torch._dynamo.explain(lambda a, b: _block(a, b, k, E))(x, lg)
    assert explain.graph_break_count == 0
    compiled = torch.compile(lambda a, b: _block(a, b, k, E), fullgraph=True)
    assert_close(compiled(x, lg), out, "compiled", torch.bfloat16)
    # forward in a CUDA graph (no host sync in route, dispatch, combine)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        _block(x, lg, k, E)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        replayed = _block(x, lg, k, E)
    g.replay()
    torch.cuda.synchronize()
    assert_close(replayed, out, "graph replay", torch.bfloat16)
