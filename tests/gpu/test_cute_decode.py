"""impl=cute's decode path on a GPU: logits -> metadata and ids -> metadata in one launch
(``kernels/decode.py``), pack and combine with their rows split over more CTAs
(``kernels/common.py``), against the reference: ids and metadata exact, gate weights within
1e-5, packed rows bit-exact, combined rows within the dtype's tolerance.

Token counts sit around every threshold: one tile of the fused route (32 tokens at E 256, 64 at
E 128 with 256 threads), two tiles, many, the decode limit (1024). Outputs the kernels allocate
are poisoned first; the two-launch kernels are made to fail where the one-launch path must run.
Skipped without CUDA (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from moebench import routing as R
from moebench.check import assert_close, assert_equal, check_metadata, poison
from moebench.impls.cute_impl import CuteImpl
from moebench.logits import make_logits
from test_cute_router import _logits as router_logits  # the router tests' logits (ties rounded in)

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_empty")]  # every output starts as poison

DROPLESS = R.CapacitySpec()
TOKENS = [1, 2, 16, 31, 32, 33, 64, 65, 127, 128, 512, 1024]
#: the one-launch path up to its limit (the default, DECODE_TOKENS, stops at one CTA's tokens)
ONE_LAUNCH = dict(decode_tokens=1024)
CAPS = {
    "dropless": DROPLESS,
    "cf1": R.CapacitySpec(1.0),
    "cf1.25_renorm": R.CapacitySpec(1.25, renormalize_after_drop=True),
    "cf0.5_padded": R.CapacitySpec(0.5, pad_to_capacity=True),
    "min_capacity": R.CapacitySpec(0.01, min_capacity=3),
    "align16": R.CapacitySpec(align=16),
    "cf1_align64": R.CapacitySpec(1.0, align=64),
    "padded_align16": R.CapacitySpec(0.5, pad_to_capacity=True, align=16),
}


@pytest.fixture
def one_launch(monkeypatch):
    """The two-launch route / histogram / metadata kernels fail if they run."""
    from moebench.kernels import metadata as km
    from moebench.kernels import router as kr

    def fail(*args, **kw):
        raise AssertionError("the two-launch path ran where the one-launch path should")

    for mod, name in ((kr, "route"), (km, "histogram"), (km, "indices")):
        monkeypatch.setattr(mod, name, fail)


def _logits(kind, T, E, dtype=torch.bfloat16, seed=0):
    """The router tests' logits; kind "ties": uniform ones rounded so many per row are equal."""
    ties = kind == "ties"
    return router_logits("uniform" if ties else kind, T, E, dtype, seed, ties=ties)


def _check_route_metadata(im, lg, k, router, cap, bias=None, what=""):
    E = lg.shape[1]
    ids, w, meta = im.route_metadata(lg, k, router, bias, E, cap)
    rids, rw = R.route(lg, k, router, bias)
    bad = (ids.long() != rids.long()).any(1)
    assert not bool(bad.any()), f"{what}: ids differ in {int(bad.sum())} of {lg.shape[0]} rows"
    assert_close(w, rw, f"{what}: gate weights", rtol=1e-5, atol=1e-6)
    # the metadata of the same ids and weights: exact (the kept weights to 1e-6)
    check_metadata(meta, R.build_metadata(rids, w, E, cap))
    return ids, w, meta


ROUTERS = {
    "softmax_topk": (R.RouterSpec(), 256, 8),
    "softmax_topk_renorm_E128": (R.RouterSpec(renormalize=True), 128, 8),
    "sigmoid_bias": (R.RouterSpec("sigmoid_bias", bias_std=0.1, scaling=2.5), 384, 8),
    "group_limited_v3": (R.RouterSpec("group_limited", n_group=8, topk_group=4, bias_std=0.1, scaling=2.5), 256, 8),
    "topk_softmax_sum": (R.RouterSpec("topk_softmax", normalize="sum"), 60, 4),
    "top1": (R.RouterSpec("top1"), 8, 1),
    "topk_hard_E1024": (R.RouterSpec("topk_hard"), 1024, 16),
}


@pytest.mark.parametrize("logits", ["uniform", "zipf", "hot", "ties"])
@pytest.mark.parametrize("name", list(ROUTERS))
def test_route_metadata_one_launch_matches_reference(name, logits, one_launch):
    router, E, k = ROUTERS[name]
    im = CuteImpl(**ONE_LAUNCH)
    bias = router.expert_bias(E, "cuda", seed=3)
    for T in TOKENS:
        _check_route_metadata(im, _logits(logits, T, E, seed=T + E), k, router, DROPLESS, bias, f"T={T}")


@pytest.mark.parametrize("cap", list(CAPS))
@pytest.mark.parametrize("E,k", [(256, 8), (8, 2)])
def test_route_metadata_one_launch_capacities(cap, E, k, one_launch):
    if E == 8 and cap in ("min_capacity", "padded_align16", "align16"):
        pytest.skip("covered at E 256")
    im = CuteImpl(**ONE_LAUNCH)
    for T in [1, 2, 16, 33, 128, 257, 512, 1024]:
        for kind in ("zipf", "hot"):
            _check_route_metadata(im, _logits(kind, T, E, seed=T), k, R.RouterSpec(), CAPS[cap], what=f"T={T} {kind}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_route_metadata_one_launch_other_dtypes(dtype, one_launch):
    im = CuteImpl(**ONE_LAUNCH)
    for T in [1, 33, 512]:
        _check_route_metadata(im, _logits("zipf", T, 256, dtype, seed=T), 8, R.RouterSpec(), DROPLESS, what=f"T={T}")


@pytest.mark.parametrize("threads,max_per_lane", [(128, 32), (512, 16), (1024, 8)])
def test_route_metadata_one_launch_tunings(threads, max_per_lane, one_launch):
    im = CuteImpl(decode_threads=threads, router_max_per_lane=max_per_lane, **ONE_LAUNCH)
    for T in [1, 16, 33, 100, 512, 1024]:
        for cap in ("dropless", "cf1.25_renorm"):
            _check_route_metadata(im, _logits("zipf", T, 256, seed=T), 8, R.RouterSpec(), CAPS[cap],
                                  what=f"T={T} {cap}")


@pytest.mark.parametrize("direct_pairs,warp_pairs", [(0, 0), (40, 0), (128, 0), (256, 0), (0, 256), (32, 256),
                                                    (32, 100)])
@pytest.mark.parametrize("E,k", [(256, 8), (128, 4), (8, 2)])
def test_route_metadata_direct_bound(direct_pairs, warp_pairs, E, k, one_launch):
    """The scan-free metadata of one CTA (up to impl.decode_direct_pairs pairs counted, a last
    chunk cut short at 40; up to impl.decode_warp_pairs ranked per warp, a last warp cut short
    at 100) and the scan on either side of each bound: the same metadata."""
    im = CuteImpl(decode_direct_pairs=direct_pairs, decode_warp_pairs=warp_pairs, **ONE_LAUNCH)
    for T in [1, 2, 3, 4, 5, 9, 10, 12, 13, 16, 17, 25, 31, 32, 33, 48, 63, 64, 65, 100, 128, 129]:
        for kind in ("zipf", "hot", "ties"):
            _check_route_metadata(im, _logits(kind, T, E, seed=T + direct_pairs + warp_pairs), k, R.RouterSpec(),
                                  DROPLESS, what=f"T={T} {kind}")


def test_route_metadata_above_the_decode_limit_takes_two_launches():
    im = CuteImpl(decode_tokens=64)
    for T in [64, 65, 1500]:
        _check_route_metadata(im, _logits("zipf", T, 256, seed=T), 8, R.RouterSpec(), DROPLESS, what=f"T={T}")
    _check_route_metadata(CuteImpl(decode_tokens=0), _logits("zipf", 5, 256), 8, R.RouterSpec(), DROPLESS)


@pytest.mark.parametrize("E,k,caps", [(256, 8, list(CAPS)), (128, 8, ["dropless", "cf1"]), (8, 2, ["cf1.25_renorm"]),
                                      (1024, 16, ["dropless", "cf0.5_padded"]), (60, 4, ["align16"])])
def test_ids_metadata_one_launch(E, k, caps, one_launch):
    """ids from another route (no histogram with them): counted and indexed by one CTA."""
    im = CuteImpl(**ONE_LAUNCH)
    for T in TOKENS:
        ids, w = R.route(_logits("zipf", T, E, seed=T + 1), k, R.RouterSpec())
        for cap in caps:
            ref = R.build_metadata(ids, w, E, CAPS[cap])
            check_metadata(im.metadata(ids, w, E, CAPS[cap]), ref)


def test_ids_metadata_one_launch_empty_slots(one_launch):
    """expert_choice-style ids (-1 = no expert), with the router's row count."""
    router = R.RouterSpec("expert_choice")
    for T in [1, 7, 300]:
        ids, w = R.route(_logits("zipf", T, 16, seed=T), 2, router)
        rows = router.num_rows(T, 2, 16)
        check_metadata(CuteImpl(**ONE_LAUNCH).metadata(ids, w, 16, DROPLESS, rows), R.build_metadata(ids, w, 16, DROPLESS, rows))


def test_tickets_reset_between_launches_and_streams(one_launch):
    """Back-to-back multi-CTA launches of every size, on two streams: each correct, and every
    ticket counter back at 0 after."""
    from moebench.kernels import decode as kd

    im = CuteImpl(**ONE_LAUNCH)
    side = torch.cuda.Stream()
    for i, T in enumerate([512, 100, 1024, 33, 1, 512, 512, 65, 1024, 257] * 2):
        stream = side if i % 3 == 2 else torch.cuda.current_stream()
        with torch.cuda.stream(stream):
            _check_route_metadata(im, _logits("zipf", T, 256, seed=i), 8, R.RouterSpec(), DROPLESS, what=f"#{i} T={T}")
    torch.cuda.synchronize()
    for counters, used in kd._pools.values():
        assert int(counters[:used].abs().sum()) == 0, "a ticket counter was left nonzero"


@pytest.mark.parametrize("T", [1, 16, 128, 512])
def test_one_launch_kernel_count_and_graph_replays(T, monkeypatch):
    monkeypatch.undo()  # no poisoning fills: count the kernels of the call alone
    E, k = 256, 8
    im = CuteImpl(**ONE_LAUNCH)
    lg = _logits("uniform", T, E)
    im.route_metadata(lg, k, R.RouterSpec(), None, E, DROPLESS)  # compile, zero the ticket pool
    ids, w = R.route(lg, k, R.RouterSpec())
    ids, w = ids.int().contiguous(), w.float().contiguous()  # as a route stage hands them over: no conversion
    im.metadata(ids, w, E, DROPLESS)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        im.route_metadata(lg, k, R.RouterSpec(), None, E, DROPLESS)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        im.metadata(ids, w, E, DROPLESS)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1, [e.name for e in kernels]

    g = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(g):
            gids, gw, gmeta = im.route_metadata(lg, k, R.RouterSpec(), None, E, DROPLESS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for seed in range(4):  # new logits in the captured buffer, poisoned outputs, a replay
        lg.copy_(_logits("zipf" if seed % 2 else "hot", T, E, seed=seed + 10))
        for t in (gids, gw, gmeta.counts, gmeta.offsets, gmeta.gather_idx, gmeta.scatter_idx, gmeta.routed_counts):
            poison(t)
        g.replay()
        rids, rw = R.route(lg, k, R.RouterSpec())
        assert torch.equal(gids.long(), rids.long()), f"replay {seed}: ids differ"
        check_metadata(gmeta, R.build_metadata(rids, gw, E, DROPLESS))


def test_capture_before_any_eager_call_falls_back_to_two_launches(monkeypatch):
    """With no zeroed ticket counter to be had in a capture, a multi-CTA route + metadata is
    the route kernel then the metadata kernel, still right."""
    from moebench.kernels import decode as kd

    monkeypatch.setattr(kd, "_pools", {})
    monkeypatch.setattr(kd, "_stream_tickets", {})
    E, k, T = 256, 8, 512
    im = CuteImpl(**ONE_LAUNCH)
    lg = _logits("zipf", T, E, seed=4)
    im.route(lg, k, R.RouterSpec())  # compile the two-launch kernels outside the capture
    ids0, w0 = im.route(lg, k, R.RouterSpec())
    im.metadata(ids0, w0, E, DROPLESS)
    kd._pools.clear()
    kd._stream_tickets.clear()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gids, gw, gmeta = im.route_metadata(lg, k, R.RouterSpec(), None, E, DROPLESS)
    assert not kd._pools  # nothing allocated in the capture
    g.replay()
    rids, rw = R.route(lg, k, R.RouterSpec())
    assert torch.equal(gids.long(), rids.long())
    check_metadata(gmeta, R.build_metadata(rids, gw, E, DROPLESS))


# -- pack and combine: rows split over more CTAs ---------------------------------------------


def _meta(T, E, k, cap=DROPLESS, seed=0):
    ids, w = R.route(make_logits("zipf", T, E, seed=seed, device="cuda"), k, R.RouterSpec())
    return R.build_metadata(ids, w, E, cap)


#: the implementation variants: default (split), no split, 7-chunk pack rows (splits there too),
#: gather pack, per-token scatter
VARIANTS = {
    "default": {}, "no_split": {"split_ctas": 0}, "max_iters1": {"max_iters": 1},
    "gather": {"pack_mode": "gather"}, "per_token": {"scatter_per_slot": False},
    "per_token_iters1": {"scatter_per_slot": False, "max_iters": 1}, "split64": {"split_ctas": 64},
    "no_prefetch": {"prefetch_mb": 0}, "old_tiling": {"prefetch_mb": 0, "max_iters": 2, "stage_rows": 0},
    "no_stage": {"stage_rows": 0}, "stage12": {"stage_rows": 12},
}


def _check_pack_combine(meta, H, dtype, what, variants=tuple(VARIANTS)):
    T = meta.num_tokens
    g = torch.Generator(device="cuda").manual_seed(T + H)
    x = torch.randn(T, H, device="cuda", generator=g).to(dtype)
    y = torch.randn(meta.num_rows, H, device="cuda", generator=g).to(dtype)
    ref_p = R.pack(x, meta)
    ref_c = {wt: R.combine(y, meta, weighted=wt) for wt in (True, False)}
    for name in variants:
        im = CuteImpl(**VARIANTS[name])
        out = poison(torch.empty(meta.num_rows, H, device="cuda", dtype=dtype))
        n = meta.block_rows  # aligned blocks: the rows past the last block are nobody's
        assert_equal(im.pack(x, meta, out=out)[:n], ref_p[:n], f"{what} {name}: packed rows")
        for wt in (True, False):
            out = poison(torch.empty(T, H, device="cuda", dtype=dtype))
            assert_close(im.combine(y, meta, out=out, weighted=wt), ref_c[wt], f"{what} {name}: combined rows "
                         f"(weighted={wt})", dtype)


@pytest.mark.parametrize("H", [7168, 7176, 2048])
def test_split_pack_combine_match_reference(H):
    """deepseek_v3 rows (7 chunks in combine: T 1 on 7 CTAs), a row whose last chunk is
    predicated (897 vectors), qwen3's 2048 (one chunk: never split)."""
    import cutlass
    from moebench.kernels import combine as kc
    from moebench.kernels.common import col_splits

    t = kc.combine_tiling(cutlass.BFloat16, H, 8, **CuteImpl().tune)
    assert (col_splits(t, t.grid(1)) > 1) == (t.chunks > 1)  # the split path runs where it can
    for T in [1, 2, 16, 127, 128, 512]:
        _check_pack_combine(_meta(T, 256, 8, seed=T), H, torch.bfloat16, f"T={T} H={H}",
                            tuple(VARIANTS) if H == 7168 else ("default", "no_split", "max_iters1", "per_token",
                                                               "no_prefetch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_pack_combine_other_dtypes(dtype):
    for T in [1, 16, 128]:
        _check_pack_combine(_meta(T, 256, 8, seed=T), 7168, dtype, f"T={T}", ("default", "no_split", "max_iters1",
                                                                              "no_prefetch"))


@pytest.mark.parametrize("cap", ["cf1_padded", "cf1_align64"])
def test_split_pack_zeroes_empty_rows(cap):
    """The zero-row CTAs of scatter-pack (capacity padding, alignment) split like the others."""
    spec = {"cf1_padded": R.CapacitySpec(1.0, pad_to_capacity=True), "cf1_align64": R.CapacitySpec(1.0, align=64)}[cap]
    for T in [1, 16, 128]:
        meta = _meta(T, 64, 8, spec, seed=T)
        assert meta.may_have_empty_rows
        n = meta.block_rows
        x = torch.randn(T, 7168, device="cuda").to(torch.bfloat16)
        ref = R.pack(x, meta)
        for kw in ({}, {"max_iters": 1}, {"max_iters": 1, "scatter_per_slot": False}, {"pack_mode": "gather"}):
            out = poison(torch.empty(meta.num_rows, 7168, device="cuda", dtype=torch.bfloat16))
            got = CuteImpl(**kw).pack(x, meta, out=out)
            assert_equal(got[:n], ref[:n], f"T={T} {kw}: packed rows")


@pytest.mark.parametrize("cap", ["cf1", "cf1_padded", "cf1_align64"])
def test_prefetching_combine_with_capacity(cap):
    """Under a capacity the packed rows are more than T * S (padding, aligned blocks) and some
    slots are dropped: the prefetching combine (every packed row once over the grid) still
    reads only the kept slots' rows."""
    spec = {"cf1": R.CapacitySpec(1.0), "cf1_padded": R.CapacitySpec(1.0, pad_to_capacity=True),
            "cf1_align64": R.CapacitySpec(1.0, align=64)}[cap]
    for T in [1, 5, 16, 128]:
        meta = _meta(T, 64, 8, spec, seed=T)
        _check_pack_combine(meta, 7168, torch.bfloat16, f"{cap} T={T}", ("default", "no_prefetch", "no_stage"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,k", [(7168, 8), (7176, 2), (2880, 4), (2048, 1)])
def test_staged_combine(k, H, dtype):
    """At most stage_rows packed rows are copied whole into shared memory (each thread its
    columns of every row) and summed from there: T 1-6 at k 1-8 (staged up to R 8 by default and
    12 with stage12, the L2 prefetch above), a predicated last chunk (7176, 2880), one-chunk rows
    (2048), fp32, and slots dropped under a capacity (-1: not read)."""
    from moebench.kernels import combine as kc

    for T in range(1, 7):
        for spec in (DROPLESS, R.CapacitySpec(1.0)):
            meta = _meta(T, 16, k, spec, seed=T + k)
            _check_pack_combine(meta, H, dtype, f"T={T} k={k} {spec}", ("default", "no_stage", "stage12"))
    import cutlass
    cd = {torch.bfloat16: cutlass.BFloat16, torch.float32: cutlass.Float32}[dtype]
    assert kc.combine_tune(cd, H, 8, 1, 8, **CuteImpl().tune).get("stage_rows") == 8
    assert "stage_rows" not in kc.combine_tune(cd, H, 8, 2, 16, **CuteImpl().tune)

