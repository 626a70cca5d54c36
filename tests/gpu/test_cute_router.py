"""impl=cute route and metadata on a GPU: exact agreement with the reference.

ids, counts, offsets, gather and scatter indices must be equal; gate weights within 1e-5.
Every output the kernels allocate is poisoned first (``torch.empty`` in the kernel modules
is replaced by a poisoning one), so an element a kernel leaves unwritten fails the test.
Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from moebench import routing as R
from moebench.check import assert_close, check_metadata
from moebench.impls.base import Unsupported
from moebench.impls.cute_impl import CuteImpl, router_static
from moebench.logits import make_logits

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_empty")]  # every output starts as poison

DROPLESS = R.CapacitySpec()


def _logits(kind, T, E, dtype=torch.bfloat16, seed=0, ties=False):
    lg = make_logits(kind, T, E, seed=seed, dtype=torch.float32, device="cuda")
    if ties:  # round hard so many logits of a row are exactly equal
        lg = (lg * 2).round() / 2
    return lg.to(dtype)


def _check_route(lg, k, router, bias=None):
    im = CuteImpl()
    ids, w = im.route(lg, k, router, bias)
    rids, rw = R.route(lg, k, router, bias)
    assert torch.equal(ids.long(), rids.long()), f"ids differ in {(ids.long() != rids.long()).any(1).sum()} rows"
    assert_close(w, rw, "gate weights", rtol=1e-5, atol=1e-6)
    return im, ids, w


ROUTERS = {
    "softmax_topk": R.RouterSpec(),
    "softmax_topk_renorm": R.RouterSpec(renormalize=True),
    "topk_softmax": R.RouterSpec("topk_softmax", temperature=0.7),
    "topk_softmax_sum": R.RouterSpec("topk_softmax", normalize="sum"),
    "topk_hard": R.RouterSpec("topk_hard"),
    "sigmoid_bias": R.RouterSpec("sigmoid_bias", bias_std=0.1, scaling=2.5),
    "sigmoid_nobias": R.RouterSpec("sigmoid_bias"),
    "group_limited_v3": R.RouterSpec("group_limited", n_group=8, topk_group=4, bias_std=0.1, scaling=2.5),
    "group_limited_v2": R.RouterSpec("group_limited", n_group=8, topk_group=3, score="softmax", group_score="max"),
}


@pytest.mark.parametrize("logits", ["uniform", "zipf", "hot"])
@pytest.mark.parametrize("name", list(ROUTERS))
@pytest.mark.parametrize("E,k", [(256, 8), (160, 6), (8, 2)])
def test_route_matches_reference(name, E, k, logits):
    router = ROUTERS[name]
    if router.name == "group_limited" and (E % router.n_group or k > router.topk_group * E // router.n_group):
        pytest.skip("group shape not valid for this E")
    lg = _logits(logits, 3001, E, seed=E + k)
    bias = router.expert_bias(E, "cuda", seed=3)
    _check_route(lg, k, router, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E,k", [(60, 4), (128, 2), (384, 8), (1000, 16), (1024, 1), (512, 16)])
def test_route_any_E_and_dtype(E, k, dtype):
    _check_route(_logits("uniform", 1537, E, dtype, seed=E), k, ROUTERS["softmax_topk"])


@pytest.mark.parametrize("static", [dict(prefetch=False), dict(max_per_lane=16, threads=1024),
                                    dict(max_per_lane=8, threads=256, prefetch=False)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_route_kernel_layouts_agree(static, dtype):
    """The router kernel's other lane layouts / no prefetch (bench variants) select the same."""
    from moebench.kernels import router as kr
    lg = _logits("zipf", 4097, 256, dtype, seed=5, ties=True)
    ids, w, _, _ = kr.route(lg, 8, **static)
    rids, rw = R.route(lg, 8, ROUTERS["softmax_topk"])
    assert torch.equal(ids.long(), rids.long())
    assert_close(w, rw, "gate weights", rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("max_per_lane", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("E,k", [(8, 2), (8, 8), (60, 4)])
def test_route_narrow_lanes_agree(max_per_lane, dtype, E, k):
    """Few experts per lane (a small E spread over several lanes of a token) select the same."""
    from moebench.kernels import router as kr
    lg = _logits("zipf", 4097, E, dtype, seed=E + k, ties=True)
    for static in (dict(), dict(weight="value")):
        ids, w, _, _ = kr.route(lg, k, max_per_lane=max_per_lane, **static)
        rids, rw = R.route(lg, k, ROUTERS["softmax_topk"])
        assert torch.equal(ids.long(), rids.long())
        if not static:
            assert_close(w, rw, "gate weights", rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(w, lg.float().gather(1, rids.long()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E,k,max_per_lane", [(8, 8, 32), (8, 2, 32), (8, 6, 32), (128, 8, 32), (128, 2, 32),
                                              (256, 8, 32), (160, 6, 32), (60, 4, 32), (8, 8, 2), (64, 16, 4)])
def test_select_without_histogram_values_in_dtype(dtype, E, k, max_per_lane):
    """The select stage's kernel (no histogram, the values in the logits' dtype) and the route's
    vector stores (a lane writes c = k / G consecutive slots of its token; k 6 over 4 lanes and
    k 2 over 4 lanes write a slot a lane) give the reference's ids, the logits at them, and the
    route's weights; rows past a tile's end are left alone (T not a multiple of the tile)."""
    from moebench.kernels import router as kr
    lg = _logits("zipf", 4097, E, dtype, seed=E + k, ties=True)
    rids, rw = R.route(lg, k, ROUTERS["softmax_topk"])
    ids, vals, _, _ = kr.route(lg, k, weight="value", hist=False, values_in_dtype=True, max_per_lane=max_per_lane)
    assert vals.dtype == dtype
    assert torch.equal(ids.long(), rids.long()), f"ids differ in {(ids.long() != rids.long()).any(1).sum()} rows"
    assert torch.equal(vals, lg.gather(1, rids.long()))
    for vector_store in (True, False):
        ids, w, hist, tile = kr.route(lg, k, max_per_lane=max_per_lane, vector_store=vector_store)
        assert torch.equal(ids.long(), rids.long())
        assert_close(w, rw, "gate weights", rtol=1e-5, atol=1e-6)
        counts = torch.bincount(ids.long().flatten(), minlength=E)
        assert torch.equal(hist.long().sum(0)[:E], counts)


@pytest.mark.parametrize("name", ["softmax_topk", "topk_hard", "sigmoid_nobias", "group_limited_v3"])
def test_route_ties_break_toward_lower_index(name):
    router = ROUTERS[name]
    lg = _logits("uniform", 2048, 256, torch.float32, ties=True)
    lg[:7] = 0.0  # whole rows tied
    _check_route(lg, 8, router, router.expert_bias(256, "cuda", seed=3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_16bit_keys_signed_zeros_and_extremes(dtype):
    """The 16-bit keyed selection on values where an integer order can go wrong: -0 and +0
    (equal: the lower expert wins), +-inf, +-the largest and smallest normal, ties."""
    fi = torch.finfo(dtype)
    vals = torch.tensor([0.0, -0.0, 0.5, -0.5, float("inf"), float("-inf"), fi.max, -fi.max, fi.tiny, -fi.tiny],
                        device="cuda")
    g = torch.Generator(device="cuda").manual_seed(17)
    lg = vals[torch.randint(len(vals), (3001, 256), generator=g, device="cuda")].to(dtype)
    lg[:5] = -0.0
    lg[5:10] = 0.0
    lg[5:10, ::3] = -0.0  # mixed signed zeros: all tied
    im = CuteImpl()
    for router in (R.RouterSpec("topk_hard"), R.RouterSpec("topk_softmax", normalize="sum")):
        ids, _ = im.route(lg, 8, router)
        rids, _ = R.route(lg, 8, router)
        assert torch.equal(ids.long(), rids.long()), f"ids differ in {(ids.long() != rids.long()).any(1).sum()} rows"
    finite = lg.clamp(-4, 4)  # gate weights checked where they are finite
    _check_route(finite, 8, R.RouterSpec())


@pytest.mark.parametrize("E,k", [(256, 8), (128, 4), (60, 4), (32, 16), (1000, 16), (128, 2), (8, 8), (1, 1)])
def test_route_fp32_keys_truncated_ties(E, k):
    """fp32 logits give their low log2(E) bits to the expert index in the selection keys: rows
    whose best values share those truncated bits (differing only below them, or exactly equal,
    signed zeros, -inf) must take the exact selection; the other rows of the same warps too
    (the keys from kernels.router.FP32_KEYS_MIN_K slots and FP32_KEYS_MIN_E experts on; below:
    the exact selection alone).
    Routers that select on the logits; softmax_topk selects on fp32 probabilities, which can
    tie where the logits differ in their last bits, so it gets the rows with those bits cleared
    (exact ties, still sharing truncated values)."""
    lg = _fp32_truncated_ties(E)
    for router in (R.RouterSpec("topk_hard"), R.RouterSpec("topk_softmax")):
        _check_route(lg, k, router)
    db = max(1, (E - 1).bit_length())
    tied = (lg.view(torch.int32) & ~((1 << db) - 1)).view(torch.float32)
    _check_route(tied, k, R.RouterSpec())


def _fp32_truncated_ties(E: int, T: int = 3001) -> torch.Tensor:
    """fp32 logits whose rows share truncated values (the low log2(E) bits differ or not), with
    signed zeros, -inf and whole tied rows."""
    db = max(1, (E - 1).bit_length())
    g = torch.Generator(device="cuda").manual_seed(23)
    lg = _logits("uniform", T, E, torch.float32, seed=E)
    hi = lg.view(torch.int32) & ~((1 << db) - 1)
    low = torch.randint(0, 1 << db, (T, E), generator=g, device="cuda", dtype=torch.int32)
    few = hi[:, :1].expand(T, E).clone()  # one truncated value per row, all low bits random
    mixed = torch.where(torch.rand(T, E, generator=g, device="cuda") < 0.5, few, hi)
    rows = torch.arange(T, device="cuda")[:, None]
    lg = torch.where(rows % 3 == 0, few | low, torch.where(rows % 3 == 1, mixed | low, lg.view(torch.int32)))
    lg = lg.view(torch.float32).clone()
    lg[9::97] = 0.0
    lg[10::97, ::2] = -0.0  # signed zeros: tied
    lg[11::97, 1:] = float("-inf")
    lg[12::97] = lg[12::97, :1]  # a whole row tied
    return lg


#: the route kernel's merge selection (sorting networks), shared-memory row ring, and register caps
#: (capped_select: the fp32 select stage's tuning, cute_impl.FP32_SELECT; wide_*: 64 experts a lane)
MERGE_RING = {"merge": dict(merge=True), "ring3": dict(stages=3), "merge_ring4": dict(merge=True, stages=4),
              "merge_ring2_256": dict(merge=True, stages=2, threads=256, max_per_lane=16),
              "capped_select": dict(tile=32, threads=256, max_per_lane=16, min_ctas=4, prefetch=False),
              "capped2": dict(min_ctas=2),
              # wide layouts (64 experts a lane, keyed selections only; others hold 32)
              "wide_select": dict(tile=32, threads=128, max_per_lane=64, merge=True, prefetch=False),
              "wide_capped": dict(tile=32, threads=128, max_per_lane=64, merge=True, prefetch=False, min_ctas=6),
              "wide_route": dict(threads=512, max_per_lane=64, merge=True, min_ctas=1),
              "wide_keys": dict(threads=128, max_per_lane=64)}


@pytest.mark.parametrize("variant", list(MERGE_RING))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("E,k", [(256, 8), (256, 2), (128, 8), (8, 8), (8, 2), (160, 6), (60, 4), (1000, 16),
                                 (32, 16), (1024, 1), (64, 3)])
def test_route_merge_and_ring_agree(variant, dtype, E, k):
    """The merge selection, the row ring and capped registers give the reference's ids and weights (route), and
    its ids and the logits at them (select), on tied rows; fp32 also on rows whose best values
    share their truncated bits (the tie check after the merge: the n-th key, or the range test
    where n = k). T is not a multiple of the tile or of a step."""
    from moebench.kernels import router as kr
    static = MERGE_RING[variant]
    # softmax_topk selects on fp32 probabilities, which may tie where fp32 logits differ in their
    # last bits: the truncated-ties rows take routers that select on the logits
    rows = [(_logits("zipf", 4097, E, dtype, seed=E + k, ties=True), (R.RouterSpec(), R.RouterSpec("topk_hard")))]
    if dtype == torch.float32:
        rows.append((_fp32_truncated_ties(E), (R.RouterSpec("topk_hard"), R.RouterSpec("topk_softmax"))))
    for lg, routers in rows:
        for router in routers:
            rids, rw = R.route(lg, k, router)
            ids, w, hist, _ = kr.route(lg, k, **router_static(router, k, E, False), **static)
            assert torch.equal(ids.long(), rids.long()), f"ids differ in {(ids.long() != rids.long()).any(1).sum()} rows"
            assert_close(w, rw, "gate weights", rtol=1e-5, atol=1e-6)
            assert torch.equal(hist.long().sum(0)[:E], torch.bincount(ids.long().flatten(), minlength=E))
        ids, vals, _, _ = kr.route(lg, k, weight="value", hist=False, values_in_dtype=True, **static)
        rids, _ = R.route(lg, k, R.RouterSpec("topk_hard"))
        assert torch.equal(ids.long(), rids.long())
        assert torch.equal(vals, lg.gather(1, rids.long()))


def test_route_neg_inf_logits_still_compete():
    lg = _logits("uniform", 64, 32, torch.float32)
    lg[:, 3:] = float("-inf")  # only 3 finite experts, k = 4
    _check_route(lg, 4, R.RouterSpec("topk_hard"))


@pytest.mark.parametrize("T", [1, 2, 31, 4097, 131072])
def test_route_and_metadata_token_counts(T):
    router = ROUTERS["softmax_topk"]
    im, ids, w = _check_route(_logits("zipf", T, 128, seed=T), 8, router)
    rids, rw = R.route(_logits("zipf", T, 128, seed=T), 8, router)
    check_metadata(im.metadata(ids, w, 128, DROPLESS), R.build_metadata(rids, rw, 128, DROPLESS))


CAPS = {
    "dropless": DROPLESS,
    "cf1": R.CapacitySpec(1.0),
    "cf1.25_renorm": R.CapacitySpec(1.25, renormalize_after_drop=True),
    "cf0.5_padded": R.CapacitySpec(0.5, pad_to_capacity=True),
    "min_capacity": R.CapacitySpec(0.01, min_capacity=3),
}


@pytest.mark.parametrize("logits", ["uniform", "zipf", "hot"])
@pytest.mark.parametrize("cap", list(CAPS))
@pytest.mark.parametrize("T,E,k", [(16384, 256, 8), (5000, 60, 4), (1, 8, 2), (3000, 1024, 16),
                                   (65536, 1024, 16)])  # the last: tiles of 512 tokens, in chunks of 512 pairs
def test_metadata_matches_reference(T, E, k, cap, logits):
    lg = _logits(logits, T, E, seed=T + E)
    ids, w = R.route(lg, k, R.RouterSpec())
    ref = R.build_metadata(ids, w, E, CAPS[cap])
    im = CuteImpl()
    check_metadata(im.metadata(ids, w, E, CAPS[cap]), ref)  # histogram + indices
    cids, cw = im.route(lg, k, R.RouterSpec())
    check_metadata(im.metadata(cids, cw, E, CAPS[cap]), ref)  # the route's histogram


def test_metadata_one_expert_takes_everything():
    T, E, k = 4096, 64, 1
    ids = torch.full((T, k), 5, dtype=torch.int32, device="cuda")
    w = torch.rand(T, k, device="cuda")
    for cap in CAPS.values():
        check_metadata(CuteImpl().metadata(ids, w, E, cap), R.build_metadata(ids, w, E, cap))


def test_metadata_empty_slots_and_num_rows():
    """expert_choice-style ids (-1 = no expert) with the dropless row count of the router."""
    T, E, k = 300, 16, 2
    router = R.RouterSpec("expert_choice")
    lg = _logits("zipf", T, E)
    ids, w = R.route(lg, k, router)
    rows = router.num_rows(T, k, E)
    check_metadata(CuteImpl().metadata(ids, w, E, DROPLESS, rows), R.build_metadata(ids, w, E, DROPLESS, rows))


def test_route_then_metadata_is_two_launches_and_graph_capturable(monkeypatch):
    monkeypatch.undo()  # no poisoning fills: count the kernels of route + metadata alone
    T, E, k = 16384, 256, 8
    lg = _logits("uniform", T, E)
    im = CuteImpl()
    ids, w = im.route(lg, k, R.RouterSpec())
    im.metadata(ids, w, E, DROPLESS)  # compile outside the capture
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        ids, w = im.route(lg, k, R.RouterSpec())
        im.metadata(ids, w, E, DROPLESS)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, [e.name for e in kernels]
    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            gids, gw = im.route(lg, k, R.RouterSpec())
            meta = im.metadata(gids, gw, E, DROPLESS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g.replay()
    rids, rw = R.route(lg, k, R.RouterSpec())
    check_metadata(meta, R.build_metadata(rids, rw, E, DROPLESS))


def test_unsupported_reasons():
    im = CuteImpl()
    lg = _logits("uniform", 8, 64)
    for router, k, msg in [(R.RouterSpec("hash"), 2, "not a per-token top-k"),
                           (R.RouterSpec("expert_choice"), 2, "not a per-token top-k"),
                           (R.RouterSpec(), 17, "at most 16"),
                           (R.RouterSpec("sigmoid_bias", score="softmax", bias_std=0.1), 2, "bias_std=0"),
                           (R.RouterSpec("group_limited", n_group=2, score="softmax"), 2, "group_score=max")]:
        with pytest.raises(Unsupported, match=msg):
            im.route(lg, k, router, router.expert_bias(64, "cuda"))
    with pytest.raises(Unsupported, match="at most 1024"):
        im.route(_logits("uniform", 8, 2048), 2, R.RouterSpec())
    ids, w = R.route(lg, 2, R.RouterSpec())
    with pytest.raises(Unsupported, match="drops by position"):
        im.metadata(ids, w, 64, R.CapacitySpec(1.0, drop_policy="probs"))
