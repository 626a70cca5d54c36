"""Backward kernels of the routing stages (``impl=cute``, training).

* pack backward is an unweighted combine: ``d_x[t] = sum_j d_packed[scatter_idx[t, j]]`` --
  :class:`moebench.kernels.combine.Combine` with ``weighted=False``;
* :class:`CombineBackward`: ``d_y[scatter_idx[t, j]] = w[t, j] * d_out[t]`` (a weighted pack)
  and ``d_w[t, j] = <d_out[t], y[scatter_idx[t, j]]>`` in fp32, in one pass over the rows: one
  row group (up to a warp) per token reads ``d_out[t]`` once and each kept slot's row once,
  writes the slot's gradient row and accumulates the dot product, reduced over the group with
  shuffles. Rows no slot points at (a capacity's tail, padding) get zero gradient rows;
  dropped slots get no gradient (``d_w`` 0);
* :class:`RouteBackward`: ``d_logits [T, E]`` from ``d_weights [T, k]`` through the router's
  weight formula (the selection has no gradient, nor the selection bias): a lane group per token
  (a warp from E 32 up), each lane holding consecutive experts read and written as vectors (the
  forward router's ``LaneLayout``), the selected logits shuffled from their owner lanes, fp32
  arithmetic, one rounding to the logits' dtype. Weight kinds as the forward router (``kernels.router``):
  ``prob`` (softmax over all E at the selected experts), ``softmax_k`` / ``sum_k`` (over the
  selected logits / temperature), ``score`` (the selected sigmoid scores), ``one``; then
  ``renormalize`` over the k and ``scaling``.

Compiled once per static key, quack style; T and R are runtime values.
"""

from __future__ import annotations

import math
import operator

import cuda.bindings.driver as cuda
import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.common import (
    COMPILE_OPTIONS,
    VEC_BYTES,
    TORCH_TO_CUTE,
    CompileCache,
    RowTiling,
    as_rows,
    as_table,
    fake_rows,
    fake_stream,
    fake_table,
    fake_vector,
    load_atom,
    load_chunk,
    row_vectors,
    rows_ok,
    store_atom,
    store_chunk,
    vec_elems,
)
from moebench.kernels.lanes import LaneLayout, lane_group_reduce
from moebench.kernels.router import fake_logits

#: most slots per token the kernels unroll over
MAX_SLOTS = 16
#: 128-bit loads a thread may have in flight per chunk (the slots' rows and d_out)
MAX_LOADS = 32
WEIGHTS = ("prob", "softmax_k", "sum_k", "score", "one")
_LOG2E = math.log2(math.e)


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


class CombineBackward:
    """(d_y, d_w) of ``out[t] = sum_j w[t, j] * y[scatter_idx[t, j]]`` (see the module doc)."""

    def __init__(self, dtype, H: int, S: int, *, weighted: bool = True, zero_empty: bool = False,
                 threads: int = 256, max_iters: int = 0, hint: str = "none"):
        assert 1 <= S <= MAX_SLOTS
        self.dtype = dtype
        self.vec = vec_elems(dtype)
        assert H % self.vec == 0, f"H={H} is not a multiple of {self.vec} elements"
        self.S, self.weighted, self.zero_empty, self.hint = S, weighted, zero_empty, hint
        nvec = H // self.vec
        max_iters = max(1, min(max_iters if max_iters > 0 else 16 // S, MAX_LOADS // (S + 1)))
        # a token's row group stays inside one warp: its dot products reduce with shuffles
        self.tiling = RowTiling.make(nvec, max_iters, threads, tpr=min(32, _pow2_floor(nvec)))

    @cute.jit
    def __call__(self, mDOut: cute.Tensor, mY: cute.Tensor, mScatter: cute.Tensor, mW: cute.Tensor,
                 mGather: cute.Tensor, mDY: cute.Tensor, mDW: cute.Tensor, stream: cuda.CUstream):
        assert mY.element_type == self.dtype and mDY.element_type == self.dtype
        tl = self.tiling
        token_ctas = cute.ceil_div(mDOut.shape[0], tl.rows_per_cta)
        grid = token_ctas
        if const_expr(self.zero_empty):
            grid = token_ctas + cute.ceil_div(mDY.shape[0], tl.rows_per_cta)
        self.kernel(mDOut, mY, mScatter, mW, mGather, mDY, mDW, token_ctas).launch(
            grid=[grid, 1, 1], block=[tl.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mDOut: cute.Tensor, mY: cute.Tensor, mScatter: cute.Tensor, mW: cute.Tensor,
               mGather: cute.Tensor, mDY: cute.Tensor, mDW: cute.Tensor, token_ctas: Int32):
        tl, S, vec = self.tiling, self.S, self.vec
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        group = tidx // tl.tpr
        lane = tidx % tl.tpr
        ld, st = load_atom(self.dtype, self.hint), store_atom(self.dtype, self.hint)
        if bidx < token_ctas:
            tok = bidx * tl.rows_per_cta + group
            active = tok < mDOut.shape[0]  # every lane runs the shuffles; inactive ones load nothing
            src = cute.make_rmem_tensor((S,), Int32)
            w = cute.make_rmem_tensor((S,), Float32)
            dot = cute.make_rmem_tensor((S,), Float32)
            for j in cutlass.range_constexpr(S):
                src[j] = Int32(-1)
                w[j] = Float32(1.0)
                dot[j] = Float32(0.0)
                if active:
                    src[j] = mScatter[tok, j]
                    if const_expr(self.weighted):
                        w[j] = mW[tok, j]
            dfrag = cute.make_rmem_tensor((vec, tl.iters), self.dtype)  # d_out[t]
            yfrag = cute.make_rmem_tensor((vec, tl.iters, S), self.dtype)  # the slots' rows
            res = cute.make_rmem_tensor((vec, tl.iters), self.dtype)
            for c in cutlass.range(tl.chunks, unroll=1):
                base = c * (tl.tpr * tl.iters) + lane
                dfrag.fill(0)
                yfrag.fill(0)
                if active:
                    load_chunk(ld, row_vectors(mDOut, tok, vec), dfrag, base, tl)
                    if const_expr(self.weighted):  # unweighted: the weights have no gradient, y is not read
                        for j in cutlass.range_constexpr(S):
                            if src[j] >= 0:
                                load_chunk(ld, row_vectors(mY, src[j], vec), yfrag[None, None, j], base, tl)
                for j in cutlass.range_constexpr(S):
                    for i in cutlass.range_constexpr(tl.iters):
                        d = dfrag[None, i].load().to(Float32)
                        if const_expr(self.weighted):
                            dot[j] = dot[j] + (d * yfrag[None, i, j].load().to(Float32)).reduce(
                                cute.ReductionOp.ADD, Float32(0.0), reduction_profile=0)
                        res[None, i].store((d * w[j]).to(self.dtype))
                    if active and src[j] >= 0:
                        store_chunk(st, res, row_vectors(mDY, src[j], vec), base, tl)
            for j in cutlass.range_constexpr(S):
                total = cute.arch.warp_reduction(dot[j], operator.add, threads_in_group=tl.tpr)
                if src[j] < 0 or const_expr(not self.weighted):  # a dropped slot, or unweighted: no gradient
                    total = Float32(0.0)
                if active and lane == 0:
                    mDW[tok, j] = total
        else:
            if const_expr(self.zero_empty):  # rows no slot points at: zero gradient
                row = (bidx - token_ctas) * tl.rows_per_cta + group
                if row < mDY.shape[0]:
                    if mGather[row] == -1:
                        zero = cute.make_rmem_tensor((vec, tl.iters), self.dtype)
                        zero.fill(0)
                        gRow = row_vectors(mDY, row, vec)
                        for c in cutlass.range(tl.chunks, unroll=1):
                            store_chunk(st, zero, gRow, c * (tl.tpr * tl.iters) + lane, tl)


class RouteBackward:
    """``d_logits`` of a top-k router's weights (see the module doc).

    A token's row is spread over a lane group like the forward router's (``LaneLayout``): G lanes
    (a power of two, up to a warp) of V consecutive experts each, loaded and stored as vectors of
    W elements (16 bytes at E 256 bf16), so the row is read once and written once in wide
    accesses. The k selected logits come from their owner lanes by a shuffle, not a second read."""

    def __init__(self, dtype, E: int, k: int, *, weight: str = "prob", renormalize: bool = False,
                 temperature: float = 1.0, scaling: float = 1.0, score: str = "logit", threads: int = 256,
                 max_per_lane: int = 0, **_selection_only):
        assert weight in WEIGHTS and 1 <= k <= MAX_SLOTS
        self.dtype, self.E, self.k = dtype, E, k
        # experts per lane: by default the fewest a warp holds (one token per warp from E 32 up)
        self.lanes = LaneLayout.make(E, dtype.width // 8, 0, max_per_lane=max_per_lane or -(-E // 32))
        self.V = self.lanes.V
        self.Q = -(-k // self.lanes.G)  # slots per lane: slot q * G + g on lane g
        self.weight, self.renormalize = weight, renormalize
        self.temperature, self.scaling, self.score = float(temperature), float(scaling), score
        self.threads = max(threads, 32)

    @cute.jit
    def __call__(self, mLogits: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mDW: cute.Tensor,
                 mDLogits: cute.Tensor, max_ctas: Int32, stream: cuda.CUstream):
        groups = self.threads // self.lanes.G
        grid = cutlass.min(cute.ceil_div(mLogits.shape[0], groups), max_ctas)
        self.kernel(mLogits, mIds, mW, mDW, mDLogits).launch(grid=[grid, 1, 1], block=[self.threads, 1, 1],
                                                              stream=stream)

    @cute.jit
    def group_reduce(self, op: cutlass.Constexpr, x):
        return lane_group_reduce(op, x, self.lanes.G)

    @cute.jit
    def load_token(self, mLogits: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mDW: cute.Tensor, t: Int32,
                   base: Int32, g: Int32, atom, raw: cute.Tensor, ids: cute.Tensor, w: cute.Tensor, dw: cute.Tensor):
        """Token ``t``'s inputs into registers: this lane's experts of the row, and the slots it
        owns (slot ``q * G + g``; id -1 where there is none). Left as they are past the last token."""
        W, V, G = self.lanes.W, self.lanes.V, self.lanes.G
        if t < mLogits.shape[0]:
            gRow = cute.zipped_divide(mLogits[t, None], (W,))
            for i in cutlass.range_constexpr(V // W):
                if base + i * W < self.E:
                    cute.copy(atom, gRow[None, base // W + i], raw[None, i])
            for q in cutlass.range_constexpr(self.Q):
                j = q * G + g
                if j < self.k:
                    ids[q] = mIds[t, j]
                    w[q] = mW[t, j]
                    dw[q] = mDW[t, j]

    @cute.kernel
    def kernel(self, mLogits: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mDW: cute.Tensor,
               mDLogits: cute.Tensor):
        L = self.lanes
        E, Q, V, W, G = self.E, self.Q, L.V, L.W, L.G
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        nctas, _, _ = cute.arch.grid_dim()
        T = mLogits.shape[0]
        g = tidx % G
        base = g * V  # this lane's first expert
        groups = self.threads // G
        stride = nctas * groups  # tokens per step of the grid
        # one fp32 row of E per lane group: the selected experts' values are read from it, and
        # the k slots' gradients are scattered into it (no loop over V x k in registers)
        smem = cutlass.memory.SmemAllocator()
        sRows = smem.allocate_tensor(Float32, cute.make_layout((E, groups)), byte_alignment=16)
        sRow = sRows[None, tidx // G]
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), self.dtype, num_bits_per_copy=W * self.dtype.width)
        # the next token's inputs, loaded while this one is computed
        nraw = cute.make_rmem_tensor((W, V // W), self.dtype)
        nids = cute.make_rmem_tensor((Q,), Int32)
        nw = cute.make_rmem_tensor((Q,), Float32)
        ndw = cute.make_rmem_tensor((Q,), Float32)
        nraw.fill(0)
        for q in cutlass.range_constexpr(Q):
            nids[q] = Int32(-1)
            nw[q] = Float32(0.0)
            ndw[q] = Float32(0.0)
        raw = cute.make_rmem_tensor((W, V // W), self.dtype)
        ids = cute.make_rmem_tensor((Q,), Int32)
        w = cute.make_rmem_tensor((Q,), Float32)
        dw = cute.make_rmem_tensor((Q,), Float32)
        x = cute.make_rmem_tensor((W, V // W), Float32)  # flat index v = expert base + v
        res = cute.make_rmem_tensor((W, V // W), Float32)
        out = cute.make_rmem_tensor((W, V // W), self.dtype)
        t = bidx * groups + tidx // G
        self.load_token(mLogits, mIds, mW, mDW, t, base, g, atom, nraw, nids, nw, ndw)
        # every group runs the same number of steps (the warp syncs need whole warps); one past
        # the last token computes on stale registers and stores nothing
        for _step in cutlass.range(cute.ceil_div(T, stride), unroll=1):
            active = t < T
            raw.store(nraw.load())
            for q in cutlass.range_constexpr(Q):
                ids[q] = nids[q]
                w[q] = nw[q]
                dw[q] = ndw[q]
            self.load_token(mLogits, mIds, mW, mDW, t + stride, base, g, atom, nraw, nids, nw, ndw)
            self.token(raw, ids, w, dw, x, res, sRow, base)
            out.store(res.load().to(self.dtype))
            if active:
                gOut = cute.zipped_divide(mDLogits[t, None], (W,))
                for i in cutlass.range_constexpr(V // W):
                    if base + i * W < E:
                        cute.copy(atom, out[None, i], gOut[None, base // W + i])
            t = t + stride

    @cute.jit
    def row_store(self, sRow: cute.Tensor, vals: cute.Tensor, base: Int32):
        for v in cutlass.range_constexpr(self.lanes.V):
            if base + v < self.E:
                sRow[base + v] = vals[v]

    @cute.jit
    def slot_sum(self, vals: cute.Tensor, ids: cute.Tensor):
        """The sum over the token's k slots of ``vals`` (each lane holds its own slots)."""
        s = Float32(0.0)
        for q in cutlass.range_constexpr(self.Q):
            if ids[q] >= 0:
                s = s + vals[q]
        return self.group_reduce(operator.add, s)

    @cute.jit
    def token(self, raw: cute.Tensor, ids: cute.Tensor, w: cute.Tensor, dw: cute.Tensor, x: cute.Tensor,
              res: cute.Tensor, sRow: cute.Tensor, base: Int32):
        """One token's ``d_logits`` (this lane's experts, fp32) into ``res``. The slot work runs
        once per slot, on the lane that owns it, with sums over the slots as group reductions."""
        E, Q, V = self.E, self.Q, self.lanes.V
        prob = const_expr(self.weight == "prob")
        x.store(raw.load().to(Float32))
        for v in cutlass.range_constexpr(V):
            if base + v >= E:
                x[v] = -Float32.inf
        inv_sum = Float32(1.0)
        if const_expr(prob):  # res = exp(x - max); the softmax is res * inv_sum
            m = x[0]
            for v in cutlass.range_constexpr(1, V):
                m = cute.arch.fmax(m, x[v])
            row_max = self.group_reduce(cute.arch.fmax, m)
            s = Float32(0.0)
            for v in cutlass.range_constexpr(V):  # ex2.approx, as the forward router: within 1e-5
                res[v] = cute.math.exp2((x[v] - row_max) * Float32(_LOG2E), fastmath=True)
                s = s + res[v]
            inv_sum = Float32(1.0) / self.group_reduce(operator.add, s)
        # the selected experts' values (the softmax's numerator, or the logit) through the row
        cute.arch.sync_warp()  # the last token's readers are done with the row
        if const_expr(prob):
            self.row_store(sRow, res, base)
        elif const_expr(self.weight != "one"):
            self.row_store(sRow, x, base)
        cute.arch.sync_warp()
        r = cute.make_rmem_tensor((Q,), Float32)  # the raw weights before renormalise / scaling
        dr = cute.make_rmem_tensor((Q,), Float32)
        xs = cute.make_rmem_tensor((Q,), Float32)
        tmp = cute.make_rmem_tensor((Q,), Float32)
        for q in cutlass.range_constexpr(Q):
            xs[q] = Float32(0.0)
            if const_expr(self.weight != "one"):
                if ids[q] >= 0:
                    xs[q] = sRow[ids[q]]
        carries = Float32(1.0)  # sum_k: does the sum carry gradient (not clamped to a constant)?
        if const_expr(prob):
            for q in cutlass.range_constexpr(Q):
                r[q] = xs[q] * inv_sum
        elif const_expr(self.weight == "score"):
            for q in cutlass.range_constexpr(Q):
                r[q] = Float32(1.0) / (Float32(1.0) + cute.math.exp(-xs[q]))
        elif const_expr(self.weight == "softmax_k"):
            mk = -Float32.inf
            for q in cutlass.range_constexpr(Q):
                xs[q] = xs[q] / Float32(self.temperature)
                if ids[q] >= 0:
                    mk = cute.arch.fmax(mk, xs[q])
            mk = self.group_reduce(cute.arch.fmax, mk)
            for q in cutlass.range_constexpr(Q):
                r[q] = cute.math.exp(xs[q] - mk)
            tot = self.slot_sum(r, ids)
            for q in cutlass.range_constexpr(Q):
                r[q] = r[q] / tot
        elif const_expr(self.weight == "sum_k"):
            for q in cutlass.range_constexpr(Q):
                xs[q] = xs[q] / Float32(self.temperature)
            tot = self.slot_sum(xs, ids)
            clamped = tot
            if tot >= Float32(0.0):
                clamped = cute.arch.fmax(tot, Float32(1e-20))
            inv_sum = Float32(1.0) / clamped
            if clamped != tot:
                carries = Float32(0.0)
            for q in cutlass.range_constexpr(Q):
                r[q] = xs[q] * inv_sum
        else:  # one
            for q in cutlass.range_constexpr(Q):
                r[q] = Float32(1.0)
        # -- d raw weights from d weights: renormalise over the k, then scale -----------------
        if const_expr(self.renormalize):
            tot = self.slot_sum(r, ids)
            for q in cutlass.range_constexpr(Q):
                tmp[q] = w[q] * dw[q]
            sw = self.slot_sum(tmp, ids)
            gs = Float32(self.scaling) / cute.arch.fmax(tot, Float32(1e-20))
            for q in cutlass.range_constexpr(Q):
                dr[q] = gs * (dw[q] - sw / Float32(self.scaling))
        else:
            for q in cutlass.range_constexpr(Q):
                dr[q] = dw[q] * Float32(self.scaling)
        c = Float32(0.0)
        if const_expr(self.weight in ("prob", "softmax_k", "sum_k")):
            for q in cutlass.range_constexpr(Q):
                tmp[q] = r[q] * dr[q]
            c = self.slot_sum(tmp, ids)
        if const_expr(self.weight == "sum_k"):
            c = c * carries  # zero where the sum was clamped (a constant)
        # -- d logits: each slot's term scattered into the zeroed row (a token's ids differ) --
        for v in cutlass.range_constexpr(V):
            x[v] = Float32(0.0)
        cute.arch.sync_warp()  # every lane has read the selected values
        self.row_store(sRow, x, base)
        cute.arch.sync_warp()
        if const_expr(self.weight != "one"):
            for q in cutlass.range_constexpr(Q):
                term = dr[q]  # prob: d = p * (sum of dr at the expert - c), the p applied below
                if const_expr(self.weight == "score"):
                    term = dr[q] * r[q] * (Float32(1.0) - r[q])
                elif const_expr(self.weight == "softmax_k"):
                    term = r[q] * (dr[q] - c) / Float32(self.temperature)
                elif const_expr(self.weight == "sum_k"):
                    term = (dr[q] - c) * inv_sum / Float32(self.temperature)
                if ids[q] >= 0:
                    sRow[ids[q]] = term
        cute.arch.sync_warp()
        for v in cutlass.range_constexpr(V):
            gv = Float32(0.0)
            if base + v < E:
                gv = sRow[base + v]
            if const_expr(prob):
                res[v] = res[v] * inv_sum * (gv - c)
            else:
                res[v] = gv


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

_cache = CompileCache()


def compile_combine_backward(dtype, H: int, S: int, weighted: bool, zero_empty: bool, **tune):
    key = ("combine_bwd", dtype, H, S, weighted, zero_empty, tuple(sorted(tune.items())))

    def build():
        T, R = cute.sym_int(), cute.sym_int()
        return cute.compile(CombineBackward(dtype, H, S, weighted=weighted, zero_empty=zero_empty, **tune),
                            fake_rows(dtype, T, H), fake_rows(dtype, R, H), fake_table(Int32, T, S),
                            fake_table(Float32, T, S), fake_vector(Int32, R), fake_rows(dtype, R, H),
                            fake_table(Float32, T, S), fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def compile_route_backward(dtype, E: int, k: int, **static):
    key = ("route_bwd", dtype, E, k, tuple(sorted(static.items())))

    def build():
        T = cute.sym_int()
        return cute.compile(RouteBackward(dtype, E, k, **static), fake_logits(dtype, T, E), fake_table(Int32, T, k),
                            fake_table(Float32, T, k), fake_table(Float32, T, k), fake_logits(dtype, T, E),
                            Int32(1), fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def combine_backward(d_out: torch.Tensor, y: torch.Tensor, scatter_idx: torch.Tensor, weights: torch.Tensor,
                     gather_idx: torch.Tensor, d_y: torch.Tensor, d_w: torch.Tensor, weighted: bool = True,
                     zero_empty: bool = False, **tune):
    """Launch on the current stream; writes ``d_y [R, H]`` and ``d_w [T, S]`` and returns them."""
    T, S = scatter_idx.shape
    H = y.shape[1]
    if T == 0:
        return d_y.zero_(), d_w
    dtype = TORCH_TO_CUTE[y.dtype]
    dst = d_y if rows_ok(d_y) else torch.empty_like(d_y, memory_format=torch.contiguous_format)
    dw = d_w if d_w.is_contiguous() and d_w.dtype == torch.float32 else torch.empty(T, S, device=d_w.device)
    compile_combine_backward(dtype, H, S, weighted, zero_empty, **tune)(
        as_rows(d_out), as_rows(y), as_table(scatter_idx, torch.int32), as_table(weights, torch.float32),
        as_table(gather_idx, torch.int32), dst, dw)
    if dst is not d_y:
        d_y.copy_(dst)
    if dw is not d_w:
        d_w.copy_(dw)
    return d_y, d_w


#: CTAs per SM of the route backward's grid-stride loop (0: one CTA per ``threads / G`` tokens)
ROUTE_BWD_CTAS_PER_SM = 4
_sm_count: dict = {}


def _max_ctas(device: torch.device, per_sm: int) -> int:
    if per_sm <= 0:
        return 2**31 - 1
    n = _sm_count.get(device)
    if n is None:
        n = _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n * per_sm


def route_backward(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, d_weights: torch.Tensor,
                   d_logits: torch.Tensor, ctas_per_sm: int = ROUTE_BWD_CTAS_PER_SM, **static) -> torch.Tensor:
    """Launch on the current stream; writes ``d_logits [T, E]`` (the logits' dtype) and returns it.
    The grid is at most ``ctas_per_sm`` CTAs per SM, each walking tokens a grid apart."""
    T, E = logits.shape
    k = ids.shape[1]
    if T == 0:
        return d_logits
    fn = compile_route_backward(TORCH_TO_CUTE[logits.dtype], E, k, **static)
    x = logits if logits.is_contiguous() and logits.data_ptr() % VEC_BYTES == 0 else logits.clone(
        memory_format=torch.contiguous_format)  # the row loads are vectors: a 16-byte aligned base
    ok = d_logits.is_contiguous() and d_logits.data_ptr() % VEC_BYTES == 0
    out = d_logits if ok else torch.empty_like(d_logits, memory_format=torch.contiguous_format)
    fn(x, as_table(ids, torch.int32), as_table(weights, torch.float32), as_table(d_weights, torch.float32), out,
       _max_ctas(logits.device, ctas_per_sm))
    if out is not d_logits:
        d_logits.copy_(out)
    return d_logits
