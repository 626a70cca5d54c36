"""The peers as their users run them, on a GPU: the strong eager torch, quack's kernel with its
fused softmax, the select stage of cute / quack / torch, SonicMoE's routing kernels; rotated and
graph timing check what they timed; every timed row carries its kernel time."""

import pytest
import torch

from moebench import routing as R
from moebench.app import JobFailed, run_job
from moebench.check import assert_close, check_metadata
from moebench.config import compose
from moebench.impls import torch_impl as TI
from moebench.logits import make_logits
from moebench.results import load
from moebench.routing import CapacitySpec

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _run(tmp_path, *overrides):
    return run_job(compose(["device=cuda", "timing.warmup=2", "timing.repeats=5", *overrides]), tmp_path)


@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(1.0), CapacitySpec(1.25, pad_to_capacity=True),
                                 CapacitySpec(0.7, renormalize_after_drop=True)])
def test_torch_metadata_and_combine_on_gpu(cap):
    x = make_logits("zipf", 4099, 128, seed=1, dtype=torch.bfloat16, device=DEV)
    ids, w = R.route(x, 8, R.RouterSpec())
    check_metadata(TI.metadata(ids, w, 128, cap), R.build_metadata(ids, w, 128, cap))
    meta = R.build_metadata(ids, w, 128, cap)
    y = torch.randn(meta.num_rows, 512, device=DEV).bfloat16()
    assert_close(TI.combine(y, meta), R.combine(y, meta), "combine", torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_dropless_combine_keeps_fp32_weights(dtype):
    """The dropless combine (one cuSPARSE SpMM, hi + lo 16-bit weights) where bf16 weights fail:
    sigmoid_bias with its scaling, products that cancel."""
    spec = R.RouterSpec("sigmoid_bias", bias_std=0.1, scaling=2.5)
    ids, w = R.route(torch.randn(4099, 128, device=DEV), 8, spec, spec.expert_bias(128, DEV, 1))
    meta = R.build_metadata(ids, w, 128, CapacitySpec())
    y = (torch.randn(meta.num_rows, 1024, device=DEV) * 3).to(dtype)
    assert_close(TI.combine(y, meta), R.combine(y.float(), meta), "combine", dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,k", [(1, 8), (1, 2), (2, 8), (3, 1), (16, 8)])
def test_torch_combine_at_decode_sizes(T, k, dtype):
    """A few tokens: at T 1 the 16-bit SpMM's 2 k entries outnumber the R = k columns, which
    cuSPARSE refuses; the combine takes its batched product there, and the SpMM elsewhere."""
    ids, w = R.route(make_logits("zipf", T, 256, seed=T, device=DEV), k, R.RouterSpec())
    meta = R.build_metadata(ids, w, 256, CapacitySpec())
    y = torch.randn(meta.num_rows, 7168, device=DEV).to(dtype)
    for weighted in (True, False):
        assert_close(TI.combine(y, meta, weighted=weighted), R.combine(y, meta, weighted=weighted),
                     f"T={T} combine", dtype)


@pytest.mark.parametrize("mode", ["events", "graph", "rotated"])
def test_every_impl_of_the_topk_bench(tmp_path, mode):
    for impl in ("torch", "cute", "quack", "reference"):
        df = _run(tmp_path / impl, "bench=topk", f"impl={impl}", f"timing={mode}", "tokens=4099", "experts=128",
                  "topk=8", "hidden=64").set_index("stage")
        assert (df.status == "ok").all(), (impl, df.message.tolist())
        assert (df.kernel_us > 0).all(), impl
        if mode == "rotated":
            assert (df.rotations >= 2).all() and (df.rotated_bytes > 0).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "softmax_topk router.renormalize=true"])
def test_quack_route_as_its_users_call_it(tmp_path, dtype, router):
    df = _run(tmp_path, "bench=topk", "impl=quack", f"dtype={dtype}", *f"router={router}".split(), "tokens=16384",
              "experts=128", "topk=2", "hidden=64").set_index("stage")
    assert (df.status == "ok").all(), df.message.tolist()


@pytest.mark.parametrize("mode", ["graph", "rotated"])
def test_a_replay_that_goes_wrong_is_a_mismatch_row(tmp_path, mode):
    """The checked call is right and every later one is wrong, on the device: the check of a
    replay's output after timing makes it a mismatch row."""
    with pytest.raises(JobFailed):
        _run(tmp_path, "bench=pack", "impl._target_=fake_impls.WrongOnDeviceAfterFirstCall", "impl.name=late",
             f"timing={mode}", "tokens=2048", "hidden=256")
    row = load(tmp_path).iloc[0]
    assert row.status == "mismatch" and row.message.startswith(f"mismatch: after timing ({mode}): packed rows")


def test_sonic_routing_kernels(tmp_path):
    pytest.importorskip("sonicmoe", reason="sonic-moe is not in this GPU stack (MOEBENCH_GPU_EXTRA)")
    df = _run(tmp_path, "bench=routing", "impl=sonic", "impl_pack=torch", "tokens=4099", "experts=128", "topk=8",
              "hidden=256").set_index("stage")
    assert (df.status == "ok").all(), df.message.tolist()
    assert df.loc["total", "stage_impl"] == "route=sonic,metadata=sonic,pack=torch,combine=sonic"
    sel = _run(tmp_path / "sel", "bench=topk", "impl=sonic", "tokens=64", "experts=128", "topk=8").set_index("stage")
    assert sel.loc["select", "status"] == "unsupported" and "no select stage" in sel.loc["select", "message"]


def test_sonic_layer_row_in_this_stack(tmp_path):
    """In a stack with the CuTeDSL sonic-moe pins, its layer is the total row (checked like every
    row); elsewhere the row is unsupported and names the pin. (In its own stack quack autotunes
    every GEMM of the layer on first use -- minutes -- so that path is exercised by the
    benchmark's rows, not here.)"""
    pytest.importorskip("sonicmoe", reason="sonic-moe is not in this GPU stack (MOEBENCH_GPU_EXTRA)")
    from moebench.impls.sonic_impl import stack_problem

    problem = stack_problem()
    if problem is None:
        pytest.skip("this stack runs SonicMoE's layer: its rows come from the benchmark (quack autotunes minutes)")
    df = _run(tmp_path, "bench=moe_layer", "impl=sonic", "tokens=512", "hidden=256", "intermediate=128",
              "experts=32", "topk=4").set_index("stage")
    assert df.loc["total", "status"] == "unsupported" and "pins nvidia-cutlass-dsl==" in df.loc["total", "message"]
    for st in ("route", "metadata", "combine", "dense_gemm"):
        assert df.loc[st, "status"] == "ok", (st, df.loc[st, "message"])
