"""Training on the CPU: the reference's gradients (fp64 gradcheck), the strong torch backward
against them, the backward rows of the benches, moebench.ops (autograd, torch.compile with no
graph break) and a small MoE block trained with the ops against the same block in plain torch."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moebench import ops
from moebench import routing as R
from moebench.app import JobFailed, run_job
from moebench.check import assert_close
from moebench.config import ConfigError, compose, resolve
from moebench.impls import torch_impl as TI
from moebench.results import load
from moebench.routing import CapacitySpec, RouterSpec

FAST = ["shape=tiny", "timing.warmup=1", "timing.repeats=2"]
ROUTERS = [RouterSpec(), RouterSpec(renormalize=True), RouterSpec("topk_softmax", temperature=0.7),
           RouterSpec("topk_softmax", normalize="sum"), RouterSpec("sigmoid_bias", scaling=2.5, bias_std=0.1),
           RouterSpec("sigmoid_bias", score="softmax", scaling=1.5), RouterSpec("topk_hard"),
           RouterSpec("group_limited", n_group=4, topk_group=2, bias_std=0.1), RouterSpec("top1"),
           RouterSpec("expert_choice"), RouterSpec("hash")]


def _k(spec):
    return 1 if spec.name == "top1" else 3


# -- the reference's own gradients ----------------------------------------------------------------

@pytest.mark.parametrize("spec", ROUTERS[:8], ids=lambda s: f"{s.name}")
def test_reference_weights_pass_fp64_gradcheck(spec):
    x = torch.randn(17, 16, dtype=torch.float64)
    bias = spec.expert_bias(16, "cpu", 1)
    bias = bias.double() if bias is not None else None
    ids, _ = R.route(x, 3, spec, bias)
    assert torch.autograd.gradcheck(lambda xx: R.reference_weights(xx, ids, spec, bias), (x.requires_grad_(),))


@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(0.5), CapacitySpec(1.0, pad_to_capacity=True)])
def test_reference_pack_and_combine_pass_fp64_gradcheck(cap):
    ids, w = R.route(torch.randn(23, 8), 2, RouterSpec())
    meta = R.build_metadata(ids, w.double(), 8, cap)
    y = torch.randn(meta.num_rows, 6, dtype=torch.float64, requires_grad=True)
    wt = meta.weights.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: R.combine(a, dataclasses.replace(meta, weights=b)), (y, wt))
    x = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: R.pack(a, meta), (x,))
    d = torch.randn(meta.num_rows, 6, dtype=torch.float64)
    assert torch.allclose(R.pack_backward(d, meta), torch.autograd.grad(R.pack(x, meta), x, d)[0])


# -- impl=torch's backward against the reference's --------------------------------------------------

@pytest.mark.parametrize("spec", ROUTERS, ids=lambda s: f"{s.name}-{s.renormalize}-{s.normalize}-{s.score}")
def test_torch_route_backward_is_the_references(spec):
    x = torch.randn(41, 16)
    bias = spec.expert_bias(16, "cpu", 2)
    ids, w = R.route(x, _k(spec), spec, bias)
    dw = torch.randn(ids.shape)
    assert_close(TI.route_backward(x, ids, w, dw, spec), R.route_backward(x, ids, dw, spec, bias), "d_logits",
                 rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(0.5), CapacitySpec(1.25, pad_to_capacity=True)])
@pytest.mark.parametrize("weighted", [True, False])
def test_torch_pack_and_combine_backward_are_the_references(cap, weighted):
    ids, w = R.route(torch.randn(57, 8), 2, RouterSpec())
    meta = R.build_metadata(ids, w, 8, cap)
    y, d_out = torch.randn(meta.num_rows, 32), torch.randn(57, 32)
    got_y, got_w = TI.combine_backward(d_out, y, meta, weighted)
    ref_y, ref_w = R.combine_backward(d_out, y, meta, weighted)
    assert_close(got_y, ref_y, "d_y", rtol=1e-5, atol=1e-5)
    assert_close(got_w, ref_w, "d_w", rtol=1e-5, atol=1e-4)
    d_packed = torch.randn(meta.num_rows, 32)
    assert_close(TI.pack_backward(d_packed, meta), R.pack_backward(d_packed, meta), "d_x", rtol=1e-5, atol=1e-5)


# -- the benches' backward rows ---------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["bwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["torch", "reference", "compile"])
def test_backward_rows_check_and_time(tmp_path, direction, impl):
    df = run_job(compose(["bench=routing", f"impl={impl}", f"bench.direction={direction}", *FAST, "tokens=128"]),
                 tmp_path).set_index("stage")
    assert (df.direction == direction).all()
    for stage in ("route", "pack", "combine", "total"):
        assert df.loc[stage, "status"] == "ok", (stage, df.loc[stage, "message"])
        assert df.loc[stage, "bytes_strict"] > 0 and df.loc[stage, "time_us_median"] > 0
    assert df.loc["metadata", "status"] == "unsupported" and "no backward" in df.loc["metadata", "message"]


def test_backward_strict_bytes(tmp_path):
    bwd = run_job(compose(["bench=combine", "bench.direction=bwd", *FAST]), tmp_path / "b").set_index("stage")
    fwd = run_job(compose(["bench=combine", *FAST]), tmp_path / "f").set_index("stage")
    both = run_job(compose(["bench=combine", "bench.direction=fwdbwd", *FAST]), tmp_path / "fb").set_index("stage")
    T, H, S, b = 512, 256, 2, 2
    assert bwd.loc["combine", "bytes_strict"] == (T + T * S + T * S) * H * b + T * S * 12  # dropless: R = kept = T*S
    assert both.loc["combine", "bytes_strict"] == fwd.loc["combine", "bytes_strict"] + bwd.loc["combine", "bytes_strict"]


def test_a_wrong_backward_is_a_mismatch_row(tmp_path, monkeypatch):
    real = TI.combine_backward

    def drops_d_w(d_out, y, meta, weighted=True):
        d_y, d_w = real(d_out, y, meta, weighted)
        return d_y, torch.zeros_like(d_w)

    monkeypatch.setattr(TI, "combine_backward", drops_d_w)
    with pytest.raises(JobFailed):
        run_job(compose(["bench=combine", "bench.direction=bwd", *FAST]), tmp_path)
    row = load(tmp_path).iloc[0]
    assert row.status == "mismatch" and "d_w" in row.message


def test_direction_is_checked():
    with pytest.raises(ConfigError, match="bench.direction='sideways' is not accepted; accepted: fwd, bwd, fwdbwd"):
        resolve(compose(["bench=pack", "bench.direction=sideways"]))
    with pytest.raises(ConfigError, match="bench.direction=bwd is not accepted with bench=ep_dispatch"):
        resolve(compose(["bench=ep_dispatch", "bench.direction=bwd"]))
    assert resolve(compose(["bench=moe_layer", "bench.direction=fwdbwd"])).bench_config.direction == "fwdbwd"
    with pytest.raises(ConfigError, match="bench.direction='both' is not accepted; accepted: fwd, bwd, fwdbwd"):
        resolve(compose(["bench=moe_layer", "bench.direction=both"]))


# -- moebench.ops ------------------------------------------------------------------------------------

def _ops_block(x, logits, k, E, cf=None):
    ids, w = ops.route(logits, k)
    packed, r = ops.dispatch(x, ids, w, E, capacity_factor=cf)
    return ops.combine(packed * 2, r)


@pytest.mark.parametrize("cf", [None, 0.5])
def test_ops_gradients_are_the_references(cf):
    x = torch.randn(64, 16, requires_grad=True)
    lg = torch.randn(64, 8, requires_grad=True)
    _ops_block(x, lg, 2, 8, cf).sum().backward()
    x2, lg2 = x.detach().clone().requires_grad_(), lg.detach().clone().requires_grad_()
    ids = R.route(lg2.detach(), 2, RouterSpec())[0]
    w = R.reference_weights(lg2, ids, RouterSpec())
    meta = R.build_metadata(ids, w.detach(), 8, CapacitySpec(cf) if cf else CapacitySpec())
    kept = dataclasses.replace(meta, weights=torch.where(meta.scatter_idx >= 0, w, 0.0))
    R.combine(R.pack(x2, meta) * 2, kept).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-6) and torch.allclose(lg.grad, lg2.grad, atol=1e-6)


def test_ops_compile_fullgraph_with_no_graph_break():
    x = torch.randn(32, 16, requires_grad=True)
    lg = torch.randn(32, 8, requires_grad=True)
    want = _ops_block(x, lg, 2, 8)
    want.sum().backward()
    g = (x.grad.clone(), lg.grad.clone())
    x.grad = lg.grad = None
    explain = torch._dynamo.explain(lambda a, b: _ops_block(a, b, 2, 8))(x, lg)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    got = torch.compile(lambda a, b: _ops_block(a, b, 2, 8), fullgraph=True)(x, lg)
    got.sum().backward()
    assert torch.allclose(got, want) and torch.allclose(x.grad, g[0]) and torch.allclose(lg.grad, g[1])


def test_ops_reject_a_bad_router():
    with pytest.raises(ValueError, match="router='nope' is not accepted"):
        ops.route(torch.randn(4, 8), 2, router="nope")


# -- a small MoE block that trains -----------------------------------------------------------------

class PlainMoE(torch.nn.Module):
    """Softmax top-k routing and SwiGLU experts in plain torch."""

    def __init__(self, H=32, I=24, E=8, k=2):
        super().__init__()
        self.E, self.k, self.I = E, k, I
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(E, 2 * I, H) * H ** -0.5)
        self.w2 = torch.nn.Parameter(torch.randn(E, H, I) * I ** -0.5)

    def expert(self, e, rows):
        h = rows @ self.w1[e].T
        return (F.silu(h[:, :self.I]) * h[:, self.I:]) @ self.w2[e].T

    def forward(self, x):
        w, ids = torch.softmax(self.gate(x).float(), -1).topk(self.k)
        out = torch.zeros_like(x)
        for e in range(self.E):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out = out.index_add(0, tok, self.expert(e, x[tok]) * w[tok, slot, None])
        return out


class OpsMoE(PlainMoE):
    """The same block on moebench.ops: route, dispatch, per-expert rows, combine."""

    def forward(self, x):
        ids, w = ops.route(self.gate(x), self.k)
        packed, r = ops.dispatch(x, ids, w, self.E)
        offs = r.offsets.tolist()
        y = torch.cat([self.expert(e, packed[offs[e]:offs[e + 1]]) for e in range(self.E)])
        return ops.combine(y, r)


def test_a_block_on_the_ops_trains_like_plain_torch():
    torch.manual_seed(3)
    plain = PlainMoE()
    mine = OpsMoE()
    mine.load_state_dict(plain.state_dict())
    x, target = torch.randn(96, 32), torch.randn(96, 32)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (plain, mine)]
    for step in range(5):
        losses = []
        for m, opt in zip((plain, mine), opts):
            opt.zero_grad()
            loss = F.mse_loss(m(x), target)
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5), step
        for (n, a), b in zip(plain.named_parameters(), mine.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), (step, n)
        for opt in opts:
            opt.step()
    assert losses[0] < F.mse_loss(PlainMoE()(x), target).item()  # it learned something
