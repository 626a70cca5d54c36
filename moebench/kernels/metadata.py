"""Routing metadata from expert ids: counts, offsets, gather and scatter indices
(``routing.build_metadata``), without a device-wide sort and without a host sync.

The tokens are cut into *tiles* (``tile`` tokens, a runtime value, at most ~128 tiles);
``hist[b, e]`` counts the assignments of tile ``b`` to expert ``e``. The router kernel
writes it as a by-product (``moebench.kernels.router``); :class:`ExpertHistogram` computes
it from ids that came from elsewhere. Then one launch of :class:`MetadataIndices`, one
CTA per tile:

1. per expert, the total over all tiles and the sum over the tiles before this one;
2. kept counts (``min(total, capacity)``) and their exclusive scan over the experts:
   the offsets (or ``e * capacity`` when padded); CTA 0 writes counts and offsets;
3. rows no assignment fills get ``gather_idx = -1`` (the tail under a capacity, padding);
4. the tile's tokens in chunks of one token per thread, their (token, slot) pairs spread
   over all threads (consecutive pairs on consecutive threads): a bit per (expert, token)
   in shared memory gives each assignment its rank among the chunk's tokens of the same
   expert (``popc`` of the lower bits plus the counts of the words before), so its rank in
   the whole expert is ``before-this-tile + before-this-chunk + in-chunk``, in token order
   like the reference's stable sort. Under a capacity (``position`` policy) an assignment
   is kept when that rank is below the capacity. Scatter and gather indices, and the
   weights with the dropped slots zeroed (renormalised over the kept ones if asked),
   follow.

A token's ids must be distinct (every router guarantees it); -1 is an empty slot.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr


class ExpertHistogram:
    """ids [T, S] -> hist [tiles, E]: assignments of each tile of ``tile`` tokens per expert."""

    def __init__(self, E: int, S: int, threads: int = 256):
        self.E, self.S, self.threads = E, S, threads

    @cute.jit
    def __call__(self, mIds: cute.Tensor, mHist: cute.Tensor, tile: Int32, stream: cuda.CUstream):
        self.kernel(mIds, mHist, tile).launch(grid=[mHist.shape[0], 1, 1], block=[self.threads, 1, 1],
                                              stream=stream)

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mHist: cute.Tensor, tile: Int32):
        E, S = self.E, self.S
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        smem = cutlass.memory.SmemAllocator()
        sHist = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        for e in cutlass.range(tidx, E, self.threads, unroll=1):
            sHist[e] = 0
        cute.arch.sync_threads()
        t0 = bidx * tile
        n = (cutlass.min(t0 + tile, mIds.shape[0]) - t0) * S
        for a in cutlass.range(tidx, n, self.threads, unroll=1):  # (token, slot) pairs of the tile
            tl = a // S
            e = mIds[t0 + tl, a - tl * S]
            if e >= 0:
                cute.arch.atomic_add(sHist.iterator + e, Int32(1), scope="cta")
        cute.arch.sync_threads()
        for e in cutlass.range(tidx, E, self.threads, unroll=1):
            mHist[bidx, e] = sHist[e]


class MetadataIndices:
    """ids, weights, hist -> counts, offsets, routed counts, gather and scatter indices
    (and the kept weights under a capacity). One CTA per tile; see the module doc."""

    def __init__(self, E: int, S: int, *, capacity: bool = False, padded: bool = False,
                 renormalize: bool = False, threads: int = 512):
        assert threads % 32 == 0 and threads <= 1024
        self.E, self.S = E, S
        self.capacity, self.padded, self.renormalize = capacity, padded, renormalize
        self.threads = threads
        # phase 1 reads the histogram as vectors of `vec` experts, each column of vectors
        # split over `parts` threads (at most 16: the sum over the parts stays short), each
        # with `rows_per_batch` rows in flight
        self.vec = 4 if E % 4 == 0 else 1
        self.parts = max(1, min(threads // (E // self.vec), 16))
        self.rows_per_batch = 16
        self.words = threads // 32  # bit words per expert per chunk (a chunk: one token per thread)

    @cute.jit
    def __call__(self, mIds: cute.Tensor, mWeights: cute.Tensor, mHist: cute.Tensor, mCounts: cute.Tensor,
                 mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor,
                 mKeptW: cute.Tensor, tile: Int32, cap: Int32, stream: cuda.CUstream):
        self.kernel(mIds, mWeights, mHist, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW, tile, cap).launch(
            grid=[mHist.shape[0], 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.jit
    def exclusive_scan(self, sVal: cute.Tensor, sOut: cute.Tensor, sWarp: cute.Tensor, tidx: Int32):
        """sOut[e] = sum of sVal[:e] for e < E, sOut[E] = the total (all threads call)."""
        E, NT = self.E, self.threads
        per = (E + NT - 1) // NT  # contiguous values per thread
        lane = tidx % 32
        warp = tidx // 32
        run = Int32(0)
        for i in cutlass.range_constexpr(per):
            e = tidx * per + i
            if e < E:
                run += sVal[e]
        inc = run  # inclusive scan of the thread sums within the warp
        for s in cutlass.range_constexpr(5):
            o = cute.arch.shuffle_sync_up(inc, offset=1 << s)
            if lane >= (1 << s):
                inc += o
        if lane == 31:
            sWarp[warp] = inc
        cute.arch.sync_threads()
        if warp == 0:
            wv = Int32(0)
            if lane < NT // 32:
                wv = sWarp[lane]
            winc = wv
            for s in cutlass.range_constexpr(5):
                o = cute.arch.shuffle_sync_up(winc, offset=1 << s)
                if lane >= (1 << s):
                    winc += o
            if lane < NT // 32:
                sWarp[lane] = winc - wv  # exclusive warp prefix
            if lane == NT // 32 - 1:
                sOut[E] = winc
        cute.arch.sync_threads()
        acc = sWarp[warp] + inc - run
        for i in cutlass.range_constexpr(per):
            e = tidx * per + i
            if e < E:
                sOut[e] = acc
                acc += sVal[e]
        cute.arch.sync_threads()

    @cute.jit
    def load_chunk_ids(self, mIds: cute.Tensor, c0: Int32, npairs: Int32, tidx: Int32, eid: cute.Tensor):
        """The expert of this thread's (token, slot) pairs of the chunk starting at token c0:
        pair ``a = tidx + i * threads`` is token ``c0 + a // S``, slot ``a % S`` (-1 past the end)."""
        S, NT = self.S, self.threads
        for i in cutlass.range_constexpr(S):
            a = tidx + i * NT
            e = Int32(-1)
            if a < npairs:
                tl = a // S
                e = mIds[c0 + tl, a - tl * S]
            eid[i] = e

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mWeights: cute.Tensor, mHist: cute.Tensor, mCounts: cute.Tensor,
               mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor,
               mKeptW: cute.Tensor, tile: Int32, cap: Int32):
        E, S, NT, P, NW = self.E, self.S, self.threads, self.parts, self.words
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        nb = mHist.shape[0]
        T = mIds.shape[0]
        R = mGather.shape[0]

        smem = cutlass.memory.SmemAllocator()
        sTot = smem.allocate_tensor(Int32, cute.make_layout(E * P), byte_alignment=16)
        sPre = smem.allocate_tensor(Int32, cute.make_layout(E * P), byte_alignment=16)
        sKept = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        sOff = smem.allocate_tensor(Int32, cute.make_layout(E + 1), byte_alignment=16)
        sWarp = smem.allocate_tensor(Int32, cute.make_layout(32), byte_alignment=16)
        sBits = smem.allocate_tensor(Int32, cute.make_layout(E * NW), byte_alignment=16)  # [word, expert]
        sPfx = smem.allocate_tensor(Int32, cute.make_layout(E * NW), byte_alignment=16)
        sCnt = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        if const_expr(self.capacity):
            sRow = smem.allocate_tensor(Int32, cute.make_layout(NT * S), byte_alignment=16)

        # the first chunk's ids, loaded now so their latency hides behind phase 1
        t0 = bidx * tile
        t_end = cutlass.min(t0 + tile, T)
        eid = cute.make_rmem_tensor((S,), Int32)
        self.load_chunk_ids(mIds, t0, (cutlass.min(t_end, t0 + NT) - t0) * S, tidx, eid)

        # 1. per expert: total over all tiles, and over the tiles before this one. The
        #    [tiles, E] histogram is read as 16-byte vectors of VEC experts, each vector
        #    column split over P threads; a thread issues its rows in batches of RB loads
        #    with no branch between them (the row index clamped, the value masked after)
        VEC, NQ, RB = self.vec, E // self.vec, self.rows_per_batch
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Int32, num_bits_per_copy=32 * VEC)
        frag = cute.make_rmem_tensor((VEC, RB), Int32)
        aPre = cute.make_rmem_tensor((VEC,), Int32)
        aTot = cute.make_rmem_tensor((VEC,), Int32)
        for item in cutlass.range(tidx, NQ * P, NT, unroll=1):
            p = item // NQ
            q = item - p * NQ
            aPre.fill(0)
            aTot.fill(0)
            for b0 in cutlass.range(p, nb, P * RB, unroll=1):
                for i in cutlass.range_constexpr(RB):
                    b = cutlass.min(b0 + i * P, nb - 1)
                    cute.copy(atom, cute.zipped_divide(mHist[b, None], (VEC,))[None, q], frag[None, i])
                for i in cutlass.range_constexpr(RB):
                    b = b0 + i * P
                    for j in cutlass.range_constexpr(VEC):
                        v = frag[j, i]
                        if b >= nb:
                            v = Int32(0)
                        aTot[j] = aTot[j] + v
                        if b >= bidx:
                            v = Int32(0)
                        aPre[j] = aPre[j] + v
            for j in cutlass.range_constexpr(VEC):
                sPre[p * E + q * VEC + j] = aPre[j]
                sTot[p * E + q * VEC + j] = aTot[j]
        cute.arch.sync_threads()
        for e in cutlass.range(tidx, E, NT, unroll=1):
            tot = sTot[e]
            pre = sPre[e]
            for p in cutlass.range(1, P, unroll=1):
                tot += sTot[p * E + e]
                pre += sPre[p * E + e]
            sTot[e] = tot
            sPre[e] = pre  # becomes the running rank base of the chunks below
            kept = tot
            if const_expr(self.capacity):
                kept = cutlass.min(tot, cap)
            sKept[e] = kept
            if bidx == 0:
                mRouted[e] = tot
                mCounts[e] = kept
        cute.arch.sync_threads()

        # 2. offsets: exclusive scan of the kept counts (or e * capacity when padded)
        if const_expr(self.padded):
            for e in cutlass.range(tidx, E + 1, NT, unroll=1):
                sOff[e] = e * cap
            cute.arch.sync_threads()
        else:
            self.exclusive_scan(sKept, sOff, sWarp, tidx)
        if bidx == 0:
            for e in cutlass.range(tidx, E + 1, NT, unroll=1):
                mOffsets[e] = sOff[e]

        # 3. rows no assignment fills: gather_idx = -1
        if const_expr(self.padded):
            for e in cutlass.range(bidx, E, nb, unroll=1):
                for r in cutlass.range(sOff[e] + sKept[e] + tidx, sOff[e + 1], NT, unroll=1):
                    mGather[r] = -1
        else:
            for r in cutlass.range(sOff[E] + bidx * NT + tidx, R, nb * NT, unroll=1):
                mGather[r] = -1

        # 4. the tile in chunks of NT tokens; the chunk's (token, slot) pairs spread over all
        #    threads (S per thread, consecutive pairs on consecutive threads: the id reads and
        #    the scatter writes are coalesced)
        for c0 in cutlass.range(t0, t_end, NT, unroll=1):
            ntok = cutlass.min(t_end - c0, NT)
            npairs = ntok * S
            nwa = (ntok + 31) // 32  # bit words in use per expert
            if c0 != t0:
                self.load_chunk_ids(mIds, c0, npairs, tidx, eid)
            for i in cutlass.range(tidx, E * nwa, NT, unroll=1):
                sBits[i] = 0
            cute.arch.sync_threads()
            for i in cutlass.range_constexpr(S):  # a bit per (expert, token)
                tl = (tidx + i * NT) // S
                if eid[i] >= 0:
                    cute.arch.atomic_or(sBits.iterator + ((tl // 32) * E + eid[i]), Int32(1) << (tl % 32), scope="cta")
            cute.arch.sync_threads()
            for e in cutlass.range(tidx, E, NT, unroll=1):  # tokens of e in the words before each word
                run = Int32(0)
                for w in cutlass.range(nwa, unroll=1):
                    sPfx[w * E + e] = run
                    run += cute.arch.popc(sBits[w * E + e])
                sCnt[e] = run
            cute.arch.sync_threads()
            for i in cutlass.range_constexpr(S):
                a = tidx + i * NT
                if a < npairs:
                    tl = a // S
                    t = c0 + tl
                    e = eid[i]
                    row = Int32(-1)
                    if e >= 0:
                        w = tl // 32
                        below = (Int32(1) << (tl % 32)) - 1
                        rank = sPre[e] + sPfx[w * E + e] + cute.arch.popc(sBits[w * E + e] & below)
                        if const_expr(self.capacity):
                            if rank < cap:
                                row = sOff[e] + rank
                        else:
                            row = sOff[e] + rank
                    mScatter[t, a - tl * S] = row
                    if row >= 0:
                        mGather[row] = t
                    if const_expr(self.capacity):
                        sRow[a] = row
            if const_expr(self.capacity):  # the kept weights, a token per thread
                cute.arch.sync_threads()
                if tidx < ntok:
                    t = c0 + tidx
                    kept_sum = Float32(0.0)
                    if const_expr(self.renormalize):
                        for j in cutlass.range_constexpr(S):
                            if sRow[tidx * S + j] >= 0:
                                kept_sum += mWeights[t, j]
                    den = cute.arch.fmax(kept_sum, Float32(1e-20))
                    for j in cutlass.range_constexpr(S):
                        w = Float32(0.0)
                        if sRow[tidx * S + j] >= 0:
                            w = mWeights[t, j]
                            if const_expr(self.renormalize):
                                w = w / den
                        mKeptW[t, j] = w
            cute.arch.sync_threads()
            for e in cutlass.range(tidx, E, NT, unroll=1):
                sPre[e] = sPre[e] + sCnt[e]
            cute.arch.sync_threads()


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

import torch  # noqa: E402

from moebench.kernels.common import COMPILE_OPTIONS, CompileCache, fake_stream, fake_table, fake_vector  # noqa: E402

#: the tokens are cut into about this many tiles (one CTA each in both launches)
TARGET_TILES = 128
_cache = CompileCache()


def fake_hist(tiles, E: int):
    """hist [tiles, E] int32, contiguous, 16-byte aligned base (read as 16-byte vectors)."""
    return cute.runtime.make_fake_tensor(Int32, (tiles, E), stride=(E, 1), assumed_align=16)


def tile_size(T: int) -> int:
    """Tokens per tile: a multiple of 32 giving at most ~TARGET_TILES tiles."""
    return 32 * max(1, -(-T // (32 * TARGET_TILES)))


def num_tiles(T: int, tile: int) -> int:
    return max(1, -(-T // tile))


def compile_histogram(E: int, S: int):
    def build():
        T, B = cute.sym_int(), cute.sym_int()
        return cute.compile(ExpertHistogram(E, S), fake_table(Int32, T, S), fake_hist(B, E), Int32(1),
                            fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(("hist", E, S), build)


def compile_indices(E: int, S: int, capacity: bool, padded: bool, renormalize: bool):
    def build():
        T, B, R = cute.sym_int(), cute.sym_int(), cute.sym_int()
        return cute.compile(
            MetadataIndices(E, S, capacity=capacity, padded=padded, renormalize=renormalize),
            fake_table(Int32, T, S), fake_table(Float32, T, S), fake_hist(B, E), fake_vector(Int32, E),
            fake_vector(Int32, E + 1), fake_vector(Int32, E), fake_vector(Int32, R), fake_table(Int32, T, S),
            fake_table(Float32, T, S), Int32(1), Int32(1), fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(("indices", E, S, capacity, padded, renormalize), build)


def histogram(ids: torch.Tensor, E: int, tile: int) -> torch.Tensor:
    """hist [tiles, E] int32 of contiguous int32 ``ids [T, S]``."""
    T, S = ids.shape
    hist = torch.empty(num_tiles(T, tile), E, dtype=torch.int32, device=ids.device)
    if T == 0:
        return hist.zero_()
    compile_histogram(E, S)(ids, hist, tile)
    return hist


def indices(ids: torch.Tensor, weights: torch.Tensor, hist: torch.Tensor, tile: int, E: int, num_rows: int,
            capacity: int | None = None, padded: bool = False, renormalize: bool = False):
    """Counts, offsets, routed counts, gather and scatter indices, kept weights (one launch).

    ``ids`` [T, S] int32 and ``weights`` [T, S] fp32, contiguous; ``hist`` from the router
    kernel or :func:`histogram` with the same ``tile``. Dropless, the weights are returned
    as they are (every valid slot is kept)."""
    T, S = ids.shape
    dev = ids.device
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    routed = torch.empty(E, dtype=torch.int32, device=dev)
    gather = torch.empty(num_rows, dtype=torch.int32, device=dev)
    scatter = torch.empty(T, S, dtype=torch.int32, device=dev)
    kept_w = weights if capacity is None else torch.empty(T, S, dtype=torch.float32, device=dev)
    fn = compile_indices(E, S, capacity is not None, padded, renormalize and capacity is not None)
    fn(ids, weights, hist, counts, offsets, routed, gather, scatter, kept_w, tile,
       capacity if capacity is not None else 0)
    return counts, offsets, routed, gather, scatter, kept_w
