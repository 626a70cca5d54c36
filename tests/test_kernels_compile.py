"""Every CuTeDSL kernel variant compiles for sm_90a, on a machine without a GPU.

``cute.compile`` runs the whole pipeline (MLIR -> PTX -> ptxas) on the CPU; tests/conftest.py
sets ``CUTE_DSL_ARCH=sm_90a`` when no GPU is visible. Each variant is compiled through the
same cached entry points the implementation uses (``compile_gather`` / ``compile_scatter`` /
``compile_combine``), with dynamic token and row counts.
"""

from __future__ import annotations

import os

import pytest
import torch

cutlass = pytest.importorskip("cutlass")

from moebench.impls.base import Unsupported  # noqa: E402
from moebench.impls.cute_impl import CuteImpl  # noqa: E402
from moebench.kernels import combine as kc  # noqa: E402
from moebench.kernels import pack as kp  # noqa: E402
from moebench.kernels.common import TORCH_TO_CUTE, RowTiling  # noqa: E402

DTYPES = [pytest.param(TORCH_TO_CUTE[d], id=str(d).removeprefix("torch.")) for d in TORCH_TO_CUTE]
#: an exact tiling (seed) and one whose last chunk is predicated (H not a multiple of the tile)
HS = [4096, 520]
#: (S, weighted) pairs for combine: 1 to 16 slots, both flags
SLOT_CASES = [(1, True), (2, False), (8, True), (16, False), (16, True)]
#: (S, zero_empty) pairs for scatter-pack
SCATTER_CASES = [(1, True), (8, False), (16, True)]


def _targets_sm90a(compiled) -> bool:
    """The embedded cubin was assembled by ptxas for sm_90a."""
    return "-arch sm_90a" in str(compiled.ir_module)


@pytest.mark.parametrize("H", HS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_gather_compiles(dtype, H):
    assert kp.compile_gather(dtype, H, threads=256, hint="none") is not None


@pytest.mark.parametrize("S,zero_empty", SCATTER_CASES)
@pytest.mark.parametrize("H", HS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_scatter_compiles(dtype, H, S, zero_empty):
    for per_slot in (False, True):
        assert kp.compile_scatter(dtype, H, S, zero_empty, per_slot=per_slot, threads=256, hint="none") is not None


@pytest.mark.parametrize("S,weighted", SLOT_CASES)
@pytest.mark.parametrize("H", HS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_compiles(dtype, H, S, weighted):
    assert kc.compile_combine(dtype, H, S, weighted, threads=256, hint="none") is not None


@pytest.mark.parametrize("threads,hint", [(128, "stream"), (512, "none")])
def test_tuning_variants_compile(threads, hint):
    bf16 = cutlass.BFloat16
    assert kp.compile_gather(bf16, 7168, threads=threads, hint=hint) is not None
    assert kp.compile_scatter(bf16, 7168, 8, True, threads=threads, hint=hint) is not None
    assert kc.compile_combine(bf16, 7168, 8, True, threads=threads, hint=hint) is not None


@pytest.mark.parametrize("H,S", [(4096, 2), (7168, 8), (2048, 8)])
def test_default_scatter_tuning_compiles(H, S):
    """The configurations the implementation picks at the benchmark shapes."""
    tune = kp.scatter_tuning(cutlass.BFloat16, H)
    assert tune == {"per_slot": H * 2 >= kp.PER_SLOT_MIN_ROW_BYTES}
    assert kp.compile_scatter(cutlass.BFloat16, H, S, False, threads=256, hint="none", **tune) is not None


@pytest.mark.parametrize("H,pairs,per_slot", [(2048, 8, True), (2048, 128, True), (2048, 131, True),
                                              (2048, 132, False), (2048, 1024, False), (2880, 64, True),
                                              (2880, 512, False), (7168, 131072, True), (4096, 10**6, True)])
def test_scatter_per_slot_for_long_rows_or_a_decode_batch(H, pairs, per_slot):
    """Per (token, slot) for rows of 8 KB or more, and for shorter ones where the pairs are
    fewer than FEW_CTAS; a choice the user made stands."""
    from moebench.kernels.common import FEW_CTAS

    assert FEW_CTAS == 132
    assert kp.scatter_tuning(cutlass.BFloat16, H, pairs=pairs) == {"per_slot": per_slot}
    assert kp.scatter_tuning(cutlass.BFloat16, H, False, pairs) == {"per_slot": False}
    assert kp.scatter_tuning(cutlass.BFloat16, H, True, pairs) == {"per_slot": True}


@pytest.mark.parametrize("H,iters,chunks", [(4096, 2, 2), (7168, 7, 1), (2048, 2, 1)])
def test_pack_tiling_at_the_benchmark_shapes(H, iters, chunks):
    """The tilings measured best on the H200 (notes/kernels.md) are the defaults."""
    t = kp.PackScatter(cutlass.BFloat16, H, 8).tiling
    assert (t.tpr, t.iters, t.chunks, t.threads) == (128, iters, chunks, 256)


def test_artifacts_target_sm90a():
    if os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a":
        pytest.skip("CUTE_DSL_ARCH names another target")
    bf16 = cutlass.BFloat16
    for fn in (kp.compile_gather(bf16, 4096, threads=256, hint="none"),
               kp.compile_scatter(bf16, 4096, 2, True, threads=256, hint="none"),
               kc.compile_combine(bf16, 4096, 2, True, threads=256, hint="none")):
        assert _targets_sm90a(fn)


def test_compile_cache_is_keyed_on_static_config_only():
    bf16 = cutlass.BFloat16
    a = kc.compile_combine(bf16, 2048, 8, True, threads=256, hint="none")
    hits = kc._cache.hits
    assert kc.compile_combine(bf16, 2048, 8, True, threads=256, hint="none") is a
    assert kc._cache.hits == hits + 1
    assert kc.compile_combine(bf16, 2048, 8, False, threads=256, hint="none") is not a


# -- pure-Python pieces: the row tiling and the option / shape checks ----------------------


@pytest.mark.parametrize("nvec", [1, 2, 3, 5, 64, 65, 256, 512, 513, 896, 1023, 4096])
@pytest.mark.parametrize("max_iters", [1, 2, 8])
def test_row_tiling_covers_the_row(nvec, max_iters):
    t = RowTiling.make(nvec, max_iters, threads=256)
    assert 1 <= t.iters <= max_iters and t.tpr & (t.tpr - 1) == 0 and t.tpr <= 128
    assert t.tpr * t.iters * t.chunks >= nvec  # every vector has a thread
    assert t.tpr * t.iters * (t.chunks - 1) < nvec or t.chunks == 1  # no empty chunk
    assert t.predicated == (t.tpr * t.iters * t.chunks != nvec)
    assert t.rows_per_cta * t.tpr == 256


def test_impl_options_and_unsupported_reasons():
    with pytest.raises(ValueError, match="pack_mode"):
        CuteImpl(pack_mode="sideways")
    with pytest.raises(ValueError, match="cache_hint"):
        CuteImpl(cache_hint="evict")
    with pytest.raises(ValueError, match="scatter_per_slot"):
        CuteImpl(scatter_per_slot="sometimes")
    with pytest.raises(ValueError, match="impl.router_merge='often' is not accepted; accepted: auto, true, false"):
        CuteImpl(router_merge="often")
    with pytest.raises(ValueError, match="impl.router_stages=5 is not accepted"):
        CuteImpl(router_stages=5)
    with pytest.raises(ValueError, match="impl.router_min_ctas=5 is not accepted"):
        CuteImpl(router_min_ctas=5)
    with pytest.raises(ValueError, match=r"impl.select_tile=-1 is not accepted; an integer in 0..16384"):
        CuteImpl(select_tile=-1)
    from moebench.impls.cute_impl import MERGE_TOKENS
    tune = CuteImpl().tune_route  # auto: sorting networks up to MERGE_TOKENS tokens
    assert tune(MERGE_TOKENS)["merge"] and not tune(MERGE_TOKENS + 1)["merge"]
    assert CuteImpl(router_merge=True).tune_route(16384)["merge"] and not CuteImpl(router_merge=False).tune_route(1)["merge"]
    from moebench.impls.cute_impl import FP32_SELECT
    sel = CuteImpl().tune_select  # auto: fp32 logits from E 128 above MERGE_TOKENS take FP32_SELECT
    assert {key: sel(16384, 256, torch.float32)[key] for key in FP32_SELECT} == FP32_SELECT
    assert sel(16384, 256, torch.bfloat16)["tile"] is None and sel(16384, 64, torch.float32)["threads"] == 512
    assert sel(MERGE_TOKENS, 256, torch.float32)["merge"] and sel(MERGE_TOKENS, 256, torch.float32)["threads"] == 512
    assert CuteImpl(select_tuning="route").tune_select(16384, 256, torch.float32)["min_ctas"] == 0
    assert CuteImpl(select_tile=64).tune_select(16384, 256, torch.float32)["tile"] == 64
    with pytest.raises(ValueError, match="impl.select_tuning='fast' is not accepted; accepted: auto, route"):
        CuteImpl(select_tuning="fast")
    im = CuteImpl()
    assert im.resolve_pack_mode(8) == "scatter" and im.resolve_pack_mode(128) == "gather"
    with pytest.raises(Unsupported, match="S=128"):
        CuteImpl(pack_mode="scatter").resolve_pack_mode(128)
    with pytest.raises(Unsupported, match="cuda only"):
        im.pack(torch.zeros(4, 16), None)
