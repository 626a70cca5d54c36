"""The router and metadata kernels compile for sm_90a on a machine without a GPU, for every
router configuration ``impl=cute`` maps the reference routers to, and the pure-Python pieces
(lane layout, tile size, router mapping) hold their invariants."""

from __future__ import annotations

import pytest

cutlass = pytest.importorskip("cutlass")

from moebench import routing as R  # noqa: E402
from moebench.impls.base import Unsupported  # noqa: E402
from moebench.impls.cute_impl import router_static  # noqa: E402
from moebench.kernels import lanes as kl  # noqa: E402
from moebench.kernels import metadata as km  # noqa: E402
from moebench.kernels import router as kr  # noqa: E402

BF16, FP16, FP32 = cutlass.BFloat16, cutlass.Float16, cutlass.Float32

#: (router, E, k, bias): every static mapping, at the shapes real models use
ROUTER_CASES = [
    (R.RouterSpec(), 256, 8, False),
    (R.RouterSpec(renormalize=True), 128, 2, False),
    (R.RouterSpec("top1"), 8, 1, False),
    (R.RouterSpec("topk_softmax", temperature=0.5), 60, 4, False),
    (R.RouterSpec("topk_softmax", normalize="sum"), 384, 8, False),
    (R.RouterSpec("topk_hard"), 1024, 16, False),
    (R.RouterSpec("sigmoid_bias", bias_std=0.1, scaling=2.5), 384, 8, True),
    (R.RouterSpec("group_limited", n_group=8, topk_group=4, bias_std=0.1, scaling=2.5), 256, 8, True),
    (R.RouterSpec("group_limited", n_group=8, topk_group=3, score="softmax", group_score="max"), 160, 6, False),
]


@pytest.mark.parametrize("router,E,k,bias", ROUTER_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_router_compiles(router, E, k, bias):
    static = router_static(router, k, E, bias)
    k = 1 if router.name == "top1" else k
    assert kr.compile_router(BF16, E, k, **dict(static, has_bias=static.get("has_bias", False))) is not None


@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_router_compiles_other_dtypes(dtype):
    assert kr.compile_router(dtype, 256, 8, score="logit", weight="prob", has_bias=False) is not None


@pytest.mark.parametrize("E,k,weight", [(256, 8, "prob"), (128, 4, "value"), (1000, 16, "softmax_k"),
                                        (128, 2, "prob"), (8, 8, "value")])
def test_router_fp32_selection_by_shape(E, k, weight):
    """fp32 logits: truncated keys (with the tie check and the exact fallback) from
    FP32_KEYS_MIN_K slots and FP32_KEYS_MIN_E experts on, the exact selection below; both
    compile for sm_90a. 16-bit logits always take their exact keys."""
    keyed = k >= kr.FP32_KEYS_MIN_K and E >= kr.FP32_KEYS_MIN_E
    assert kr.TopKRouter(FP32, E, k, weight=weight).keyed is keyed
    assert kr.TopKRouter(BF16, E, k, weight=weight).keyed
    assert not kr.TopKRouter(FP32, E, k, score="sigmoid").keyed
    assert kr.compile_router(FP32, E, k, score="logit", weight=weight, has_bias=False) is not None


@pytest.mark.parametrize("dtype,E,k,threads,V", [(FP32, 256, 8, 512, 16), (FP32, 128, 16, 1024, 16), (FP32, 256, 8, 256, 32),
                                               (FP32, 256, 4, 512, 16), (FP32, 128, 2, 512, 16), (FP32, 256, 1, 512, 32),
                                               (FP32, 64, 8, 512, 32), (BF16, 256, 8, 512, 32)])
def test_router_default_lane_experts(dtype, E, k, threads, V):
    """max_per_lane=0 (the default) holds 16 experts a lane for fp32 logits from E 128 and k 2 in
    CTAs of 512+ threads (32 spill there), 32 elsewhere; an explicit value is kept."""
    assert kr.TopKRouter(dtype, E, k, threads=threads).lanes.V == V
    assert kr.TopKRouter(dtype, E, k, threads=threads, max_per_lane=32).lanes.V == min(32, E)
    assert kr.compile_router(dtype, E, k, threads=threads, has_bias=False) is not None


@pytest.mark.parametrize("E,k", [(256, 8), (128, 2), (1000, 16)])
def test_router_register_cap_compiles(E, k):
    """The fp32 select stage's tuning (impl.select_tuning=auto: 256 threads, 16 experts a lane,
    registers capped for 4 CTAs an SM, no prefetch) and a capped route kernel compile for sm_90a
    (no device: the default shared-memory carveout)."""
    from moebench.impls.cute_impl import FP32_SELECT
    tune = {key: v for key, v in FP32_SELECT.items() if key != "tile"}
    assert kr.TopKRouter(FP32, E, k, **tune).min_ctas == 4
    assert kr.compile_router(FP32, E, k, score="logit", weight="value", hist=False, values_in_dtype=True,
                             has_bias=False, **tune) is not None
    assert kr.compile_router(FP32, E, k, has_bias=False, min_ctas=2) is not None


@pytest.mark.parametrize("dtype,E,k,max_per_lane,vec", [
    (BF16, 8, 8, 32, 4), (BF16, 8, 2, 32, 2), (FP32, 8, 6, 32, 2), (BF16, 128, 8, 32, 2), (FP32, 128, 8, 32, 2),
    (BF16, 128, 2, 32, 1), (BF16, 256, 8, 32, 1), (BF16, 160, 6, 32, 1), (BF16, 8, 8, 2, 2), (FP16, 64, 16, 4, 1)])
def test_router_store_vectors_and_the_select_kernel(dtype, E, k, max_per_lane, vec):
    """A lane writes its token's k / G consecutive slots as vectors (up to 4 elements) where G
    divides k and k / G >= 2, else a slot a lane; the select stage's kernel (no histogram, the
    values in the logits' dtype) and the route kernel both compile for sm_90a either way."""
    op = kr.TopKRouter(dtype, E, k, max_per_lane=max_per_lane)
    assert op.store_vec == vec and kr.TopKRouter(dtype, E, k, max_per_lane=max_per_lane, vector_store=False).store_vec == 1
    sel = kr.TopKRouter(dtype, E, k, weight="value", hist=False, values_in_dtype=True, max_per_lane=max_per_lane)
    assert sel.out_dtype is dtype and not sel.hist and op.out_dtype is FP32
    with pytest.raises(AssertionError):
        kr.TopKRouter(dtype, E, k, weight="prob", values_in_dtype=True)  # only the select's values
    for static in (dict(), dict(weight="value", hist=False, values_in_dtype=True), dict(vector_store=False)):
        assert kr.compile_router(dtype, E, k, max_per_lane=max_per_lane, has_bias=False, **static) is not None


@pytest.mark.parametrize("dtype,E,k,static", [
    (FP32, 256, 8, dict(merge=True)), (FP32, 256, 2, dict(merge=True, stages=3)), (BF16, 256, 8, dict(stages=4)),
    (FP32, 128, 8, dict(merge=True, stages=3)), (BF16, 8, 8, dict(merge=True, stages=2)),
    (FP16, 160, 6, dict(merge=True)), (FP32, 1000, 16, dict(merge=True, stages=2, threads=256)),
    (FP32, 64, 3, dict(merge=True))])
def test_router_merge_and_ring_compile(dtype, E, k, static):
    """The merge selection (sorting networks over the keys: n = k rounded up to a power of two)
    and the shared-memory row ring compile for sm_90a, for the route and the select kernel."""
    op = kr.TopKRouter(dtype, E, k, **static)
    assert op.merge == static.get("merge", False) and op.keyed
    assert op.merge_n == 1 << (k - 1).bit_length() and op.stages == static.get("stages", 0)
    for weight in (dict(weight="prob"), dict(weight="value", hist=False, values_in_dtype=True)):
        assert kr.compile_router(dtype, E, k, has_bias=False, **static, **weight) is not None


def test_router_merge_and_ring_bounds():
    """Merge needs a lane to hold n keys and the logits selected as they are; a ring that would
    not fit RING_BYTES takes fewer stages, under 2 none (the rows through registers)."""
    assert not kr.TopKRouter(BF16, 8, 8, max_per_lane=2, merge=True).merge  # 2 keys a lane, n 8
    assert not kr.TopKRouter(BF16, 256, 8, score="sigmoid", merge=True).merge
    assert not kr.TopKRouter(BF16, 256, 8, n_group=8, topk_group=4, merge=True).merge
    assert kr.TopKRouter(FP32, 8, 2, merge=True).keyed and not kr.TopKRouter(FP32, 8, 2).keyed
    per_stage = 512 * 32 * 4  # fp32, 512 threads, 32 a lane
    assert kr.TopKRouter(FP32, 1024, 16, max_per_lane=32, stages=8).stages == kr.RING_BYTES // per_stage == 3
    assert kr.TopKRouter(FP32, 1024, 16, max_per_lane=32, stages=2).stages == 2
    assert kr.TopKRouter(FP32, 1024, 16, threads=1024, max_per_lane=32, stages=8).stages == 0  # 1 would fit


@pytest.mark.parametrize("dtype,E,k,static,V,carry_next", [
    (FP32, 256, 8, dict(merge=True, threads=128, prefetch=False), 64, True),
    (FP32, 128, 2, dict(merge=True, threads=128, prefetch=False, min_ctas=6), 64, True),
    (FP32, 256, 6, dict(merge=True, threads=512, min_ctas=1), 64, False),  # n 8 > k: the 8th key
    (FP32, 256, 8, dict(threads=128), 64, False),  # keyed, one pass a slot
    (BF16, 256, 8, dict(merge=True, threads=128), 64, False),  # exact keys: no tie check
    (FP32, 1000, 16, dict(merge=True, threads=256), 63, True)])
def test_router_wide_layout_compiles(dtype, E, k, static, V, carry_next):
    """64 experts a lane (``max_per_lane=64``, kernels.lanes.WIDE_PER_LANE) where the selection is
    keyed: the route and the select kernel compile for sm_90a; fp32's merge at n = k carries the
    k + 1-th key through the networks."""
    op = kr.TopKRouter(dtype, E, k, max_per_lane=64, **static)
    assert op.wide and op.keyed and op.lanes.V == V
    assert (op.merge and dtype is FP32 and op.merge_n == k) == carry_next
    for weight in (dict(weight="prob"), dict(weight="value", hist=False, values_in_dtype=True)):
        assert kr.compile_router(dtype, E, k, has_bias=False, max_per_lane=64, **static, **weight) is not None


def test_router_wide_layout_only_where_keyed():
    """Where the selection is not keyed (sigmoid scores, groups, fp32 below FP32_KEYS_MIN_K
    without merge) max_per_lane=64 holds MAX_PER_LANE at most: it is a most, and the exact
    per-slot selection keeps every expert in registers twice."""
    for op in (kr.TopKRouter(FP32, 256, 8, score="sigmoid", max_per_lane=64),
               kr.TopKRouter(BF16, 256, 8, n_group=8, topk_group=4, max_per_lane=64),
               kr.TopKRouter(FP32, 256, 2, max_per_lane=64)):
        assert not op.wide and op.lanes.V == kl.MAX_PER_LANE
    assert kr.TopKRouter(FP32, 256, 2, max_per_lane=64, merge=True).wide
    assert not kr.TopKRouter(FP32, 32, 8, max_per_lane=64).wide  # 32 experts: one lane of 32
    with pytest.raises(AssertionError):
        kl.LaneLayout.make(256, 4, max_per_lane=128)


@pytest.mark.parametrize("E,S,capacity,padded,renorm", [
    (256, 8, False, False, False), (128, 2, True, False, True), (160, 6, True, True, False),
    (1024, 16, False, False, False), (8, 1, True, False, False)])
def test_metadata_kernels_compile(E, S, capacity, padded, renorm):
    assert km.compile_indices(E, S, capacity, padded, renorm) is not None
    assert km.compile_histogram(E, S) is not None


@pytest.mark.parametrize("E,S,capacity,padded,align", [(256, 8, False, False, 128), (128, 2, True, False, 16),
                                                       (160, 6, True, True, 64), (8, 1, False, False, 16)])
def test_aligned_metadata_kernels_compile(E, S, capacity, padded, align):
    assert km.compile_indices(E, S, capacity, padded, False, align) is not None


@pytest.mark.parametrize("E", [1, 7, 8, 60, 64, 100, 128, 160, 256, 384, 512, 1000, 1024])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_lane_layout_covers_the_experts(E, elem_bytes):
    L = kl.LaneLayout.make(E, elem_bytes)
    assert L.G & (L.G - 1) == 0 and L.G <= 32 and L.V <= kl.MAX_PER_LANE
    assert L.G * L.V >= E and (L.G - 1) * L.V < E  # every expert has a lane, no lane is empty
    assert L.V % L.W == 0 and E % L.W == 0 and L.W * elem_bytes <= 16


@pytest.mark.parametrize("E,n_group", [(256, 8), (160, 8), (64, 4), (8, 8), (8, 2)])
def test_lane_layout_keeps_groups_whole(E, n_group):
    gs = E // n_group
    L = kl.LaneLayout.make(E, 2, gs)
    assert L.V % gs == 0 and L.G * L.V >= E


@pytest.mark.parametrize("T", [1, 31, 32, 33, 4096, 16384, 16385, 131072, 10**6, 3 * 10**6, 10**8])
def test_tiles_cover_the_tokens(T):
    tile = km.tile_size(T)
    n = km.num_tiles(T, tile)
    assert tile % 32 == 0 and n * tile >= T and (n - 1) * tile < T
    assert tile <= km.MAX_TILE < 2**15  # a tile's count of one expert fits the int16 histogram
    assert n <= km.TARGET_TILES or tile == km.MAX_TILE


@pytest.mark.parametrize("E", [1, 7, 8, 60, 256, 1000, 1024])
def test_hist_rows_are_whole_16_byte_vectors(E):
    cols = km.hist_cols(E)
    assert cols >= E and cols % 8 == 0 and cols - E < 8


@pytest.mark.parametrize("E,S,capacity", [(256, 8, False), (1024, 16, False), (1024, 16, True), (512, 16, True),
                                          (8, 2, False), (60, 4, True)])
def test_metadata_static_choices(E, S, capacity):
    """Sorted gather writes where E >= 32 and shared memory allows; overlap at S < 4."""
    m = km.MetadataIndices(E, S, capacity=capacity)
    assert m.overlap == (S < 4)
    if E < 32:
        assert not m.sorted_gather
    if E == 256:
        assert m.sorted_gather
    if E == 1024 and S == 16:
        assert not m.sorted_gather  # bits, prefixes and the sorted rows would not fit
    with pytest.raises(AssertionError):
        km.MetadataIndices(1024, 16, sorted_gather=True)


@pytest.mark.parametrize("sorted_gather,overlap", [(True, True), (False, False)])
def test_metadata_variants_compile(sorted_gather, overlap):
    assert km.compile_indices(256, 8, True, True, True, sorted_gather=sorted_gather, overlap=overlap) is not None


def test_router_mapping_and_unsupported_reasons():
    assert router_static(R.RouterSpec(), 8, 256, False) == dict(score="logit", weight="prob", renormalize=False)
    s = router_static(R.RouterSpec("sigmoid_bias", scaling=2.5), 8, 256, True)
    assert s["score"] == "sigmoid" and s["weight"] == "score" and s["has_bias"] and s["scaling"] == 2.5
    for router, k, E, bias, msg in [
        (R.RouterSpec("hash"), 2, 64, False, "not a per-token top-k"),
        (R.RouterSpec(), 2, 2048, False, "at most 1024"),
        (R.RouterSpec(), 17, 64, False, "at most 16"),
        (R.RouterSpec("sigmoid_bias", score="softmax"), 2, 64, True, "bias_std=0"),
        (R.RouterSpec("group_limited", n_group=2, score="softmax"), 2, 64, False, "group_score=max"),
        (R.RouterSpec("group_limited", n_group=2), 2, 128, False, "at most 32 experts per group"),
    ]:
        with pytest.raises(Unsupported, match=msg):
            router_static(router, k, E, bias)
