"""The training and low-precision kernels compile for sm_90a without a GPU: every weight kind of
the route backward, the combine backward with and without zero rows (predicated and exact
tilings, 1 to 16 slots), and the FP8 pack (fp32 and power-of-two scales)."""

from __future__ import annotations

import pytest

cutlass = pytest.importorskip("cutlass")

from moebench.kernels import backward as kb  # noqa: E402
from moebench.kernels import pack_fp8 as kf  # noqa: E402
from moebench.kernels.common import TORCH_TO_CUTE  # noqa: E402

DTYPES = [pytest.param(TORCH_TO_CUTE[d], id=str(d).removeprefix("torch.")) for d in TORCH_TO_CUTE]


def _sm90a(compiled) -> bool:
    return "-arch sm_90a" in str(compiled.ir_module)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,S,zero_empty", [(4096, 2, False), (520, 8, True), (7168, 16, True), (64, 1, False)])
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_backward_compiles(dtype, H, S, zero_empty, weighted):
    assert _sm90a(kb.compile_combine_backward(dtype, H, S, weighted, zero_empty, threads=256, hint="none"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight,static", [("prob", {}), ("prob", {"renormalize": True}),
                                           ("softmax_k", {"temperature": 0.7}), ("sum_k", {}), ("one", {}),
                                           ("score", {"renormalize": True, "scaling": 2.5})])
@pytest.mark.parametrize("E,k", [(256, 8), (8, 1), (1024, 16), (100, 3)])
def test_route_backward_compiles(dtype, weight, static, E, k):
    assert _sm90a(kb.compile_route_backward(dtype, E, k, weight=weight, **static))


def test_the_impl_maps_routers_to_the_kernels_static_keys():
    """CuteImpl.route_backward hands the router's forward static (``router_static``) to the
    kernel, which takes the weight keys and ignores the selection-only ones."""
    k = kb.RouteBackward(TORCH_TO_CUTE[next(iter(TORCH_TO_CUTE))], 256, 8, weight="score", renormalize=True,
                         scaling=2.5, score="sigmoid", has_bias=True, n_group=8, topk_group=4, group_score="max")
    assert (k.weight, k.renormalize, k.scaling, k.V) == ("score", True, 2.5, 8)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("mode", ["block128", "ue8m0"])
@pytest.mark.parametrize("H,S,zero_empty", [(4096, 2, False), (7168, 8, True), (128, 1, True), (2048, 16, False)])
def test_fp8_pack_compiles(dtype, mode, H, S, zero_empty):
    assert _sm90a(kf.compile_pack_fp8(dtype, H, S, mode, zero_empty))
