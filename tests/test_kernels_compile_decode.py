"""The decode path's kernels compile for sm_90a on a machine without a GPU: the one-launch
route + metadata for every router configuration ``impl=cute`` maps to and every metadata
variant (capacity, padding, renormalisation, alignment), the one-launch metadata of given ids,
and the pack / combine kernels whose grid is split along the rows; the pure-Python pieces
(column splits, decode tiles, shared memory, the impl's options) hold their invariants."""

from __future__ import annotations

import os

import pytest

cutlass = pytest.importorskip("cutlass")

from moebench import routing as R  # noqa: E402
from moebench.errors import ConfigError  # noqa: E402
from moebench.impls.cute_impl import CuteConfig, CuteImpl, router_static  # noqa: E402
from moebench.kernels import combine as kc  # noqa: E402
from moebench.kernels import decode as kd  # noqa: E402
from moebench.kernels import pack as kp  # noqa: E402
from moebench.kernels.common import RowTiling, col_splits  # noqa: E402
from test_kernels_compile_router import ROUTER_CASES  # noqa: E402  (router, E, k, bias): the same cases

BF16, FP16, FP32 = cutlass.BFloat16, cutlass.Float16, cutlass.Float32

#: (capacity, padded, drop_renorm, align): the metadata variants
META_CASES = [(False, False, False, 1), (True, False, True, 1), (True, True, False, 1), (False, False, False, 128),
              (True, False, False, 16), (True, True, False, 64)]


def _sm90a(fn) -> bool:
    return os.environ.get("CUTE_DSL_ARCH", "sm_90a") != "sm_90a" or "-arch sm_90a" in str(fn.ir_module)


def _router(router, E, k, bias, **tune):
    static = router_static(router, k, E, bias)
    k = 1 if router.name == "top1" else k
    return k, dict(static, has_bias=bias, max_per_lane=32, prefetch=True, **tune)


@pytest.mark.parametrize("router,E,k,bias", ROUTER_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_fused_route_metadata_compiles(router, E, k, bias):
    k, static = _router(router, E, k, bias)
    fn = kd.compile_route_metadata(BF16, E, k, False, False, False, 1, kd.DECODE_THREADS, **static)
    assert fn is not None and _sm90a(fn)


@pytest.mark.parametrize("capacity,padded,renorm,align", META_CASES)
def test_fused_route_metadata_variants_compile(capacity, padded, renorm, align):
    k, static = _router(R.RouterSpec(), 256, 8, False)
    assert kd.compile_route_metadata(BF16, 256, k, capacity, padded, renorm, align, 256, **static) is not None


@pytest.mark.parametrize("dtype,threads,max_per_lane,prefetch,merge", [
    (FP16, 128, 16, False, False), (FP32, 512, 8, True, True), (BF16, 1024, 16, True, False), (BF16, 256, 0, True, True),
    (FP32, 256, 0, True, True)])
def test_fused_route_metadata_tunings_compile(dtype, threads, max_per_lane, prefetch, merge):
    """The one-launch kernel's router tunings, the merge selection (sorting networks) among them."""
    static = dict(router_static(R.RouterSpec(), 8, 256, False), has_bias=False, max_per_lane=max_per_lane,
                  prefetch=prefetch, merge=merge)
    assert kd.compile_route_metadata(dtype, 256, 8, False, False, False, 1, threads, **static) is not None


@pytest.mark.parametrize("E,S", [(256, 8), (128, 8), (8, 2), (1024, 16), (60, 4), (16, 1)])
@pytest.mark.parametrize("capacity,padded,renorm,align", META_CASES[:4])
def test_fused_metadata_compiles(E, S, capacity, padded, renorm, align):
    fn = kd.compile_metadata(E, S, capacity, padded, renorm, align, kd.DECODE_THREADS)
    assert fn is not None and _sm90a(fn)


@pytest.mark.parametrize("threads", [128, 512, 1024])
def test_fused_metadata_threads_compile(threads):
    assert kd.compile_metadata(256, 8, True, False, True, 1, threads) is not None


def test_split_kernels_target_sm90a():
    """The pack and combine kernels take the grid's height (column splits) at run time."""
    for fn in (kp.compile_gather(BF16, 7168, threads=256, hint="none"),
               kp.compile_scatter(BF16, 7168, 8, True, per_slot=True, threads=256, hint="none", max_iters=1),
               kc.compile_combine(BF16, 7168, 8, True, threads=256, hint="none"),
               kc.compile_combine(BF16, 7168, 8, True, threads=256, hint="none", max_iters=1, prefetch_rows=585),
               kc.compile_combine(FP32, 2880, 4, False, threads=128, hint="none", prefetch_rows=728)):
        assert _sm90a(fn)


# -- pure-Python pieces --------------------------------------------------------------------


def _shares(chunks: int, splits: int) -> list[range]:
    """The chunk ranges of common.chunk_range, CTA by CTA of a grid ``splits`` high."""
    per = -(-chunks // splits)
    return [range(y * per, min(y * per + per, chunks)) for y in range(splits)]


@pytest.mark.parametrize("nvec,max_iters", [(896, 1), (896, 8), (256, 2), (33, 1), (2049, 1), (1, 1), (4096, 2)])
@pytest.mark.parametrize("ctas", [1, 4, 7, 64, 448, 1023, 1024, 5000])
@pytest.mark.parametrize("target", [0, 64, 1024])
def test_column_splits_cover_each_row_once(nvec, max_iters, ctas, target):
    t = RowTiling.make(nvec, max_iters, threads=256)
    s = col_splits(t, ctas, target)
    assert 1 <= s <= t.chunks
    shares = _shares(t.chunks, s)
    assert [c for r in shares for c in r] == list(range(t.chunks))  # every chunk once, in order
    assert all(len(r) for r in shares)  # no CTA without a chunk
    if target == 0 or ctas >= target or t.chunks == 1:
        assert s == 1
    else:  # a grid under the target is split, never into more shares than the row has chunks
        assert s >= 2
        assert s == t.chunks or ctas * s * len(shares[0]) >= min(target, ctas * t.chunks) // 2


def test_decode_splits_at_the_benchmark_shapes():
    """deepseek_v3 (H 7168, k 8, bf16): combine's rows are 7 chunks, so T 1 runs on 7 CTAs, not 1;
    T 16384 keeps a grid 1 high (no change at large T)."""
    t = kc.combine_tiling(BF16, 7168, 8, threads=256, hint="none")
    assert (t.tpr, t.iters, t.chunks) == (128, 1, 7)
    assert col_splits(t, t.grid(1)) == 7 and col_splits(t, t.grid(128)) == 7
    assert col_splits(t, t.grid(16384)) == 1
    p = kp.pack_tiling(BF16, 7168, threads=256, hint="none")
    assert p.chunks == 1 and col_splits(p, 4) == 1  # the default pack tiling: one chunk of 7 vectors
    p1 = kp.pack_tiling(BF16, 7168, threads=256, hint="none", max_iters=1)
    assert p1.chunks == 7 and col_splits(p1, 4) == 7


def test_few_ctas_take_one_vector_per_thread():
    """A grid that does not fill the GPU once moves one vector per thread (more chunks, more
    column splits); a larger grid, or a max_iters the user gave, is left as it is."""
    from moebench.kernels.common import FEW_CTAS, few_ctas_tune

    base = {"threads": 256, "hint": "none"}
    assert few_ctas_tune(base, 4) == {**base, "max_iters": 1}
    assert few_ctas_tune(base, FEW_CTAS - 1)["max_iters"] == 1
    assert few_ctas_tune(base, FEW_CTAS) == base
    assert few_ctas_tune({**base, "max_iters": 4}, 1) == {**base, "max_iters": 4}
    # the pack takes it where a thread had more than MIN_ITERS vectors: deepseek_v3's 7 and
    # gpt_oss_120b's 3 become 7 and 3 chunks at T 1; qwen3_30b_a3b's 2 (one chunk) stay
    assert kp.pack_tiling(BF16, 7168, **kp.pack_tune(BF16, 7168, 4, **base)).chunks == 7
    assert kp.pack_tiling(BF16, 2880, **kp.pack_tune(BF16, 2880, 1, **base)).chunks == 3
    assert kp.pack_tune(BF16, 2048, 1, **base) == base
    assert kp.pack_tune(BF16, 7168, FEW_CTAS, **base) == base


@pytest.mark.parametrize("H,S,T,R,prefetch", [(7168, 8, 2, 16, True), (7168, 8, 16, 128, True), (2048, 8, 256, 2048, True),
                                              (2048, 8, 512, 4096, False),
                                              (7168, 8, 1024, 8192, False), (7168, 8, 16384, 131072, False),
                                              (4096, 2, 1, 10**6, False)])
def test_combine_prefetches_small_packed_rows(H, S, T, R, prefetch):
    """The L2 prefetch is compiled in where the packed rows total at most PREFETCH_BYTES (decode
    sizes; a capacity's many rows at few tokens do not qualify) and are more than STAGE_ROWS,
    never with prefetch_bytes=0; the tiling it runs with is the one the host sizes the grid with."""
    tune = kc.combine_tune(BF16, H, S, T, R, threads=256, hint="none")
    assert ("prefetch_rows" in tune) == prefetch and "stage_rows" not in tune
    if prefetch:
        assert tune["prefetch_rows"] == kc.PREFETCH_BYTES // (2 * H) >= R
    assert "prefetch_rows" not in kc.combine_tune(BF16, H, S, T, R, 0, threads=256, hint="none")
    assert kc.combine_tiling(BF16, H, S, **tune) == kc.Combine(BF16, H, S, **tune).tiling


@pytest.mark.parametrize("dtype,H,S,T,R", [(BF16, 7168, 8, 1, 8), (BF16, 2880, 4, 2, 8), (BF16, 2048, 8, 1, 8),
                                           (FP32, 4096, 2, 1, 2), (BF16, 7176, 1, 3, 3)])
def test_combine_stages_a_few_packed_rows(dtype, H, S, T, R):
    """At most STAGE_ROWS packed rows (a token at k 8) are staged in shared memory instead of the
    L2 prefetch (both never at once); stage_rows=0 gives the prefetch back; the staged kernel
    compiles for sm_90a (cp.async into each thread's own slots) within 48 KB of shared memory."""
    tune = kc.combine_tune(dtype, H, S, T, R, threads=256, hint="none")
    assert tune["stage_rows"] == kc.STAGE_ROWS >= R and "prefetch_rows" not in tune
    off = kc.combine_tune(dtype, H, S, T, R, stage_rows=0, threads=256, hint="none")
    assert "stage_rows" not in off and "prefetch_rows" in off
    op = kc.Combine(dtype, H, S, **tune)
    assert op.tiling == kc.combine_tiling(dtype, H, S, **tune) and op.smem_bytes <= kc.STAGE_BYTES
    assert kc.compile_combine(dtype, H, S, True, **tune) is not None
    with pytest.raises(AssertionError):
        kc.Combine(dtype, H, S, stage_rows=8, prefetch_rows=8)


@pytest.mark.parametrize("E,dtype,threads,tile", [(256, BF16, 256, 32), (128, BF16, 256, 64), (8, BF16, 256, 256),
                                                  (1024, BF16, 256, 8), (256, FP32, 512, 64), (256, BF16, 128, 16)])
def test_decode_tile_is_one_step_of_the_lane_groups(E, dtype, threads, tile):
    static = dict(router_static(R.RouterSpec(), 2, E, False), has_bias=False, max_per_lane=32, prefetch=True)
    assert kd.route_tile(dtype, E, 2, threads, **static) == tile


@pytest.mark.parametrize("E,S,capacity,threads", [(256, 8, False, 256), (1024, 16, True, 256), (1024, 16, True, 512),
                                                  (256, 8, True, 1024)])
def test_decode_kernels_fit_shared_memory(E, S, capacity, threads):
    op = kd.FusedRouteMetadata(BF16, E, S, capacity=capacity, threads=threads, score="logit", weight="prob")
    assert kd.fits(op)
    assert kd.fits(kd.FusedMetadata(E, S, capacity=capacity, threads=threads))


@pytest.mark.parametrize("E,k,threads,meta,direct", [
    (256, 8, 256, {}, 32), (128, 8, 256, {}, 32), (8, 2, 256, {}, 32), (1024, 16, 256, {}, 32),
    (256, 8, 256, {"direct_pairs": 128}, 128), (1024, 16, 256, {"direct_pairs": 256}, 128),  # a tile: 8 tokens
    (256, 8, 256, {"direct_pairs": 0}, 0), (256, 8, 256, {"direct_pairs": 1024}, 256),  # capped at the threads
    (256, 8, 256, {"capacity": True}, 0), (256, 8, 256, {"padded": True, "capacity": True}, 0),
    (256, 8, 256, {"align": 16}, 0)])
def test_direct_metadata_only_dropless_unaligned(E, k, threads, meta, direct):
    """The scan-free metadata: dropless, unpadded, align 1, at most one pair per thread and
    one tile's pairs; the kernel with it and the one without both compile for sm_90a."""
    static = dict(router_static(R.RouterSpec(), k, E, False), has_bias=False, max_per_lane=32, prefetch=True)
    op = kd.FusedRouteMetadata(BF16, E, k, threads=threads, **meta, **static)
    assert op.direct_pairs == direct
    if direct:
        assert op.direct_pairs <= min(op.threads, op.tile * k)


@pytest.mark.parametrize("E,k,meta,warp", [
    (256, 8, {}, 256), (256, 8, {"warp_pairs": 256}, 256), (128, 4, {"warp_pairs": 256}, 256),
    (8, 2, {"warp_pairs": 256}, 256), (128, 8, {"threads": 128, "warp_pairs": 256}, 128),  # capped at the threads
    (1024, 16, {"warp_pairs": 256}, 0), (384, 8, {"warp_pairs": 256}, 0),  # more experts than threads: the scan
    (256, 8, {"warp_pairs": 100}, 100), (256, 8, {"warp_pairs": 32}, 0),
    (256, 8, {"direct_pairs": 256, "warp_pairs": 256}, 0),  # not above the direct bound: off
    (256, 8, {"capacity": True, "warp_pairs": 256}, 0), (256, 8, {"align": 16, "warp_pairs": 256}, 0)])
def test_warp_ranked_metadata_bound(E, k, meta, warp):
    """The warp-ranked metadata: dropless, unpadded, align 1, E at most the threads, above the
    direct bound, at most one pair per thread and one tile's pairs."""
    static = dict(router_static(R.RouterSpec(), k, E, False), has_bias=False, max_per_lane=32, prefetch=True)
    op = kd.FusedRouteMetadata(BF16, E, k, **{"threads": 256, **meta}, **static)
    assert op.warp_pairs == warp
    if warp:
        assert op.direct_pairs < op.warp_pairs <= min(op.threads, op.tile * k)
        assert kd.fits(op)


@pytest.mark.parametrize("direct_pairs,warp_pairs", [(0, 0), (40, 0), (128, 0), (32, 256), (0, 256), (32, 100)])
def test_fused_route_metadata_direct_pairs_compile(direct_pairs, warp_pairs):
    k, static = _router(R.RouterSpec(), 128, 8, False)
    fn = kd.compile_route_metadata(BF16, 128, k, False, False, False, 1, 256, direct_pairs=direct_pairs,
                                   warp_pairs=warp_pairs, **static)
    assert fn is not None and _sm90a(fn)


def test_decode_kernel_too_large_for_shared_memory_is_refused():
    # E 1024, S 16 at 1024 threads: the bit words alone are 2 x 128 KB
    assert not kd.fits(kd.FusedMetadata(1024, 16, capacity=True, threads=1024))


def test_impl_decode_options():
    im = CuteImpl(decode_tokens=0, decode_threads=512, split_ctas=0, prefetch_mb=0)
    assert (im.decode_tokens, im.decode_threads, im.split_ctas, im.prefetch_bytes) == (0, 512, 0, 0)
    assert CuteImpl(prefetch_mb=2).prefetch_bytes == 2 << 20
    c = CuteConfig()
    assert (c.decode_tokens, c.decode_threads, c.split_ctas) == (32, 256, 1024)
    for kw, msg in [({"decode_tokens": -1}, "decode_tokens"), ({"decode_tokens": 10**6}, "decode_tokens"),
                    ({"decode_threads": 96}, "decode_threads"), ({"split_ctas": True}, "split_ctas"),
                    ({"split_ctas": 1.5}, "split_ctas"), ({"prefetch_mb": -1}, "prefetch_mb"),
                    ({"prefetch_mb": True}, "prefetch_mb"), ({"decode_direct_pairs": -1}, "decode_direct_pairs"),
                    ({"decode_direct_pairs": 2048}, "decode_direct_pairs"),
                    ({"decode_warp_pairs": -1}, "decode_warp_pairs"), ({"decode_warp_pairs": "all"}, "decode_warp_pairs")]:
        with pytest.raises(ConfigError, match=msg):
            CuteImpl(**kw)
    assert CuteImpl(decode_direct_pairs=0).decode_direct_pairs == 0


def test_the_impl_defaults_are_the_kernels():
    """cute_impl imports the kernels lazily, so it holds its own copy of their defaults: they must agree."""
    from moebench.impls import cute_impl
    from moebench.kernels import common

    assert cute_impl.SPLIT_CTAS == common.SPLIT_CTAS
    assert cute_impl.PREFETCH_MB << 20 == kc.PREFETCH_BYTES
    assert cute_impl.DECODE_THREADS == kd.DECODE_THREADS
    assert cute_impl.DIRECT_PAIRS == kd.DIRECT_PAIRS == CuteConfig().decode_direct_pairs
    assert cute_impl.WARP_PAIRS == kd.WARP_PAIRS == CuteConfig().decode_warp_pairs
    c = CuteConfig()
    assert (c.split_ctas, c.decode_threads) == (common.SPLIT_CTAS, kd.DECODE_THREADS)
