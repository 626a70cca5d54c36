"""Route: router logits ``[T, E]`` -> top-k expert ids and gate weights (``routing.route``),
and the per-tile expert histogram the metadata kernel starts from.

One *lane group* of ``G`` consecutive threads (a power of two, up to a warp) handles one
token at a time. Lane ``g`` holds the ``V`` experts ``g*V .. g*V+V-1`` of the row in fp32
registers (loaded as vectors of ``W`` elements where the row allows it), so E may be any
size up to 1024, a power of two or not. Selection is exact, with the reference tie-break:

    for each of the k slots:
        m   = max over the group of the lane maxima     (max.f32 skips NaN)
        idx = min over the group of the lowest index holding m
        the owner marks that expert taken (NaN)

Experts outside ``E``, taken ones and those of unselected groups hold NaN, so they never
win; -inf logits still compete like in the reference.

Where the selection is on the logits themselves (no sigmoid, no groups), each expert is one
int32 *key* instead: the logit's bits as an order-preserving integer, its low ``db`` bits
replaced by the reversed index, so one integer min-reduction per slot gives the value and the
lowest index together (no marking: the next slot takes the largest key below the last). A
16-bit logit's fp32 value has 13-16 always-zero low bits, so its key is exact. An fp32 logit
gives up its low ``log2(E)`` bits: the keys pick the k + 1 best, and only when two of them
share their truncated value (their order may be wrong) does the warp select again with the
exact per-slot selection above; the weights read the selected logits back (from k 4 and E 32
on, ``FP32_KEYS_MIN_K`` / ``_E``; below, fp32 takes the per-slot selection).

Everything the reference selects on is computed bit for bit like torch where it matters:
``softmax_topk`` / ``topk_*`` select on the logits themselves (the softmax is monotone, so
the order and the ties are the logits'; but fp32 logits one ulp apart can round to equal fp32
probabilities, which the reference then orders by index), sigmoid scores use the correctly
rounded ``1 / (1 + exp(-x))`` torch uses, plus the fp32 bias. Gate weights are computed in
fp32 (within 1e-5 of the reference).

A *wide* layout (``max_per_lane`` up to 64, quack's shape) is for keyed selections only: the row
loaded again after a tie, the softmax's sum before the keys, fp32's merge at n = k carrying the
k + 1-th key (``sorting.lowest(with_next=True)``). Slower on an H200 (``notes/router.md``).

Two variants (static, off by default in the kernel; ``impl.router_merge`` / ``router_stages``):
``merge`` takes the keys' best n = 2**ceil(log2 k) by sorting networks (``kernels.sorting``:
each lane sorts its keys in chunks of n and folds them, then log2(G) shuffle steps fold the
group's lanes) instead of k passes over the keys: the same instructions on Hopper, whose fused
add-min makes a pass one instruction a key, but short dependent chains, so it wins where a call
is a few tokens (the decode route) and loses at thousands (``notes/router.md``). fp32's k + 1-th
key is then the n-th (n > k), or (n = k) a range test of each lane's keys against the k-th's
truncated value. ``stages`` brings the rows through a shared-memory ring (cp.async, each lane
its own vectors: no barrier) instead of the registers' one-row prefetch.

The grid covers the tokens in *tiles* of ``tile`` tokens (a runtime value); a CTA routes
one tile and writes its expert histogram ``hist[tile, E]`` (counts are sums, so the
result is the same whatever order the CTA's threads add in). The metadata kernel
(``moebench.kernels.metadata``) turns the histograms into offsets and indices. The select
stage (ids and the selected logits, a top-k kernel alone) is the same kernel without the
histogram, its values written in the logits' dtype.

Writes: where a lane group of G lanes divides k, lane g writes its token's slots
``g*c .. g*c+c-1`` (c = k / G) as vectors (at one lane a token, E <= 32, k 8: its ids in two
16-byte stores instead of eight 4-byte ones 32 bytes apart in a warp); else lane ``j % G``
writes slot j. A warp stops after its own tokens: at E 8 (one lane per token) 3/4 of
a 512-thread CTA lies past a 128-token tile, and at T 1 all but one group (H200, see
``notes/router.md``).
"""

from __future__ import annotations

import math

import cuda.bindings.driver as cuda

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.common import VEC_BYTES, launch_capped
from moebench.kernels.gates import inv_row_sum, slot_weights
from moebench.kernels.histogram import clear_hist, hist_cols, store_hist_row
from moebench.kernels.lanes import MAX_PER_LANE, LaneLayout, lane_experts, lane_group_reduce, select_keyed, select_max, tree
from moebench.kernels.sorting import group_lowest

MAX_TOPK = 16
#: most shared memory the route kernel's row ring takes (``stages``)
RING_BYTES = 192 * 1024
#: fp32 logits select with truncated keys from this many slots and experts on. H200, T 16384,
#: rotated, route / select us, exact -> keys (runs/sample/h200_s9, calls V and W): E 256 k 8
#: 23.1 / 17.6 -> 17.2 / 13.4, k 4 14.9 / 12.2 -> 14.9 / 10.5; E 128 k 8 12.6 / 10.5 -> 11.1 / 9.5;
#: E 64 k 8 11.4 / 9.0 -> 11.4 / 8.5, k 4 7.7 / 4.9 -> 8.0 / 5.3; E 32 k 4 6.5 / 6.3 -> 5.7 / 5.2;
#: at k 2 the extra slot and the read-back lose (E 128 6.8 / 6.3 -> 7.8 / 6.6), and at E 8
#: (k 8: 4.1 / 4.0 -> 5.9 / 4.1)
FP32_KEYS_MIN_K = 4
FP32_KEYS_MIN_E = 32

#: selection scores: the logit itself, or the sigmoid of it (plus the bias, if any)
SCORES = ("logit", "sigmoid")
#: gate weights before renormalisation and scaling:
#:   prob      softmax over all E experts, taken at the selected ones
#:   softmax_k softmax over the k selected logits (/ temperature)
#:   sum_k     the k selected logits (/ temperature) over their signed sum
#:   score     the selected (unbiased) sigmoid scores
#:   one       1
#:   value     the selected selection score itself (the logit, for score="logit"): the select stage
WEIGHTS = ("prob", "softmax_k", "sum_k", "score", "one", "value")
GROUP_SCORES = ("top2_sum", "max")

_LOG2E = math.log2(math.e)


def _shuffle_xor(x, offset: int):
    return cute.arch.shuffle_sync_bfly(x, offset=offset)


class TopKRouter:
    """logits [T, E] -> ids [T, k] int32, weights [T, k] fp32, hist [tiles, hist_cols(E)] int16
    (the select stage: no hist, and the values in the logits' dtype).

    Static configuration: the logits dtype, E, k, how experts are scored and weighted,
    the bias, group-limited selection; the token count and the tile size are runtime."""

    def __init__(self, dtype, E: int, k: int, *, score: str = "logit", weight: str = "prob",
                 renormalize: bool = False, temperature: float = 1.0, scaling: float = 1.0,
                 has_bias: bool = False, n_group: int = 1, topk_group: int = 1, group_score: str = "top2_sum",
                 threads: int = 512, max_per_lane: int = 0, prefetch: bool = True,
                 hist: bool = True, values_in_dtype: bool = False, vector_store: bool = True,
                 stop_idle_warps: bool = True, merge: bool = False, stages: int = 0, min_ctas: int = 0):
        assert score in SCORES and weight in WEIGHTS and group_score in GROUP_SCORES
        assert not values_in_dtype or weight == "value"
        assert 1 <= k <= min(E, MAX_TOPK)
        self.dtype = dtype
        self.E, self.k = E, k
        self.score, self.weight = score, weight
        self.renormalize, self.temperature, self.scaling = renormalize, float(temperature), float(scaling)
        self.has_bias = has_bias
        self.grouped = n_group > 1
        self.n_group, self.topk_group, self.group_score = n_group, topk_group, group_score
        gs = E // n_group if self.grouped else 0
        on_logits = score == "logit" and not self.grouped
        # a wide layout (more than MAX_PER_LANE experts a lane, asked for with max_per_lane) only
        # where the selection is keyed (below): one int32 a key, the row read again after a tie;
        # elsewhere max_per_lane is capped at MAX_PER_LANE (it is a most)
        keyable = on_logits and (dtype.width == 16 or merge or (k >= FP32_KEYS_MIN_K and E >= FP32_KEYS_MIN_E))
        per_lane = max_per_lane if keyable else min(max_per_lane, MAX_PER_LANE)
        self.lanes = LaneLayout.make(E, dtype.width // 8, gs, per_lane or lane_experts(dtype, E, k, threads))
        self.wide = self.lanes.V > MAX_PER_LANE
        self.prefetch = prefetch  # load the next token's row before selecting on this one
        # stages > 0: the rows come through a ring of `stages` steps in shared memory instead
        # (cp.async, stages - 1 steps ahead, each lane its own vectors: no barrier), so more
        # bytes are in flight than the registers hold; fewer stages where the ring would not fit
        per_stage = max(threads, self.lanes.G) * self.lanes.V * dtype.width // 8
        self.stages = min(stages, RING_BYTES // per_stage)
        if self.stages < 2 or self.lanes.W * dtype.width < 32:  # cp.async copies 4, 8 or 16 bytes
            self.stages = 0
        self.group_size = gs
        self.groups_per_lane = self.lanes.V // gs if self.grouped else 0
        self.threads = max(threads, self.lanes.G)
        self.hist = hist  # count the tile's assignments into hist (the select stage has no use for it)
        # the select stage's values in the logits' dtype (exact: they are logits), like quack's
        self.out_dtype = dtype if values_in_dtype else Float32
        # each lane of a group writes c = k / G consecutive slots of its token as vectors of
        # store_vec elements (16 bytes at most); 1 = lane j % G writes slot j alone
        c = k // self.lanes.G if k % self.lanes.G == 0 else 1
        self.store_vec = min(c & -c, 4) if vector_store and c >= 2 else 1
        # a warp stops after its own tokens (False: every warp runs the tile's steps, as before)
        self.stop_idle_warps = stop_idle_warps
        # registers capped so this many CTAs fit an SM (0: ptxas's choice)
        self.min_ctas = min_ctas
        # Merge selection (``merge``): the keys' best n = 2**ceil(log2 k) by sorting networks
        # (kernels.sorting: each lane sorts its keys in chunks of n and folds them, then the group
        # folds its lanes' lists over log2(G) shuffle steps) instead of k passes over the keys; for
        # fp32 the k + 1-th key is the n-th (n > k) or a range test on each lane's keys (n = k)
        self.merge_n = 1 << (k - 1).bit_length()
        self.merge = merge and on_logits and self.lanes.V >= self.merge_n
        # logits selected as they are: value and index fit one int32 key (see route_tile). A
        # 16-bit logit's fp32 value has always-zero low bits that hold the index: the key is
        # exact. An fp32 logit loses its low log2(E) bits to the index: the keys select, a tie of
        # truncated values among the k + 1 best sends the warp to the exact selection; from
        # FP32_KEYS_MIN_K slots and FP32_KEYS_MIN_E experts on, where the keys' cheaper slots
        # pay for the extra one and the read-back, and wherever the merge selection runs
        self.keyed = on_logits and (dtype.width == 16 or self.merge or (k >= FP32_KEYS_MIN_K and E >= FP32_KEYS_MIN_E))
        assert self.keyed or not self.wide
        self.exact_keys = dtype.width == 16
        self.drop_bits = 16 if dtype is cutlass.BFloat16 else 13 if dtype.width == 16 else max(1, (E - 1).bit_length())
        assert E <= 1 << self.drop_bits

    @cute.jit
    def __call__(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
                 mHist: cute.Tensor, tile: Int32, stream: cuda.CUstream):
        assert mLogits.element_type == self.dtype
        launch_capped(self.kernel(mLogits, mBias, mIds, mWeights, mHist, tile), [mHist.shape[0], 1, 1],
                      [self.threads, 1, 1], stream, self.min_ctas)

    # -- group-wide reductions over the G lanes of a token (xor shuffles stay in the group) --
    @cute.jit
    def group_reduce(self, op: cutlass.Constexpr, x):
        """``op`` over the G lanes of a token (xor shuffles stay inside the group)."""
        return lane_group_reduce(op, x, self.lanes.G)

    @cute.jit
    def select(self, sel: cute.Tensor, src: cute.Tensor, base: Int32, n: cutlass.Constexpr[int],
               src_is_sel: cutlass.Constexpr[bool]):
        return select_max(sel, src, base, n, src_is_sel, self.lanes.G)

    @cute.jit
    def load_row(self, mLogits: cute.Tensor, t: Int32, t_end: Int32, base: Int32, atom, dst: cute.Tensor):
        """This lane's experts of row ``t`` into ``dst`` (left as they are past ``t_end``; a wide
        layout loads row ``t_end - 1`` there instead, so what ``dst`` held is dead: 64 registers
        not kept across the selection)."""
        if const_expr(self.wide):
            self.copy_row(mLogits, cutlass.min(t, t_end - 1), base, atom, dst)
        else:
            if t < t_end:
                self.copy_row(mLogits, t, base, atom, dst)

    @cute.jit
    def copy_row(self, mLogits: cute.Tensor, t: Int32, base: Int32, atom, dst: cute.Tensor):
        """This lane's experts of row ``t`` into ``dst`` (vectors of W; none past E)."""
        W, V = self.lanes.W, self.lanes.V
        gRow = cute.zipped_divide(mLogits[t, None], (W,))
        for i in cutlass.range_constexpr(V // W):
            if base + i * W < self.E:
                cute.copy(atom, gRow[None, base // W + i], dst[None, i])

    @cute.jit
    def as_fp32(self, raw: cute.Tensor, dst: cute.Tensor, base: Int32):
        """A loaded row share ``raw`` as fp32 in ``dst``, NaN past E (never selected)."""
        dst.store(raw.load().to(Float32))
        for v in cutlass.range_constexpr(self.lanes.V):
            if base + v >= self.E:
                dst[v] = Float32.nan

    @cute.jit
    def fetch_row(self, mLogits: cute.Tensor, t: Int32, t_end: Int32, base: Int32, atom, sRing: cute.Tensor,
                  tidx: Int32, s: Int32):
        """Start copying this lane's experts of row ``t`` into its stage ``s`` of the ring
        (nothing past ``t_end``; the caller commits the group)."""
        W, V = self.lanes.W, self.lanes.V
        if t < t_end:
            gRow = cute.zipped_divide(mLogits[t, None], (W,))
            for i in cutlass.range_constexpr(V // W):
                if base + i * W < self.E:
                    cute.copy(atom, gRow[None, base // W + i], sRing[None, i, tidx, s])

    @cute.jit
    def select_keyed(self, nkeys: cute.Tensor, below: Int32, first: cutlass.Constexpr[bool]) -> Int32:
        return select_keyed(nkeys, below, first, self.lanes.V, self.lanes.G)

    @cute.kernel
    def kernel(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
               mHist: cute.Tensor, tile: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        sRing = None
        if const_expr(self.hist or self.stages > 0):
            smem = cutlass.memory.SmemAllocator()
        if const_expr(self.stages > 0):  # lane tidx's vector i of stage s at sRing[None, i, tidx, s]
            L = self.lanes
            sRing = smem.allocate_tensor(self.dtype, cute.make_layout(
                (L.W, L.V // L.W, self.threads, self.stages),
                stride=(1, self.threads * L.W, L.W, self.threads * L.V)), byte_alignment=16)
        if const_expr(self.hist):
            sHist = smem.allocate_tensor(Int32, cute.make_layout(hist_cols(self.E)), byte_alignment=16)
            clear_hist(sHist, tidx, self.threads)
            cute.arch.sync_threads()
            self.route_tile(mLogits, mBias, mIds, mWeights, tile, bidx, tidx, sHist, sRing=sRing)
            cute.arch.sync_threads()
            store_hist_row(mHist, bidx, sHist, tidx, self.threads)
        else:  # hist only sizes the grid
            self.route_tile(mLogits, mBias, mIds, mWeights, tile, bidx, tidx, None, sRing=sRing)

    @cute.jit
    def route_tile(self, mLogits: cute.Tensor, mBias: cute.Tensor, mIds: cute.Tensor, mWeights: cute.Tensor,
                   tile: Int32, bidx: Int32, tidx: Int32, sHist: cute.Tensor, sIds: cute.Tensor = None,
                   sRing: cute.Tensor = None):
        """Route tile ``bidx`` (tokens ``bidx * tile ..``): write its ids and weights, count its
        assignments in ``sHist`` (cleared and synced by the caller, who syncs after; None where
        ``hist`` is off) and, with ``sIds``, keep its ids there too (``sIds[(t - bidx * tile) * k + j]``).
        With ``sRing`` (``stages`` steps) the rows come through it, else through registers."""
        L = self.lanes
        E, k, V, W, G = self.E, self.k, L.V, L.W, L.G
        T = mLogits.shape[0]
        groups = self.threads // G
        g = tidx % G
        base = g * V  # this lane's first expert

        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=W * self.dtype.width)
        raw = cute.make_rmem_tensor((W, V // W), self.dtype)
        if const_expr(self.wide):  # the exact selection's second load of a row (another op: not merged)
            reload_atom = cute.make_copy_atom(cute.nvgpu.CopyG2ROp(), self.dtype, num_bits_per_copy=W * self.dtype.width,
                                              l1c_evict_priority=cute.nvgpu.CacheEvictionPriority.NO_ALLOCATE)
        ring = sRing is not None
        prefetch = self.prefetch and not ring
        if const_expr(prefetch):
            nxt = cute.make_rmem_tensor((W, V // W), self.dtype)
        x = cute.make_rmem_tensor((W, V // W), Float32)  # flat index v = expert base + v
        sel = cute.make_rmem_tensor((V,), Float32)
        src = cute.make_rmem_tensor((V,), Float32)
        ids = cute.make_rmem_tensor((k,), Int32)
        wts = cute.make_rmem_tensor((k,), Float32)
        if const_expr(self.keyed):
            keys = cute.make_rmem_tensor((V,), Int32)
            bits = cute.make_rmem_tensor((1,), Int32)
            bits_f = cute.recast_tensor(bits, Float32)
        if const_expr(self.store_vec > 1):
            sv = self.store_vec
            # this lane's slots g * c + i at flat index i, mode 1 picks a vector
            own_ids = cute.make_rmem_tensor((sv, k // G // sv), Int32)
            own_wts = cute.make_rmem_tensor((sv, k // G // sv), self.out_dtype)
            atom_ids = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Int32, num_bits_per_copy=sv * 32)
            atom_wts = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.out_dtype,
                                           num_bits_per_copy=sv * self.out_dtype.width)
        if const_expr(self.grouped):
            gsel = cute.make_rmem_tensor((self.groups_per_lane,), Float32)
            gkeep = cute.make_rmem_tensor((self.groups_per_lane,), Float32)

        t0 = bidx * tile
        t_end = cutlass.min(t0 + tile, T)
        # every group of a warp runs the same number of steps (the shuffles need whole warps):
        # as many as its first group has tokens; a group past the tile's end computes on stale
        # registers and writes nothing. A warp with no token left stops (idle warps would
        # compute on: at E 8 one lane per token leaves 3/4 of a 512-thread CTA past the tile)
        steps = cute.ceil_div(tile, groups)
        if const_expr(self.stop_idle_warps):
            warp_off = cute.arch.make_warp_uniform(tidx // 32) * (32 // G)  # the warp's first group
            steps = (cutlass.max(t_end - t0 - warp_off, 0) + (groups - 1)) // groups
        if const_expr(ring):
            S = self.stages
            atom_async = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), self.dtype,
                                             num_bits_per_copy=W * self.dtype.width)
            for s in cutlass.range_constexpr(S - 1):
                self.fetch_row(mLogits, t0 + s * groups + tidx // G, t_end, base, atom_async, sRing, tidx, s)
                cute.arch.cp_async_commit_group()
        elif const_expr(prefetch):
            self.load_row(mLogits, t0 + tidx // G, t_end, base, atom, nxt)
        for r in cutlass.range(steps, unroll=1):
            t = t0 + r * groups + tidx // G
            active = t < t_end
            # -- load this lane's experts of row t as fp32 (NaN past E) -----------------------
            if const_expr(ring):  # step r + S - 1 into the stage step r - 1 left; step r is in
                self.fetch_row(mLogits, t + (S - 1) * groups, t_end, base, atom_async, sRing, tidx, (r + S - 1) % S)
                cute.arch.cp_async_commit_group()
                cute.arch.cp_async_wait_group(S - 1)
                for i in cutlass.range_constexpr(V // W):
                    cute.copy(atom, sRing[None, i, tidx, r % S], raw[None, i])
            elif const_expr(prefetch):
                raw.store(nxt.load())
                self.load_row(mLogits, t + groups, t_end, base, atom, nxt)
            else:
                self.load_row(mLogits, t, t_end, base, atom, raw)
            self.as_fp32(raw, x, base)
            # -- selection scores ------------------------------------------------------------
            for v in cutlass.range_constexpr(V):
                if const_expr(self.score == "sigmoid"):
                    s = Float32(1.0) / (Float32(1.0) + cute.math.exp(-x[v]))
                    src[v] = s
                    if const_expr(self.has_bias):
                        if base + v < E:
                            s = s + mBias[base + v]
                    sel[v] = s
                else:
                    sel[v] = x[v]
                    src[v] = x[v]
            # softmax over all E (the "prob" weights): group max and sum of exp
            row_max = Float32(0.0)
            # the best group may not hold the max; a wide layout takes the sum before the keys, so
            # the row's registers are free during the selection
            early = self.weight == "prob" and (self.grouped or self.wide)
            if const_expr(early):
                row_max = self.group_reduce(cute.arch.fmax, tree(cute.arch.fmax, [x[v] for v in range(V)]))
            if const_expr(early and self.wide):
                inv = inv_row_sum(x, base, row_max, V, E, G)
            # -- group-limited: keep the experts of the best topk_group groups ---------------
            if const_expr(self.grouped):
                gs, gpl = self.group_size, self.groups_per_lane
                for q in cutlass.range_constexpr(gpl):
                    m1 = -Float32.inf
                    m2 = -Float32.inf
                    for v in cutlass.range_constexpr(q * gs, (q + 1) * gs):
                        if sel[v] > m1:
                            m2 = m1
                            m1 = sel[v]
                        elif sel[v] > m2:
                            m2 = sel[v]
                    gscore = m1
                    if const_expr(self.group_score == "top2_sum" and gs >= 2):
                        gscore = m1 + m2
                    gsel[q] = gscore
                    if base + q * gs >= E:
                        gsel[q] = Float32.nan
                    gkeep[q] = Float32(0.0)
                for _ in cutlass.range_constexpr(self.topk_group):
                    gi, _w = self.select(gsel, gsel, g * gpl, gpl, True)
                    for q in cutlass.range_constexpr(gpl):
                        if g * gpl + q == gi:
                            gkeep[q] = Float32(1.0)
                for v in cutlass.range_constexpr(V):
                    if gkeep[v // gs] == Float32(0.0):
                        sel[v] = Float32.nan
            # -- the k slots, best first ---------------------------------------------------------
            if const_expr(self.keyed):
                # key = o + (2**db - 1 - expert), o = the logit's fp32 bits as a signed
                # magnitude (order-preserving, -0 = +0 = 0) with its low db bits cleared (always
                # zero for a 16-bit logit): the largest key is the largest logit, the lowest
                # expert among equal ones. `keys` holds them negated (see select_keyed):
                # -key = (sg - ms) - (mask - expert) with sg = sign mask, ms = magnitude ^ sg
                db = self.drop_bits
                mask = (1 << db) - 1
                xi = cute.recast_tensor(x, Int32)
                for v in cutlass.range_constexpr(V):
                    sg = xi[v] >> 31
                    mag = xi[v] & Int32(0x7FFFFFFF)
                    if const_expr(self.exact_keys):
                        keys[v] = (sg - (mag ^ sg)) - (mask - (base + v))  # -key
                    else:  # every NaN as the canonical one (no int32 overflow), then truncated
                        o = ((cutlass.min(mag, Int32(0x7FC00000)) ^ sg) - sg) & Int32(~mask)
                        keys[v] = (Int32(0) - o) - (mask - (base + v))  # -key
                    if base + v >= E:
                        keys[v] = Int32(2**31 - 1)
                key = Int32(0)
                tie = Int32(0)  # fp32: two of the k + 1 best share their truncated value
                # a wide layout's merge (n = k) carries the k + 1-th key through the networks, so the
                # keys are not kept for the tie check (64 registers)
                carry_next = self.merge and self.wide and not self.exact_keys and self.merge_n == k and k < E
                if const_expr(carry_next):
                    top, top_next = group_lowest([keys[v] for v in range(V)], k, G, _shuffle_xor, with_next=True)
                elif const_expr(self.merge):  # the group's best n keys, best first, in every lane
                    top = group_lowest([keys[v] for v in range(V)], self.merge_n, G, _shuffle_xor)
                for j in cutlass.range_constexpr(k):
                    prev = key
                    if const_expr(self.merge):
                        key = Int32(0) - top[j]
                    else:
                        key = self.select_keyed(keys, key, j == 0)
                    if const_expr(not self.exact_keys and j > 0):
                        if (key & Int32(~mask)) == (prev & Int32(~mask)):
                            tie = Int32(1)
                    ids[j] = mask - (key & mask)
                    o = key & Int32(~mask)  # back to the fp32 bits: sign | magnitude
                    neg = o >> 31
                    bits[0] = ((o ^ neg) - neg) | (neg << 31)
                    wts[j] = bits_f[0]
                if const_expr(not self.exact_keys):
                    if const_expr(k < E and (not self.merge or self.merge_n > k)):  # the best unselected one
                        if const_expr(self.merge):
                            nxt_key = Int32(0) - top[k]
                        else:
                            nxt_key = self.select_keyed(keys, key, False)
                        if (nxt_key & Int32(~mask)) == (key & Int32(~mask)):
                            tie = Int32(1)
                    elif const_expr(carry_next):
                        nxt_key = Int32(0) - top_next
                        if (nxt_key & Int32(~mask)) == (key & Int32(~mask)):
                            tie = Int32(1)
                    elif const_expr(k < E):  # merged n = k: does a key of this lane share the k-th's
                        # truncated value below it? (-key in (-k-th, -truncated k-th])
                        worst = Int32(0) - (key & Int32(~mask))
                        for v in cutlass.range_constexpr(V):
                            if keys[v] > top[k - 1] and keys[v] <= worst:
                                tie = Int32(1)
                    # Without such a tie the truncated order of the k + 1 best is strict, so it
                    # is the exact order and every other expert is below the k-th: the keys'
                    # selection is exact. With one, the warp (its shuffles need every lane)
                    # selects again on the exact values; then the selected logits are read
                    # back (just loaded: the L1) for the weights.
                    if cute.arch.vote_any_sync(tie != Int32(0)):
                        if const_expr(self.wide):  # the row again (the L1), not kept in registers: by
                            # another load op, which ptxas does not merge with the first load
                            self.load_row(mLogits, t, t_end, base, reload_atom, raw)
                            self.as_fp32(raw, sel, base)
                        for j in cutlass.range_constexpr(k):
                            ids[j], wts[j] = self.select(sel, src, base, V, True)
                    if const_expr(self.wide):  # unconditionally (a lane past the tile has row t_end - 1's
                        # ids): under a branch the compiler sinks the selection into it, keys and all
                        for j in cutlass.range_constexpr(k):
                            wts[j] = mLogits[cutlass.min(t, t_end - 1), ids[j]]
                    elif active:
                        for j in cutlass.range_constexpr(k):
                            wts[j] = mLogits[t, ids[j]]
            else:
                for j in cutlass.range_constexpr(k):
                    ids[j], wts[j] = self.select(sel, src, base, V, self.score == "logit")
            # -- gate weights ----------------------------------------------------------------------
            if const_expr(self.weight == "prob"):
                if const_expr(not early):
                    row_max = wts[0]  # the first slot holds the largest logit
                if const_expr(not (early and self.wide)):
                    inv = inv_row_sum(x, base, row_max, V, E, G)
                for j in cutlass.range_constexpr(k):
                    wts[j] = cute.math.exp2((wts[j] - row_max) * _LOG2E, fastmath=True) * inv
            slot_weights(wts, k, self.weight, self.temperature, self.renormalize, self.scaling)
            # -- write: slot j by lane j // c (c = k / G consecutive slots each, as vectors) or
            # by lane j % G; count it in the tile's histogram ---------------------------------------
            if const_expr(self.store_vec > 1):
                c, sv = k // G, self.store_vec
                for i in cutlass.range_constexpr(c):  # this lane's slots g * c + i
                    own_ids[i] = ids[i]
                    w = wts[i]
                    for q in cutlass.range_constexpr(1, G):
                        if g == q:
                            own_ids[i] = ids[q * c + i]
                            w = wts[q * c + i]
                    own_wts[i] = w.to(self.out_dtype)
                if active:
                    gI = cute.zipped_divide(mIds[t, None], (sv,))
                    gW = cute.zipped_divide(mWeights[t, None], (sv,))
                    for i in cutlass.range_constexpr(c // sv):
                        cute.copy(atom_ids, own_ids[None, i], gI[None, g * (c // sv) + i])
                        cute.copy(atom_wts, own_wts[None, i], gW[None, g * (c // sv) + i])
                    for i in cutlass.range_constexpr(c):
                        self.keep_slot(sHist, sIds, own_ids[i], (t - t0) * k + g * c + i)
            else:
                for j in cutlass.range_constexpr(k):
                    if active and g == j % G:
                        mIds[t, j] = ids[j]
                        mWeights[t, j] = wts[j].to(self.out_dtype)
                        self.keep_slot(sHist, sIds, ids[j], (t - t0) * k + j)

    @cute.jit
    def keep_slot(self, sHist: cute.Tensor, sIds: cute.Tensor, e: Int32, pos: Int32):
        """Count a written slot's expert ``e`` in the tile's histogram and keep it at ``sIds[pos]``
        (each where the caller passed one)."""
        if const_expr(sHist is not None):
            cute.arch.atomic_add(sHist.iterator + e, Int32(1), scope="cta")
        if const_expr(sIds is not None):
            sIds[pos] = e


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

import torch  # noqa: E402

from moebench.kernels.common import COMPILE_OPTIONS, TORCH_TO_CUTE, CompileCache, fake_stream, fake_table, fake_vector  # noqa: E402
from moebench.kernels.histogram import fake_hist, new_hist, tile_size  # noqa: E402

_cache = CompileCache()


def fake_logits(dtype, rows, E: int):
    """Contiguous logits [rows, E]; the base 16-byte aligned (the vector loads need it)."""
    return cute.runtime.make_fake_tensor(dtype, (rows, E), stride=(E, 1), assumed_align=VEC_BYTES)


def compile_router(dtype, E: int, k: int, **static):
    """The compiled router for a CuTeDSL dtype, E, k and the static options of TopKRouter."""
    key = (dtype, E, k, tuple(sorted(static.items())))

    def build():
        T, B = cute.sym_int(), cute.sym_int()
        op = TopKRouter(dtype, E, k, **static)
        return cute.compile(op, fake_logits(dtype, T, E), fake_vector(Float32, E), fake_table(Int32, T, k, VEC_BYTES),
                            fake_table(op.out_dtype, T, k, VEC_BYTES), fake_hist(B, E), Int32(1),
                            fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


_zero_bias: dict = {}


def selection_bias(bias: torch.Tensor | None, E: int, dev) -> torch.Tensor:
    """The kernels' bias argument: ``bias`` as contiguous fp32, or (no bias) one zero vector per
    device and E, kept for the next call."""
    if bias is not None:
        return bias.to(torch.float32).contiguous()
    zero = _zero_bias.get((dev, E))
    if zero is None:
        zero = _zero_bias[(dev, E)] = torch.zeros(E, dtype=torch.float32, device=dev)
    return zero


def route(logits: torch.Tensor, k: int, bias: torch.Tensor | None = None, out=None, tile: int | None = None,
          **static):
    """ids [T, k] int32, weights [T, k] (fp32; the logits' dtype with ``values_in_dtype``), hist
    [tiles, hist_cols(E)] int16 (not written with ``hist=False``) and the tile size: ``tile``
    tokens a CTA, or (None) the metadata's ``tile_size(T)``.

    ``logits`` [T, E] of a handled dtype; ``static`` as TopKRouter (the caller has
    checked the combination, see ``moebench.impls.cute_impl``)."""
    T, E = logits.shape
    dev = logits.device
    if not logits.is_contiguous() or logits.data_ptr() % VEC_BYTES:
        logits = logits.contiguous() if not logits.is_contiguous() else logits.clone()
    ids, weights = out if out is not None else (None, None)
    wdtype = logits.dtype if static.get("values_in_dtype") else torch.float32

    def usable(t, dtype):  # a given output buffer is written in place only when it fits exactly
        return (t is not None and t.is_contiguous() and t.dtype == dtype and tuple(t.shape) == (T, k)
                and t.device == dev and t.data_ptr() % VEC_BYTES == 0)  # rows may be written as vectors

    if not usable(ids, torch.int32):
        ids = torch.empty(T, k, dtype=torch.int32, device=dev)
    if not usable(weights, wdtype):
        weights = torch.empty(T, k, dtype=wdtype, device=dev)
    tile = tile or tile_size(T)
    hist = new_hist(T, E, tile, dev)
    if T == 0:
        return ids, weights, hist.zero_(), tile
    has_bias = bias is not None
    bias = selection_bias(bias, E, dev)
    fn = compile_router(TORCH_TO_CUTE[logits.dtype], E, k, **dict(static, has_bias=has_bias))
    fn(logits, bias, ids, weights, hist, tile)
    return ids, weights, hist, tile
