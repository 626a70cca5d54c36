"""Decode: the routing metadata of a few tokens in ONE launch (``route_metadata``, ``metadata``).

At decode batch sizes (T of 1 to a few hundred) the bytes are nothing and every launch, every
phase of a multi-CTA scan and every round trip to memory is microseconds. Two kernels here:

:class:`FusedRouteMetadata` -- logits to ids, weights and the full metadata in one launch.
    Each CTA routes one tile of ``tile = threads / G`` tokens (one step of its lane groups,
    :class:`moebench.kernels.router.TopKRouter`) and counts its assignments in shared memory.
    * One tile (T <= tile): the same CTA goes on to the metadata
      (:meth:`moebench.kernels.metadata.MetadataIndices.body` with one tile of all T tokens),
      its counts and ids taken from shared memory: nothing is read back from global memory.
      Up to ``direct_pairs`` pairs (dropless, unpadded, align 1) not even that:
      :meth:`FusedRouteMetadata.direct` counts each pair's row and each expert's offset over
      the pairs in shared memory, no scan and no barrier after the route's (H200, rotated,
      logits -> metadata at T 1: deepseek_v3 4.20 -> 3.27 us, qwen3_30b_a3b 3.82 -> 2.93,
      gpt_oss_120b 3.51 -> 2.86; every thread compares every pair, so from 64 pairs the scan
      is faster: runs/sample/h200_s11). Above that, up to ``warp_pairs`` pairs (E at most the
      threads): :meth:`FusedRouteMetadata.warp_ranks`, a pair's rank from a ``match.any`` in
      its warp and the per-warp counts of the warps before it, the offsets from a warp scan
      of the counts: one barrier instead of the scan's phases (H200, rotated, deepseek_v3 T 8
      4.30 -> 3.64 us, qwen3_30b_a3b 3.91 -> 3.20: runs/sample/h200_s12).
    * More tiles: each CTA writes its histogram row, fences (``fence.acq_rel.gpu``) and takes a
      ticket (an ``atom.add.acq_rel.gpu`` on an int32 counter, :func:`ticket`); the CTA that draws the
      last ticket fences again, resets the counter to 0 for the next launch and builds the
      metadata of all T tokens from the histogram rows and the ids in global memory (written
      by the others before their tickets). No CTA waits for another (no grid barrier, no
      co-residency assumption); the others exit.
:class:`FusedMetadata` -- ids (from another route) to the metadata in one launch: one CTA
    counts every assignment in shared memory, then builds the metadata (no histogram launch).

Both compute exactly what the two-launch path computes (the same ranks in token order, the
same counts, offsets and indices, every capacity / padding / alignment variant): the metadata
body is the same code. The counter lives in device memory (:func:`ticket`: one per stream, or
one per captured call, from a pool zeroed once per device); a launch leaves it at 0. CUDA
graphs capture the launch like any other and nothing syncs with the host (but the pool's
one-time zeroing, at the first eager multi-CTA call).
"""

from __future__ import annotations

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.histogram import ExpertHistogram, clear_hist, hist_cols, store_hist_row
from moebench.kernels.metadata import MetadataIndices
from moebench.kernels.router import TopKRouter

#: most (token, slot) pairs of one CTA whose dropless metadata the route kernel writes directly,
#: without the scan (impl.decode_direct_pairs; capped at the CTA's threads and tile)
DIRECT_PAIRS = 32
#: most pairs of one CTA whose dropless metadata the route kernel writes with warp ranks
#: (impl.decode_warp_pairs; above direct_pairs, capped at the CTA's threads and tile; needs E
#: at most the threads). H200, rotated, logits -> metadata against the scan (runs/sample/h200_s12,
#: call 1): deepseek_v3_decode T 8 / 16 / 32 4.30 / 4.35 / 4.85 -> 3.64 / 3.74 / 4.39 us,
#: qwen3_30b_a3b_decode 3.91 / 3.93 / 3.98 -> 3.20 / 3.26 / 3.54, gpt_oss_120b_decode T 16 / 32
#: 3.56 / 3.66 -> 3.08 / 3.20
WARP_PAIRS = 256
#: pairs a thread counts per step of the direct metadata (loads in flight together)
DIRECT_CHUNK = 16
EMPTY = 2047  # an empty slot's (-1) expert bits in the direct metadata's keys


@cute.jit
def take_ticket(mHist: cute.Tensor, mTicket: cute.Tensor, bidx: Int32, tidx: Int32, sHist: cute.Tensor,
                sFlag: cute.Tensor, threads: cutlass.Constexpr[int]) -> Int32:
    """After a CTA routed its tile (and synced): 1 in the CTA that goes on to the metadata.

    With one CTA that is itself. With more, each writes its histogram row, makes its writes
    visible at GPU scope and draws a ticket; the last to draw resets the counter and, after an
    acquire fence, sees every other CTA's ids, weights and histogram rows."""
    nb = mHist.shape[0]
    last = Int32(1)
    if nb > 1:
        store_hist_row(mHist, bidx, sHist, tidx, threads)
        cute.arch.fence_acq_rel_gpu()  # this thread's ids, weights and histogram row, before the ticket
        cute.arch.sync_threads()
        if tidx == 0:
            drawn = cute.arch.atomic_add(mTicket.iterator, Int32(1), sem="acq_rel", scope="gpu")
            flag = Int32(0)
            if drawn == nb - 1:
                flag = Int32(1)
                mTicket[0] = Int32(0)  # every CTA has drawn: ready for the next launch
            sFlag[0] = flag
        cute.arch.sync_threads()
        last = sFlag[0]
        if last != 0:
            cute.arch.fence_acq_rel_gpu()
    return last


class FusedRouteMetadata:
    """logits [T, E] -> ids, weights [T, k] and the metadata, one launch (see the module doc).

    Static: the router's configuration (as :class:`TopKRouter`), the metadata's (as
    :class:`MetadataIndices`) and the threads per CTA; T is runtime, the grid ``ceil(T / tile)``."""

    def __init__(self, dtype, E: int, k: int, *, capacity: bool = False, padded: bool = False,
                 renormalize_after_drop: bool = False, align: int = 1, threads: int = 256,
                 max_per_lane: int = 0, prefetch: bool = True, direct_pairs: int = DIRECT_PAIRS,
                 warp_pairs: int = WARP_PAIRS, **router_static):
        self.router = TopKRouter(dtype, E, k, threads=threads, max_per_lane=max_per_lane, prefetch=prefetch,
                                 **router_static)
        self.threads = self.router.threads
        self.tile = self.threads // self.router.lanes.G  # one step of every lane group
        self.meta = MetadataIndices(E, k, capacity=capacity, padded=padded, renormalize=renormalize_after_drop,
                                    threads=self.threads, align=align)
        self.E, self.k = E, k
        # up to this many (token, slot) pairs in one tile, dropless, unpadded and unaligned:
        # the direct metadata (no scan, no barrier after the route's); 0: never
        plain = not capacity and not padded and align == 1
        self.direct_pairs = min(direct_pairs, self.threads, self.tile * k) if plain else 0
        # above direct_pairs, up to this many: the warp-ranked metadata (one barrier); 0: never
        self.warp_pairs = min(warp_pairs, self.threads, self.tile * k) if plain and E <= self.threads else 0
        if self.warp_pairs <= self.direct_pairs:
            self.warp_pairs = 0
        self.warps = self.threads // 32
        warp_words = (self.warps * E + E + 32) if self.warp_pairs else 0  # per-warp counts, scan, warp sums
        self.smem_bytes = (self.meta.smem_bytes + 4 * (hist_cols(E) + self.tile * k) + 16 + 3 * 16
                           + 4 * warp_words + (16 if warp_words else 0))

    @cute.jit
    def __call__(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
                 mHist: cute.Tensor, mHistW: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor,
                 mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor, mKeptW: cute.Tensor,
                 mTicket: cute.Tensor, cap: Int32, stream: cuda.CUstream):
        assert mLogits.element_type == self.router.dtype
        self.kernel(mLogits, mBias, mIds, mWeights, mHist, mHistW, mCounts, mOffsets, mRouted, mGather, mScatter,
                    mKeptW, mTicket, cap).launch(grid=[mHist.shape[0], 1, 1], block=[self.threads, 1, 1],
                                                 stream=stream)

    @cute.kernel
    def kernel(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
               mHist: cute.Tensor, mHistW: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor,
               mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor, mKeptW: cute.Tensor,
               mTicket: cute.Tensor, cap: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        nb = mHist.shape[0]
        smem = cutlass.memory.SmemAllocator()
        sHist = smem.allocate_tensor(Int32, cute.make_layout(hist_cols(self.E)), byte_alignment=16)
        sIds = smem.allocate_tensor(Int32, cute.make_layout(self.tile * self.k), byte_alignment=16)
        sFlag = smem.allocate_tensor(Int32, cute.make_layout(4), byte_alignment=16)
        sWarp = None
        # which metadata body this CTA writes if it is the last: 1 the scan (one CTA), 2 the
        # direct count, 3 the warp ranks, 0 the scan over several CTAs' histograms
        T = mIds.shape[0]
        P = T * self.k
        local = Int32(0)
        if nb == 1:
            local = Int32(1)
            if const_expr(self.warp_pairs > 0):
                if P <= self.warp_pairs:
                    local = Int32(3)
            if const_expr(self.direct_pairs > 0):
                if P <= self.direct_pairs:
                    local = Int32(2)
        clear_hist(sHist, tidx, self.threads)
        if const_expr(self.warp_pairs > 0):  # the warp ranks' per-warp counts start at 0
            sWarp = smem.allocate_tensor(Int32, cute.make_layout(self.warps * self.E + self.E + 32),
                                         byte_alignment=16)
            if local == 3:
                for i in cutlass.range(tidx, self.warps * self.E, self.threads, unroll=1):
                    sWarp[i] = 0
        cute.arch.sync_threads()
        self.router.route_tile(mLogits, mBias, mIds, mWeights, Int32(self.tile), bidx, tidx, sHist, sIds)
        cute.arch.sync_threads()
        last = take_ticket(mHist, mTicket, bidx, tidx, sHist, sFlag, self.threads)
        if last != 0:
            if local == 2:
                self.direct(mCounts, mOffsets, mRouted, mGather, mScatter, P, tidx, sHist, sIds)
            elif local == 3:
                self.warp_ranks(mCounts, mOffsets, mRouted, mGather, mScatter, P, tidx, sHist, sIds, sWarp)
            else:
                self.meta.body(mIds, mWeights, mHistW, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW,
                               T, cap, Int32(0), Int32(1), tidx, sHist, sIds, local)

    @cute.jit
    def direct(self, mCounts: cute.Tensor, mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor,
               mScatter: cute.Tensor, P: Int32, tidx: Int32, sHist: cute.Tensor, sIds: cute.Tensor):
        """The dropless metadata of ``P <= direct_pairs`` pairs routed by this CTA (their experts
        in ``sIds``, flat in token order, their counts in ``sHist``): pair ``a``'s row is the
        number of pairs before it in expert-then-token order, and expert ``e``'s offset the
        number of pairs of lower experts, each counted over the P pairs in shared memory
        (no scan, no barrier). Thread ``a`` writes pair ``a``'s indices, thread ``e`` expert
        ``e``'s counts and offset; the rows past the pairs get -1."""
        E, k, NT = self.E, self.k, self.threads
        ea = Int32(-1)
        if tidx < P:
            ea = sIds[tidx]
        row, off, valid = self.count_pairs(sIds, P, tidx, ea, tidx)
        if tidx < P:
            t = tidx // k
            if ea < 0:
                row = Int32(-1)
            else:
                mGather[row] = t
            mScatter[t, tidx - t * k] = row
        for e in cutlass.range(tidx, E, NT, unroll=1):
            if e != tidx:  # more experts than threads: this thread's next one
                _, off, _ = self.count_pairs(sIds, P, tidx, Int32(-1), e)
            self.expert_out(mCounts, mRouted, mOffsets, e, sHist[e], off)
        self.rows_tail(mOffsets, mGather, valid, tidx)

    @cute.jit
    def expert_out(self, mCounts: cute.Tensor, mRouted: cute.Tensor, mOffsets: cute.Tensor, e: Int32, c: Int32,
                   off: Int32):
        """Expert ``e``'s count (dropless: all routed) and offset."""
        mCounts[e] = c
        mRouted[e] = c
        mOffsets[e] = off

    @cute.jit
    def rows_tail(self, mOffsets: cute.Tensor, mGather: cute.Tensor, valid: Int32, tidx: Int32):
        """The offsets' end and -1 in the rows past the ``valid`` pairs (all threads call)."""
        if tidx == 0:
            mOffsets[self.E] = valid
        for r in cutlass.range(valid + tidx, mGather.shape[0], self.threads, unroll=1):
            mGather[r] = -1

    @cute.jit
    def warp_ranks(self, mCounts: cute.Tensor, mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor,
                   mScatter: cute.Tensor, P: Int32, tidx: Int32, sHist: cute.Tensor, sIds: cute.Tensor,
                   sWarp: cute.Tensor):
        """The dropless metadata of ``P <= warp_pairs`` pairs routed by this CTA, pair ``a`` on
        thread ``a``, one barrier: a pair's rank among its expert's pairs of its own warp is a
        ``match.any`` (the lanes below it holding the same expert), and among the warps before
        it the per-warp counts its expert's lowest lane left in shared memory (``sWarp[w * E +
        e]``, zeroed at the kernel's start); the expert offsets are a warp scan over the counts
        in ``sHist`` (thread ``e``, E <= threads) plus the sums of the warps of lower experts."""
        if const_expr(self.warp_pairs > 0):  # never traced without sWarp
            E, k, NW = self.E, self.k, self.warps
            EW = -(-E // 32)  # warps of experts
            lane = tidx % 32
            w = tidx // 32
            ea = Int32(-1)
            if tidx < P:
                ea = sIds[tidx]
            m = cute.arch.match_sync(0xFFFFFFFF, ea)  # every lane: lanes past P hold -1 like an empty slot
            below = m & cute.arch.lanemask_lt()
            if tidx < P:
                if ea >= 0:
                    if below == 0:  # the expert's lowest lane in this warp: the warp's count
                        sWarp[w * E + ea] = cute.arch.popc(m).to(Int32)
            c = Int32(0)
            if tidx < E:
                c = sHist[tidx]
            inc, _ = self.meta.warp_scan(c, Int32(0), lane, False)
            if tidx < E:
                sWarp[NW * E + tidx] = inc - c
            if lane == 31:
                if w < EW:
                    sWarp[NW * E + E + w] = inc
            cute.arch.sync_threads()
            valid = Int32(0)
            for j in cutlass.range_constexpr(EW):
                valid += sWarp[NW * E + E + j]
            if tidx < P:
                t = tidx // k
                row = Int32(-1)
                if ea >= 0:
                    row = sWarp[NW * E + ea] + cute.arch.popc(below).to(Int32)
                    for j in cutlass.range_constexpr(EW):
                        row += cutlass.select_(j < (ea >> 5), sWarp[NW * E + E + j], Int32(0))
                    for v in cutlass.range_constexpr(NW - 1):
                        row += cutlass.select_(v < w, sWarp[v * E + ea], Int32(0))
                    mGather[row] = t
                mScatter[t, tidx - t * k] = row
            if tidx < E:
                off = sWarp[NW * E + tidx]
                for j in cutlass.range_constexpr(EW):
                    off += cutlass.select_(j < w, sWarp[NW * E + E + j], Int32(0))
                self.expert_out(mCounts, mRouted, mOffsets, tidx, c, off)
            self.rows_tail(mOffsets, mGather, valid, tidx)

    @cute.jit
    def count_pairs(self, sIds: cute.Tensor, P: Int32, a: Int32, ea: Int32, e: Int32):
        """Over the P pairs in ``sIds``: (the pairs before pair ``a`` of expert ``ea`` in
        expert-then-token order, the pairs of experts below ``e``, the pairs with an expert).
        A pair's key is ``(expert & 2047) << 10 | pair`` (an empty slot, -1, sorts after every
        expert; experts < 1024, pairs <= 1024), so each count is one compare a pair, without a
        branch: the loads of a chunk of DIRECT_CHUNK pairs are in flight together, a chunk past
        P is skipped, a pair past P in the last chunk counts as empty."""
        row = Int32(0)
        off = Int32(0)
        valid = Int32(0)
        key_a = ((ea & EMPTY) << 10) | a
        for c in cutlass.range_constexpr(-(-self.direct_pairs // DIRECT_CHUNK)):
            if c * DIRECT_CHUNK < P:
                for i in cutlass.range_constexpr(DIRECT_CHUNK):
                    b = c * DIRECT_CHUNK + i
                    if const_expr(b < self.direct_pairs):
                        eb = cutlass.select_(b < P, sIds[b] & EMPTY, Int32(EMPTY))
                        row += cutlass.select_(((eb << 10) | b) < key_a, Int32(1), Int32(0))
                        off += cutlass.select_(eb < e, Int32(1), Int32(0))
                        valid += cutlass.select_(eb < self.E, Int32(1), Int32(0))
        return row, off, valid


class FusedMetadata:
    """ids [T, S] (any route's) -> the metadata in one launch of one CTA (see the module doc)."""

    def __init__(self, E: int, S: int, *, capacity: bool = False, padded: bool = False,
                 renormalize_after_drop: bool = False, align: int = 1, threads: int = 256):
        self.hist = ExpertHistogram(E, S, threads)
        self.meta = MetadataIndices(E, S, capacity=capacity, padded=padded, renormalize=renormalize_after_drop,
                                    threads=threads, align=align)
        self.E, self.S, self.threads = E, S, threads
        self.smem_bytes = self.meta.smem_bytes + 4 * hist_cols(E) + 16

    @cute.jit
    def __call__(self, mIds: cute.Tensor, mWeights: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor,
                 mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor, mKeptW: cute.Tensor, cap: Int32,
                 stream: cuda.CUstream):
        self.kernel(mIds, mWeights, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW, cap).launch(
            grid=[1, 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mWeights: cute.Tensor, mCounts: cute.Tensor, mOffsets: cute.Tensor,
               mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor, mKeptW: cute.Tensor, cap: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        smem = cutlass.memory.SmemAllocator()
        sHist = smem.allocate_tensor(Int32, cute.make_layout(hist_cols(self.E)), byte_alignment=16)
        clear_hist(sHist, tidx, self.threads)
        cute.arch.sync_threads()
        self.hist.count_tile(mIds, mIds.shape[0], Int32(0), tidx, sHist)  # every token: one tile
        cute.arch.sync_threads()
        self.meta.body(mIds, mWeights, None, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW,
                       mIds.shape[0], cap, Int32(0), Int32(1), tidx, sHist, None, True)


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

import torch  # noqa: E402

from moebench.kernels.common import (COMPILE_OPTIONS, TORCH_TO_CUTE, VEC_BYTES, CompileCache, fake_stream,  # noqa: E402
                                     fake_table, fake_vector)
from moebench.kernels.histogram import MAX_TILE, fake_hist, fake_hist_words  # noqa: E402
from moebench.kernels.metadata import new_outputs  # noqa: E402
from moebench.kernels.router import fake_logits, selection_bias  # noqa: E402

#: threads per CTA of the decode kernels by default (impl.decode_threads)
DECODE_THREADS = 256
#: shared memory a decode kernel may use (Hopper: 227 KB per CTA); above it, two launches
MAX_SMEM = 220 * 1024
#: ticket counters zeroed at once per device (a slot never goes back to the pool); an eager
#: call renews a pool with fewer than TICKET_RESERVE free slots (a capture takes one per call)
TICKET_POOL, TICKET_RESERVE = 1 << 16, 1 << 12
_cache = CompileCache()
_pools: dict = {}  # device index -> [zeroed int32 counters, next free slot]
_stream_tickets: dict = {}  # (device index, stream) -> its slot, for launches outside a capture
_retired: list = []  # used-up pools: captured graphs still point into them, so they stay allocated


def ticket(device: torch.device) -> torch.Tensor | None:
    """An int32 ticket counter (a slot of a pool zeroed once per device; every launch leaves
    its counter at 0) for a multi-CTA launch on the current stream: outside a capture the
    stream's own slot (launches on one stream never overlap), in a capture a fresh slot per
    call (so graphs never share one). None where no zeroed slot can be had without work on
    the device, i.e. in a capture before any eager call or with the pool used up: the caller
    takes the two-launch path. Zeroing a pool syncs the device once, so a slot is 0 whatever
    stream first uses it."""
    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    capturing = torch.cuda.is_current_stream_capturing()
    stream = torch.cuda.current_stream(dev)
    key = (index, stream.cuda_stream)
    if not capturing and key in _stream_tickets:
        return _stream_tickets[key]
    pool = _pools.get(index)
    if pool is None or pool[1] >= TICKET_POOL - (0 if capturing else TICKET_RESERVE):
        if capturing:
            return None
        if pool is not None:
            _retired.append(pool[0])
        pool = _pools[index] = [torch.zeros(TICKET_POOL, dtype=torch.int32, device=dev), 0]
        torch.cuda.synchronize(dev)
    t = pool[0][pool[1]:pool[1] + 1]
    pool[1] += 1
    if not capturing:
        _stream_tickets[key] = t
    return t


def compile_route_metadata(dtype, E: int, k: int, capacity: bool, padded: bool, drop_renorm: bool, align: int,
                           threads: int, direct_pairs: int = DIRECT_PAIRS, warp_pairs: int = WARP_PAIRS, **router):
    """The compiled one-launch route + metadata for a CuTeDSL dtype, E, k, the metadata's static
    options (``drop_renorm``: renormalise over the kept slots; ``direct_pairs``, ``warp_pairs``,
    see :class:`FusedRouteMetadata`) and the router's (TopKRouter)."""
    key = ("route_metadata", dtype, E, k, capacity, padded, drop_renorm, align, threads, direct_pairs, warp_pairs,
           tuple(sorted(router.items())))

    def build():
        T, B, R = cute.sym_int(), cute.sym_int(), cute.sym_int()
        op = FusedRouteMetadata(dtype, E, k, capacity=capacity, padded=padded, renormalize_after_drop=drop_renorm,
                                align=align, threads=threads, direct_pairs=direct_pairs, warp_pairs=warp_pairs,
                                **router)
        return cute.compile(op, fake_logits(dtype, T, E), fake_vector(Float32, E), fake_table(Int32, T, k, VEC_BYTES),
                            fake_table(Float32, T, k, VEC_BYTES), fake_hist(B, E), fake_hist_words(B, E), fake_vector(Int32, E),
                            fake_vector(Int32, E + 1), fake_vector(Int32, E), fake_vector(Int32, R),
                            fake_table(Int32, T, k), fake_table(Float32, T, k), fake_vector(Int32, 1), Int32(1),
                            fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def compile_metadata(E: int, S: int, capacity: bool, padded: bool, renormalize: bool, align: int, threads: int):
    """The compiled one-launch metadata (ids given) for E, S and the static options."""
    key = ("metadata", E, S, capacity, padded, renormalize, align, threads)

    def build():
        T, R = cute.sym_int(), cute.sym_int()
        op = FusedMetadata(E, S, capacity=capacity, padded=padded, renormalize_after_drop=renormalize, align=align,
                           threads=threads)
        return cute.compile(op, fake_table(Int32, T, S), fake_table(Float32, T, S), fake_vector(Int32, E),
                            fake_vector(Int32, E + 1), fake_vector(Int32, E), fake_vector(Int32, R),
                            fake_table(Int32, T, S), fake_table(Float32, T, S), Int32(1), fake_stream(),
                            options=COMPILE_OPTIONS)

    return _cache.get(key, build)


_plans: dict = {}


def plan(op_class, *args, **kw):
    """The kernel object of a static configuration, unlaunched (its tile and shared memory
    for the host; pure Python), cached."""
    key = (op_class, args, tuple(sorted(kw.items())))
    op = _plans.get(key)
    if op is None:
        op = _plans[key] = op_class(*args, **kw)
    return op


def route_tile(dtype, E: int, k: int, threads: int = DECODE_THREADS, **router) -> int:
    """Tokens per CTA of the one-launch route + metadata (one step of every lane group)."""
    return plan(FusedRouteMetadata, dtype, E, k, threads=threads, **router).tile


def fits(op) -> bool:
    """Does the kernel's shared memory fit a CTA (else the caller takes two launches)?"""
    return op.smem_bytes <= MAX_SMEM


def route_metadata(logits: torch.Tensor, k: int, bias: torch.Tensor | None, E: int, num_rows: int,
                   capacity: int | None = None, padded: bool = False, drop_renorm: bool = False, align: int = 1,
                   threads: int = DECODE_THREADS, direct_pairs: int = DIRECT_PAIRS, warp_pairs: int = WARP_PAIRS,
                   **router):
    """(ids, weights, counts, offsets, routed, gather, scatter, kept_w) in one launch, or None
    where the one-launch path does not apply now (a capture on a stream with no counter yet).
    Up to ``direct_pairs`` (token, slot) pairs in one CTA, dropless, the metadata is written
    without the scan (:meth:`FusedRouteMetadata.direct`; 0: never).

    ``logits`` [T, E] contiguous, 16-byte aligned, T >= 1; ``router`` as TopKRouter's static
    options (the caller has checked them, see ``moebench.impls.cute_impl``)."""
    T = logits.shape[0]
    dev = logits.device
    dtype = TORCH_TO_CUTE[logits.dtype]
    statics = (dtype, E, k, capacity is not None, padded, drop_renorm and capacity is not None, align, threads)
    op = plan(FusedRouteMetadata, dtype, E, k, capacity=statics[3], padded=padded, renormalize_after_drop=statics[5],
              align=align, threads=threads, direct_pairs=direct_pairs, warp_pairs=warp_pairs, **router)
    if not fits(op):
        return None
    tiles = -(-T // op.tile)
    assert op.tile <= MAX_TILE
    ctr = ticket(dev) if tiles > 1 else None
    if tiles > 1 and ctr is None:
        return None
    fn = compile_route_metadata(*statics, direct_pairs=op.direct_pairs, warp_pairs=op.warp_pairs,
                                **router)  # the bounds in effect: one key
    ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    weights = torch.empty(T, k, dtype=torch.float32, device=dev)
    hist = torch.empty(tiles, hist_cols(E), dtype=torch.int16, device=dev)
    outs = new_outputs(T, k, E, num_rows, capacity, weights, dev)
    counts = outs[0]
    bias = selection_bias(bias, E, dev)
    # one CTA never touches the counter: any int32 element stands in for it
    fn(logits, bias, ids, weights, hist, hist.view(torch.int32), *outs, ctr if ctr is not None else counts[:1],
       capacity if capacity is not None else 0)
    return (ids, weights) + outs


def metadata(ids: torch.Tensor, weights: torch.Tensor, E: int, num_rows: int, capacity: int | None = None,
             padded: bool = False, renormalize: bool = False, align: int = 1, threads: int = DECODE_THREADS):
    """(counts, offsets, routed, gather, scatter, kept_w) of contiguous int32 ``ids`` [T, S]
    and fp32 ``weights`` in one launch of one CTA (T >= 1), or None where its shared memory
    would not fit."""
    T, S = ids.shape
    renormalize = renormalize and capacity is not None
    if not fits(plan(FusedMetadata, E, S, capacity=capacity is not None, padded=padded,
                     renormalize_after_drop=renormalize, align=align, threads=threads)):
        return None
    outs = new_outputs(T, S, E, num_rows, capacity, weights, ids.device)
    fn = compile_metadata(E, S, capacity is not None, padded, renormalize, align, threads)
    fn(ids, weights, *outs, capacity if capacity is not None else 0)
    return outs
