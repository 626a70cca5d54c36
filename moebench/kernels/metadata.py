"""Routing metadata from expert ids: counts, offsets, gather and scatter indices
(``routing.build_metadata``), without a device-wide sort and without a host sync.

The tokens are cut into *tiles* (``tile`` tokens, a runtime value, at most ~128 tiles);
``hist[b, e]`` (int16, rows padded to ``hist_cols(E)``, a multiple of 8) counts the
assignments of tile ``b`` to expert ``e``. The router kernel writes it as a by-product
(``moebench.kernels.router``); :class:`ExpertHistogram` computes it from ids that came from
elsewhere (both in ``moebench.kernels.histogram``). Then one launch of :class:`MetadataIndices`,
one CTA per tile:

1. per expert, the total over all tiles and the sum over the tiles before this one (the
   histogram read as 16-byte vectors, 8 experts each);
2. kept counts (``min(total, capacity)``) and their exclusive scan over the experts:
   the offsets (or ``e * capacity`` when padded); CTA 0 writes counts and offsets;
3. rows no assignment fills get ``gather_idx = -1`` (the tail under a capacity, padding);
4. the tile's tokens in chunks of one token per thread, their (token, slot) pairs spread
   over all threads (consecutive pairs on consecutive threads): a bit per (expert, token)
   in shared memory gives each assignment its rank among the chunk's tokens of the same
   expert (``popc`` of the lower bits plus the counts of the words before), so its rank in
   the whole expert is ``before-this-tile + before-this-chunk + in-chunk``, in token order
   like the reference's stable sort. Under a capacity (``position`` policy) an assignment
   is kept when that rank is below the capacity. Scatter indices are written per pair;
   gather indices (for E >= 32) from shared memory in expert order, so consecutive threads
   write consecutive rows of an expert; the weights with the dropped slots zeroed
   (renormalised over the kept ones if asked) follow. The first chunk's bits are set and
   counted between phases 1 and 2 (fewer barriers; with ``overlap``, while phase 1's first
   loads are in flight).

A token's ids must be distinct (every router guarantees it); -1 is an empty slot.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

# the histogram (its kernel, layout and tiles): re-exported, part of this module's interface
from moebench.kernels.histogram import (  # noqa: F401
    MAX_TILE,
    TARGET_TILES,
    ExpertHistogram,
    clear_hist,
    compile_histogram,
    fake_hist,
    fake_hist_words,
    hist_cols,
    histogram,
    new_hist,
    num_tiles,
    store_hist_row,
    tile_size,
)


class MetadataIndices:
    """ids, weights, hist -> counts, offsets, routed counts, gather and scatter indices
    (and the kept weights under a capacity). One CTA per tile; see the module doc."""

    def __init__(self, E: int, S: int, *, capacity: bool = False, padded: bool = False,
                 renormalize: bool = False, threads: int = 512, sorted_gather: bool | None = None,
                 overlap: bool | None = None, parts: int = 16, align: int = 1):
        assert threads % 32 == 0 and threads <= 1024 and align >= 1
        self.E, self.S = E, S
        self.capacity, self.padded, self.renormalize = capacity, padded, renormalize
        # expert blocks start at multiples of `align` rows: the scan runs over the rounded-up
        # counts, the rows after each block's tokens are padding (-1), the rows past the last
        # block BEYOND (-2, see moebench.routing.RoutingMetadata)
        self.align = align
        self.threads = threads
        # phase 1 reads the int16 histogram as 16-byte vectors of 4 int32 words (8 experts),
        # each column of vectors split over `parts` threads (at most 16: the sum over the
        # parts stays short), each with `rows_per_batch` rows in flight (all its rows at
        # about TARGET_TILES tiles)
        self.cols = hist_cols(E)
        self.parts = max(1, min(threads // (self.cols // 8), parts))
        self.rows_per_batch = max(4, min(16, TARGET_TILES // self.parts))
        # gather_idx written in expert order (runs of consecutive rows) from shared memory,
        # not straight from each (token, slot): fewer, fuller L2 write sectors. It pays where
        # a warp's 32 pairs hit many experts (E >= 32: measured on an H100) and
        # needs 2 * threads * S more words of shared memory
        words = (E * 2 * self.parts + 6 * E + 2 * E * (threads // 32) + (threads * S if capacity else 0)
                 + (E if align > 1 else 0))
        fits = 4 * (words + 2 * threads * S + E) <= SORTED_GATHER_SMEM
        self.sorted_gather = (E >= 32 and fits) if sorted_gather is None else sorted_gather
        assert fits or not self.sorted_gather
        # the first chunk's bits set while phase 1's first loads are in flight: pays at
        # S = 2, costs at S = 8 (measured on an H100)
        self.overlap = S < 4 if overlap is None else overlap
        self.words = threads // 32  # bit words per expert per chunk (a chunk: one token per thread)

    @property
    def smem_bytes(self) -> int:
        """Shared memory the kernel's body allocates (each array 16-byte aligned)."""
        E, NT, S = self.E, self.threads, self.S
        arrays = [E * self.parts, E * self.parts, E, E + 1, 64, E * self.words, E * self.words, E]
        if self.align > 1 and not self.padded:
            arrays.append(E)
        if self.capacity:
            arrays.append(NT * S)
        if self.sorted_gather:
            arrays += [E + 1, NT * S, NT * S]
        return sum(-(-4 * n // 16) * 16 for n in arrays)

    @cute.jit
    def __call__(self, mIds: cute.Tensor, mWeights: cute.Tensor, mHistW: cute.Tensor, mCounts: cute.Tensor,
                 mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor,
                 mKeptW: cute.Tensor, tile: Int32, cap: Int32, stream: cuda.CUstream):
        self.kernel(mIds, mWeights, mHistW, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW, tile, cap).launch(
            grid=[mHistW.shape[0], 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.jit
    def warp_scan(self, x: Int32, x2: Int32, lane: Int32, two: cutlass.Constexpr[bool]):
        """Inclusive scan of ``x`` over the lanes of a warp (and of ``x2`` with ``two``)."""
        for s in cutlass.range_constexpr(5):
            o = cute.arch.shuffle_sync_up(x, offset=1 << s)
            o2 = Int32(0)
            if const_expr(two):
                o2 = cute.arch.shuffle_sync_up(x2, offset=1 << s)
            if lane >= (1 << s):
                x += o
                x2 += o2
        return x, x2

    @cute.jit
    def exclusive_scan(self, sVal: cute.Tensor, sOut: cute.Tensor, sWarp: cute.Tensor, tidx: Int32,
                       sVal2: cute.Tensor = None, sOut2: cute.Tensor = None):
        """sOut[e] = sum of sVal[:e] for e < E, sOut[E] = the total (all threads call; ends
        synced). With sVal2 / sOut2, the same for a second array in the same passes
        (sWarp[32:] holds its warp sums)."""
        E, NT = self.E, self.threads
        two = sVal2 is not None
        per = (E + NT - 1) // NT  # contiguous values per thread
        lane = tidx % 32
        warp = tidx // 32
        run = Int32(0)
        run2 = Int32(0)
        for i in cutlass.range_constexpr(per):
            e = tidx * per + i
            if e < E:
                run += sVal[e]
                if const_expr(two):
                    run2 += sVal2[e]
        inc, inc2 = self.warp_scan(run, run2, lane, two)  # the thread sums, within the warp
        if lane == 31:
            sWarp[warp] = inc
            if const_expr(two):
                sWarp[32 + warp] = inc2
        cute.arch.sync_threads()
        if warp == 0:
            wv = Int32(0)
            wv2 = Int32(0)
            if lane < NT // 32:
                wv = sWarp[lane]
                if const_expr(two):
                    wv2 = sWarp[32 + lane]
            winc, winc2 = self.warp_scan(wv, wv2, lane, two)  # the warp sums
            if lane < NT // 32:
                sWarp[lane] = winc - wv  # exclusive warp prefix
                if const_expr(two):
                    sWarp[32 + lane] = winc2 - wv2
            if lane == NT // 32 - 1:
                sOut[E] = winc
                if const_expr(two):
                    sOut2[E] = winc2
        cute.arch.sync_threads()
        acc = sWarp[warp] + inc - run
        acc2 = Int32(0)
        if const_expr(two):
            acc2 = sWarp[32 + warp] + inc2 - run2
        for i in cutlass.range_constexpr(per):
            e = tidx * per + i
            if e < E:
                sOut[e] = acc
                acc += sVal[e]
                if const_expr(two):
                    sOut2[e] = acc2
                    acc2 += sVal2[e]
        cute.arch.sync_threads()

    @cute.jit
    def load_chunk_ids(self, mIds: cute.Tensor, c0: Int32, npairs: Int32, tidx: Int32, eid: cute.Tensor,
                       sIds: cute.Tensor = None, local: Int32 = None):
        """The expert of this thread's (token, slot) pairs of the chunk starting at token c0:
        pair ``a = tidx + i * threads`` is token ``c0 + a // S``, slot ``a % S`` (-1 past the end);
        from ``sIds`` (the ids of all tokens from token 0, flat) when ``local != 0``."""
        S, NT = self.S, self.threads
        for i in cutlass.range_constexpr(S):
            a = tidx + i * NT
            e = Int32(-1)
            if a < npairs:
                if const_expr(sIds is not None):
                    if local != 0:
                        e = sIds[c0 * S + a]
                    else:
                        tl = a // S
                        e = mIds[c0 + tl, a - tl * S]
                else:
                    tl = a // S
                    e = mIds[c0 + tl, a - tl * S]
            eid[i] = e

    @cute.jit
    def load_hist_batch(self, mHistW: cute.Tensor, b0: Int32, q: Int32, nb: Int32, atom, frag: cute.Tensor):
        """Rows ``b0, b0 + P, ...`` (RB of them, clamped to the last) of vector column q."""
        for i in cutlass.range_constexpr(self.rows_per_batch):
            b = cutlass.min(b0 + i * self.parts, nb - 1)
            cute.copy(atom, cute.zipped_divide(mHistW[b, None], (4,))[None, q], frag[None, i])

    @cute.jit
    def first_hist_batch(self, mHistW: cute.Tensor, tidx: Int32, atom, frag: cute.Tensor):
        """With ``overlap``: each thread's first batch of histogram rows, issued early."""
        NQ = self.cols // 8
        if tidx < NQ * self.parts:
            self.load_hist_batch(mHistW, tidx // NQ, tidx % NQ, mHistW.shape[0], atom, frag)

    @cute.jit
    def sum_hist_rows(self, mHistW: cute.Tensor, bidx: Int32, tidx: Int32, sPre: cute.Tensor, sTot: cute.Tensor,
                      atom, frag: cute.Tensor, aPre: cute.Tensor, aTot: cute.Tensor):
        """Step 1's sums over the histogram rows: per part ``p`` and expert, into
        ``sTot[p * E + e]`` (all rows) and ``sPre[p * E + e]`` (the rows before ``bidx``)."""
        E, NT, P, RB = self.E, self.threads, self.parts, self.rows_per_batch
        NQ = self.cols // 8
        nb = mHistW.shape[0]
        for item in cutlass.range(tidx, NQ * P, NT, unroll=1):
            p = item // NQ
            q = item - p * NQ
            aPre.fill(0)
            aTot.fill(0)
            for b0 in cutlass.range(p, nb, P * RB, unroll=1):
                if not self.overlap or item != tidx or b0 != p:  # the first batch is in flight already
                    self.load_hist_batch(mHistW, b0, q, nb, atom, frag)
                for i in cutlass.range_constexpr(RB):
                    b = b0 + i * P
                    for j in cutlass.range_constexpr(4):
                        v = frag[j, i]
                        if b >= nb:
                            v = Int32(0)
                        lo = v & 0xFFFF  # expert q * 8 + 2j (little-endian), counts < 2**15
                        hi = v >> 16
                        aTot[2 * j] = aTot[2 * j] + lo
                        aTot[2 * j + 1] = aTot[2 * j + 1] + hi
                        if b >= bidx:
                            lo = Int32(0)
                            hi = Int32(0)
                        aPre[2 * j] = aPre[2 * j] + lo
                        aPre[2 * j + 1] = aPre[2 * j + 1] + hi
            for j in cutlass.range_constexpr(8):
                if q * 8 + j < E:
                    sPre[p * E + q * 8 + j] = aPre[j]
                    sTot[p * E + q * 8 + j] = aTot[j]

    @cute.jit
    def sum_parts(self, sTot: cute.Tensor, sPre: cute.Tensor, e: Int32):
        """Expert e's total and its count before this tile: the sums of step 1's parts."""
        tot = sTot[e]
        pre = sPre[e]
        for p in cutlass.range_constexpr(1, self.parts):  # independent loads, all in flight
            tot += sTot[p * self.E + e]
            pre += sPre[p * self.E + e]
        return tot, pre

    @cute.jit
    def clear_bits(self, sBits: cute.Tensor, nwa: Int32, tidx: Int32):
        """Zero the first ``nwa`` bit words of every expert (the caller syncs after)."""
        for i in cutlass.range(tidx, self.E * nwa, self.threads, unroll=1):
            sBits[i] = 0

    @cute.jit
    def mark_bits(self, sBits: cute.Tensor, eid: cute.Tensor, tidx: Int32):
        """A bit per (expert, token) of this thread's pairs of the chunk (the caller syncs after)."""
        for i in cutlass.range_constexpr(self.S):
            tl = (tidx + i * self.threads) // self.S
            if eid[i] >= 0:
                cute.arch.atomic_or(sBits.iterator + ((tl // 32) * self.E + eid[i]), Int32(1) << (tl % 32),
                                    scope="cta")

    @cute.jit
    def word_prefix(self, sBits: cute.Tensor, sPfx: cute.Tensor, e: Int32, nwa: Int32) -> Int32:
        """Per bit word of expert e: its count in the chunk's words before (sPfx); returns
        the expert's count in the chunk."""
        run = Int32(0)
        for w in cutlass.range(nwa, unroll=1):
            sPfx[w * self.E + e] = run
            run += cute.arch.popc(sBits[w * self.E + e])
        return run

    @cute.jit
    def chunk_ranks(self, c0: Int32, t_end: Int32, tidx: Int32, eid: cute.Tensor, sBits: cute.Tensor,
                    sPfx: cute.Tensor, sCnt: cute.Tensor, sCoff: cute.Tensor, sWarp: cute.Tensor):
        """A later chunk's bits -> word prefixes (sPfx), per expert its count (sCnt) and,
        for the sorted gather writes, where its run starts in the chunk (sCoff). Ends synced.
        (The first chunk's are interleaved with phases 1 and 2 in the kernel.)"""
        nwa = (cutlass.min(t_end - c0, self.threads) + 31) // 32  # bit words in use per expert
        self.clear_bits(sBits, nwa, tidx)
        cute.arch.sync_threads()
        self.mark_bits(sBits, eid, tidx)
        cute.arch.sync_threads()
        for e in cutlass.range(tidx, self.E, self.threads, unroll=1):
            sCnt[e] = self.word_prefix(sBits, sPfx, e, nwa)
        cute.arch.sync_threads()
        if const_expr(self.sorted_gather):
            self.exclusive_scan(sCnt, sCoff, sWarp, tidx)

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mWeights: cute.Tensor, mHistW: cute.Tensor, mCounts: cute.Tensor,
               mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor,
               mKeptW: cute.Tensor, tile: Int32, cap: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        self.body(mIds, mWeights, mHistW, mCounts, mOffsets, mRouted, mGather, mScatter, mKeptW, tile, cap,
                  bidx, mHistW.shape[0], tidx)

    @cute.jit
    def body(self, mIds: cute.Tensor, mWeights: cute.Tensor, mHistW: cute.Tensor, mCounts: cute.Tensor,
             mOffsets: cute.Tensor, mRouted: cute.Tensor, mGather: cute.Tensor, mScatter: cute.Tensor,
             mKeptW: cute.Tensor, tile: Int32, cap: Int32, bidx: Int32, workers: Int32, tidx: Int32,
             sHistIn: cute.Tensor = None, sIdsIn: cute.Tensor = None, local: Int32 = None):
        """The metadata of tile ``bidx`` (tokens ``bidx * tile ..``), by one CTA of ``workers``
        that share the rows of step 3 (the kernel: every tile's CTA; a fused decode kernel, see
        ``moebench.kernels.decode``: one CTA with ``bidx = 0``, ``tile = T``). With ``sHistIn``
        (the CTA's int32 counts of all tokens) and ``local != 0`` (a runtime value) the totals
        come from shared memory instead of the histogram rows, and with ``sIdsIn`` (the ids of
        all tokens, ``[T * S]``) the ids too: the decode kernel's single-CTA case. ``local=True``
        (static) always takes them from shared memory; ``mHistW`` is then not read (None)."""
        E, S, NT, P, NW = self.E, self.S, self.threads, self.parts, self.words
        T = mIds.shape[0]
        R = mGather.shape[0]
        # where the totals come from: the histogram rows, shared memory, or either (runtime)
        source = "rows" if sHistIn is None else ("smem" if local is True else "either")
        if const_expr(source != "either"):
            local = Int32(0) if const_expr(source == "rows") else Int32(1)

        smem = cutlass.memory.SmemAllocator()
        sTot = smem.allocate_tensor(Int32, cute.make_layout(E * P), byte_alignment=16)
        sPre = smem.allocate_tensor(Int32, cute.make_layout(E * P), byte_alignment=16)
        sKept = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        sBlock = sKept  # the rows of each expert's block: its kept count, rounded up with `align`
        if const_expr(self.align > 1 and not self.padded):
            sBlock = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        sOff = smem.allocate_tensor(Int32, cute.make_layout(E + 1), byte_alignment=16)
        sWarp = smem.allocate_tensor(Int32, cute.make_layout(64), byte_alignment=16)
        sBits = smem.allocate_tensor(Int32, cute.make_layout(E * NW), byte_alignment=16)  # [word, expert]
        sPfx = smem.allocate_tensor(Int32, cute.make_layout(E * NW), byte_alignment=16)
        sCnt = smem.allocate_tensor(Int32, cute.make_layout(E), byte_alignment=16)
        if const_expr(self.capacity):
            sRow = smem.allocate_tensor(Int32, cute.make_layout(NT * S), byte_alignment=16)
        sCoff = sCnt  # unused unless sorted
        if const_expr(self.sorted_gather):  # the chunk's (row, token) pairs in expert order
            sCoff = smem.allocate_tensor(Int32, cute.make_layout(E + 1), byte_alignment=16)
            sGRow = smem.allocate_tensor(Int32, cute.make_layout(NT * S), byte_alignment=16)
            sGTok = smem.allocate_tensor(Int32, cute.make_layout(NT * S), byte_alignment=16)

        # 1. per expert: total over all tiles, and over the tiles before this one. The
        #    [tiles, cols] int16 histogram is read as 16-byte vectors (4 words of 2 experts),
        #    each vector column split over P threads; a thread issues its rows in batches of
        #    RB loads with no branch between them (the row index clamped, the value masked
        #    after). The first chunk's bits for step 4 are set around it (with `overlap`,
        #    while the first batch is in flight), their word prefixes computed with the sums
        #    over the parts, the expert-run starts scanned with the offsets: fewer barriers
        RB = self.rows_per_batch
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Int32, num_bits_per_copy=128)
        frag = cute.make_rmem_tensor((4, RB), Int32)
        aPre = cute.make_rmem_tensor((8,), Int32)
        aTot = cute.make_rmem_tensor((8,), Int32)
        t0 = bidx * tile
        t_end = cutlass.min(t0 + tile, T)
        ntok0 = cutlass.min(t_end - t0, NT)
        nwa0 = (ntok0 + 31) // 32
        eid = cute.make_rmem_tensor((S,), Int32)
        self.load_chunk_ids(mIds, t0, ntok0 * S, tidx, eid, sIdsIn, local)
        self.clear_bits(sBits, nwa0, tidx)
        cute.arch.sync_threads()
        if const_expr(self.overlap):
            if const_expr(source == "either"):
                if local == 0:
                    self.first_hist_batch(mHistW, tidx, atom, frag)
            elif const_expr(source == "rows"):
                self.first_hist_batch(mHistW, tidx, atom, frag)
            self.mark_bits(sBits, eid, tidx)
        if const_expr(source == "either"):
            if local == 0:
                self.sum_hist_rows(mHistW, bidx, tidx, sPre, sTot, atom, frag, aPre, aTot)
        elif const_expr(source == "rows"):
            self.sum_hist_rows(mHistW, bidx, tidx, sPre, sTot, atom, frag, aPre, aTot)
        if const_expr(not self.overlap):
            self.mark_bits(sBits, eid, tidx)
        cute.arch.sync_threads()
        for e in cutlass.range(tidx, E, NT, unroll=1):
            tot = Int32(0)
            pre = Int32(0)
            if const_expr(source == "either"):
                if local != 0:  # one CTA holds every token: its own counts, nothing before
                    tot = sHistIn[e]
                else:
                    tot, pre = self.sum_parts(sTot, sPre, e)
            elif const_expr(source == "smem"):
                tot = sHistIn[e]
            else:
                tot, pre = self.sum_parts(sTot, sPre, e)
            sTot[e] = tot
            sPre[e] = pre  # becomes the running rank base of the chunks below
            kept = tot
            if const_expr(self.capacity):
                kept = cutlass.min(tot, cap)
            sKept[e] = kept
            if const_expr(self.align > 1 and not self.padded):
                sBlock[e] = (kept + (self.align - 1)) // self.align * self.align
            if bidx == 0:
                mRouted[e] = tot
                mCounts[e] = kept
            sCnt[e] = self.word_prefix(sBits, sPfx, e, nwa0)
        cute.arch.sync_threads()

        # 2. offsets: exclusive scan of the kept counts (or e * capacity when padded); the
        #    first chunk's expert-run starts in the same passes
        if const_expr(self.padded):
            block = (cap + (self.align - 1)) // self.align * self.align
            for e in cutlass.range(tidx, E + 1, NT, unroll=1):
                sOff[e] = e * block
            if const_expr(self.sorted_gather):
                self.exclusive_scan(sCnt, sCoff, sWarp, tidx)
            else:
                cute.arch.sync_threads()
        elif const_expr(self.sorted_gather):
            self.exclusive_scan(sBlock, sOff, sWarp, tidx, sCnt, sCoff)
        else:
            self.exclusive_scan(sBlock, sOff, sWarp, tidx)
        if bidx == 0:
            for e in cutlass.range(tidx, E + 1, NT, unroll=1):
                mOffsets[e] = sOff[e]

        # 3. rows no assignment fills: gather_idx = -1 (past the last aligned block: -2)
        if const_expr(self.padded or self.align > 1):
            for e in cutlass.range(bidx, E, workers, unroll=1):
                for r in cutlass.range(sOff[e] + sKept[e] + tidx, sOff[e + 1], NT, unroll=1):
                    mGather[r] = -1
        if const_expr(not self.padded):
            tail = Int32(-2) if const_expr(self.align > 1) else Int32(-1)
            for r in cutlass.range(sOff[E] + bidx * NT + tidx, R, workers * NT, unroll=1):
                mGather[r] = tail

        # 4. the tile in chunks of NT tokens; the chunk's (token, slot) pairs spread over all
        #    threads (S per thread, consecutive pairs on consecutive threads: the id reads and
        #    the scatter writes are coalesced)
        for c0 in cutlass.range(t0, t_end, NT, unroll=1):
            ntok = cutlass.min(t_end - c0, NT)
            npairs = ntok * S
            if c0 != t0:  # the first chunk's bits were done with phases 1 and 2
                self.load_chunk_ids(mIds, c0, npairs, tidx, eid, sIdsIn, local)
                self.chunk_ranks(c0, t_end, tidx, eid, sBits, sPfx, sCnt, sCoff, sWarp)
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
                        in_chunk = sPfx[w * E + e] + cute.arch.popc(sBits[w * E + e] & below)
                        rank = sPre[e] + in_chunk
                        if const_expr(self.capacity):
                            if rank < cap:
                                row = sOff[e] + rank
                        else:
                            row = sOff[e] + rank
                        if const_expr(self.sorted_gather):
                            sGRow[sCoff[e] + in_chunk] = row
                            sGTok[sCoff[e] + in_chunk] = t
                    mScatter[t, a - tl * S] = row
                    if const_expr(not self.sorted_gather):
                        if row >= 0:
                            mGather[row] = t
                    if const_expr(self.capacity):
                        sRow[a] = row
            if const_expr(self.sorted_gather or self.capacity):
                cute.arch.sync_threads()
            if const_expr(self.sorted_gather):  # consecutive threads, consecutive rows of an expert
                for i in cutlass.range(tidx, sCoff[E], NT, unroll=1):
                    if sGRow[i] >= 0:
                        mGather[sGRow[i]] = sGTok[i]
            if const_expr(self.capacity):  # the kept weights, a token per thread
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
            if c0 + NT < t_end:  # the rank base of the next chunk
                cute.arch.sync_threads()
                for e in cutlass.range(tidx, E, NT, unroll=1):
                    sPre[e] = sPre[e] + sCnt[e]
                cute.arch.sync_threads()


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

import torch  # noqa: E402

from moebench.kernels.common import COMPILE_OPTIONS, CompileCache, fake_stream, fake_table, fake_vector  # noqa: E402

#: shared memory the metadata kernel may use with gather_idx written in expert order
SORTED_GATHER_SMEM = 200 * 1024
_cache = CompileCache()


def compile_indices(E: int, S: int, capacity: bool, padded: bool, renormalize: bool, align: int = 1,
                    sorted_gather: bool | None = None, overlap: bool | None = None, parts: int = 16):
    def build():
        T, B, R = cute.sym_int(), cute.sym_int(), cute.sym_int()
        return cute.compile(
            MetadataIndices(E, S, capacity=capacity, padded=padded, renormalize=renormalize,
                            sorted_gather=sorted_gather, overlap=overlap, parts=parts, align=align),
            fake_table(Int32, T, S), fake_table(Float32, T, S), fake_hist_words(B, E), fake_vector(Int32, E),
            fake_vector(Int32, E + 1), fake_vector(Int32, E), fake_vector(Int32, R), fake_table(Int32, T, S),
            fake_table(Float32, T, S), Int32(1), Int32(1), fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(("indices", E, S, capacity, padded, renormalize, align, sorted_gather, overlap, parts), build)


def new_outputs(T: int, S: int, E: int, num_rows: int, capacity: int | None, weights: torch.Tensor | None, dev):
    """The metadata kernels' outputs: counts, offsets, routed counts, gather and scatter indices,
    kept weights (dropless: ``weights`` themselves, every valid slot is kept)."""
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    routed = torch.empty(E, dtype=torch.int32, device=dev)
    gather = torch.empty(num_rows, dtype=torch.int32, device=dev)
    scatter = torch.empty(T, S, dtype=torch.int32, device=dev)
    kept_w = weights if capacity is None else torch.empty(T, S, dtype=torch.float32, device=dev)
    return counts, offsets, routed, gather, scatter, kept_w


def indices(ids: torch.Tensor, weights: torch.Tensor, hist: torch.Tensor, tile: int, E: int, num_rows: int,
            capacity: int | None = None, padded: bool = False, renormalize: bool = False, align: int = 1):
    """Counts, offsets, routed counts, gather and scatter indices, kept weights (one launch).

    ``ids`` [T, S] int32 and ``weights`` [T, S] fp32, contiguous; ``hist`` (int16) from
    the router kernel or :func:`histogram` with the same ``tile``. Dropless, the weights are returned
    as they are (every valid slot is kept)."""
    T, S = ids.shape
    counts, offsets, routed, gather, scatter, kept_w = new_outputs(T, S, E, num_rows, capacity, weights, ids.device)
    fn = compile_indices(E, S, capacity is not None, padded, renormalize and capacity is not None, align)
    fn(ids, weights, hist.view(torch.int32), counts, offsets, routed, gather, scatter, kept_w, tile,
       capacity if capacity is not None else 0)
    return counts, offsets, routed, gather, scatter, kept_w
