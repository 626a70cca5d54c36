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


@pytest.mark.parametrize("tune", [dict(vec=16), dict(scales="row"), dict(vec=16, scales="row", tokens=2),
                                  dict(tpr=16, tokens=3, scales="row"), dict(vec=16, tpr=256, threads=512),
                                  dict(min_ctas=6, hint="stream", max_iters=8), dict(vec=16, max_iters=1, tokens=4)],
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("H,S,zero_empty", [(7168, 8, True), (2048, 8, False), (384, 16, True), (128, 1, True)])
def test_fp8_pack_tunings_compile(tune, H, S, zero_empty):
    assert _sm90a(kf.compile_pack_fp8(DTYPES[0].values[0], H, S, "ue8m0" if S == 8 else "block128", zero_empty,
                                      **tune))


@pytest.mark.parametrize("H,tune,tiling", [
    (2048, {}, (128, 2, 1)), (7168, {}, (128, 4, 2)), (4096, {}, (128, 4, 1)),  # the measured defaults
    (2048, dict(vec=16), (128, 1, 1)), (7168, dict(vec=16), (128, 4, 1)), (2048, dict(tpr=256), (256, 1, 1)),
    (384, dict(tpr=256), (32, 2, 1)), (128, dict(vec=16, tpr=16), (8, 1, 1)), (7168, dict(max_iters=8), (128, 7, 1)),
])
def test_fp8_pack_tiling(H, tune, tiling):
    """A block's units on adjacent lanes (tpr from a block's lanes up to the row); the defaults are
    the kernel measured before the tiling became options (notes/kernels.md)."""
    t = kf.PackScatterFP8(DTYPES[0].values[0], H, 8, **tune).tiling
    assert (t.tpr, t.iters, t.chunks) == tiling


def test_the_impl_passes_its_fp8_options_to_the_kernel():
    from moebench.errors import ConfigError
    from moebench.impls.cute_impl import CuteImpl

    im = CuteImpl(fp8_vec=16, fp8_scales="row", fp8_tokens=2, fp8_tpr=64, fp8_min_ctas=4, threads=512, max_iters=2)
    assert im.fp8_tune == {"threads": 512, "hint": "none", "vec": 16, "scales": "row", "tokens": 2, "tpr": 64,
                           "min_ctas": 4, "max_iters": 2}
    # the defaults: what measured best on an H200 (16 channels per store, the scales staged per row)
    assert CuteImpl().fp8_tune == {"threads": 256, "hint": "none", "vec": 16, "scales": "row", "tokens": 1, "tpr": 0,
                                   "min_ctas": 0}
    kf.PackScatterFP8(DTYPES[0].values[0], 2048, 8, **im.fp8_tune)  # every key is the kernel's
    for bad in (dict(fp8_vec=4), dict(fp8_scales="smem"), dict(fp8_tokens=5), dict(fp8_tpr=48), dict(fp8_min_ctas=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CuteImpl(**bad)
