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
  weight formula (the selection has no gradient, nor the selection bias): one warp per token,
  experts interleaved over the lanes (expert ``e`` on lane ``e % 32``), fp32 arithmetic, one
  rounding to the logits' dtype. Weight kinds as the forward router (``kernels.router``):
  ``prob`` (softmax over all E at the selected experts), ``softmax_k`` / ``sum_k`` (over the
  selected logits / temperature), ``score`` (the selected sigmoid scores), ``one``; then
  ``renormalize`` over the k and ``scaling``.

Compiled once per static key, quack style; T and R are runtime values.
"""

from __future__ import annotations

import operator

import cuda.bindings.driver as cuda
import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.common import (
    COMPILE_OPTIONS,
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

#: most slots per token the kernels unroll over
MAX_SLOTS = 16
#: 128-bit loads a thread may have in flight per chunk (the slots' rows and d_out)
MAX_LOADS = 32
WEIGHTS = ("prob", "softmax_k", "sum_k", "score", "one")


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
    """``d_logits`` of a top-k router's weights (see the module doc): one warp per token."""

    def __init__(self, dtype, E: int, k: int, *, weight: str = "prob", renormalize: bool = False,
                 temperature: float = 1.0, scaling: float = 1.0, score: str = "logit", threads: int = 256,
                 **_selection_only):
        assert weight in WEIGHTS and 1 <= k <= MAX_SLOTS
        self.dtype, self.E, self.k = dtype, E, k
        self.V = -(-E // 32)  # experts per lane: expert e = v * 32 + lane
        self.weight, self.renormalize = weight, renormalize
        self.temperature, self.scaling, self.score = float(temperature), float(scaling), score
        self.threads = threads

    @cute.jit
    def __call__(self, mLogits: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mDW: cute.Tensor,
                 mDLogits: cute.Tensor, stream: cuda.CUstream):
        warps = self.threads // 32
        self.kernel(mLogits, mIds, mW, mDW, mDLogits).launch(
            grid=[cute.ceil_div(mLogits.shape[0], warps), 1, 1], block=[self.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mLogits: cute.Tensor, mIds: cute.Tensor, mW: cute.Tensor, mDW: cute.Tensor,
               mDLogits: cute.Tensor):
        E, k, V = self.E, self.k, self.V
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        lane = tidx % 32
        t = bidx * (self.threads // 32) + tidx // 32
        active = t < mLogits.shape[0]
        x = cute.make_rmem_tensor((V,), Float32)
        ids = cute.make_rmem_tensor((k,), Int32)
        w = cute.make_rmem_tensor((k,), Float32)
        dw = cute.make_rmem_tensor((k,), Float32)
        r = cute.make_rmem_tensor((k,), Float32)  # the raw weights before renormalise / scaling
        dr = cute.make_rmem_tensor((k,), Float32)
        for j in cutlass.range_constexpr(k):
            ids[j] = Int32(0)
            w[j] = Float32(0.0)
            dw[j] = Float32(0.0)
            if active:
                ids[j] = mIds[t, j]
                w[j] = mW[t, j]
                dw[j] = mDW[t, j]
        for v in cutlass.range_constexpr(V):
            x[v] = -Float32.inf
            if active and v * 32 + lane < E:
                x[v] = mLogits[t, v * 32 + lane].to(Float32)
        xs = cute.make_rmem_tensor((k,), Float32)  # the selected logits (each lane loads them: L1)
        for j in cutlass.range_constexpr(k):
            xs[j] = Float32(0.0)
            if active:
                xs[j] = mLogits[t, ids[j]].to(Float32)
        row_max = Float32(0.0)
        inv_sum = Float32(1.0)
        carries = Float32(1.0)  # sum_k: does the sum carry gradient (not clamped to a constant)?
        if const_expr(self.weight == "prob"):
            m = x[0]
            for v in cutlass.range_constexpr(1, V):
                m = cute.arch.fmax(m, x[v])
            row_max = cute.arch.warp_reduction(m, cute.arch.fmax)
            s = Float32(0.0)
            for v in cutlass.range_constexpr(V):
                s = s + cute.math.exp(x[v] - row_max)
            inv_sum = Float32(1.0) / cute.arch.warp_reduction(s, operator.add)
            for j in cutlass.range_constexpr(k):
                r[j] = cute.math.exp(xs[j] - row_max) * inv_sum
        elif const_expr(self.weight == "score"):
            for j in cutlass.range_constexpr(k):
                r[j] = Float32(1.0) / (Float32(1.0) + cute.math.exp(-xs[j]))
        elif const_expr(self.weight in ("softmax_k", "sum_k")):
            for j in cutlass.range_constexpr(k):
                xs[j] = xs[j] / Float32(self.temperature)
            if const_expr(self.weight == "softmax_k"):
                mk = xs[0]
                for j in cutlass.range_constexpr(1, k):
                    mk = cute.arch.fmax(mk, xs[j])
                tot = Float32(0.0)
                for j in cutlass.range_constexpr(k):
                    r[j] = cute.math.exp(xs[j] - mk)
                    tot = tot + r[j]
                for j in cutlass.range_constexpr(k):
                    r[j] = r[j] / tot
            else:
                tot = Float32(0.0)
                for j in cutlass.range_constexpr(k):
                    tot = tot + xs[j]
                clamped = tot
                if tot >= Float32(0.0):
                    clamped = cute.arch.fmax(tot, Float32(1e-20))
                inv_sum = Float32(1.0) / clamped
                if clamped != tot:
                    carries = Float32(0.0)
                for j in cutlass.range_constexpr(k):
                    r[j] = xs[j] * inv_sum
        else:  # one
            for j in cutlass.range_constexpr(k):
                r[j] = Float32(1.0)
        # -- d raw weights from d weights: renormalise over the k, then scale -----------------
        if const_expr(self.renormalize):
            tot = Float32(0.0)
            sw = Float32(0.0)
            for j in cutlass.range_constexpr(k):
                tot = tot + r[j]
                sw = sw + w[j] * dw[j]
            g = Float32(self.scaling) / cute.arch.fmax(tot, Float32(1e-20))
            for j in cutlass.range_constexpr(k):
                dr[j] = g * (dw[j] - sw / Float32(self.scaling))
        else:
            for j in cutlass.range_constexpr(k):
                dr[j] = dw[j] * Float32(self.scaling)
        # -- d logits ---------------------------------------------------------------------------
        c = Float32(0.0)
        if const_expr(self.weight in ("prob", "softmax_k")):
            for j in cutlass.range_constexpr(k):
                c = c + r[j] * dr[j]
        if const_expr(self.weight == "sum_k"):
            for j in cutlass.range_constexpr(k):
                c = c + r[j] * dr[j]
            c = c * carries  # zero where the sum was clamped (a constant)
        for v in cutlass.range_constexpr(V):
            e = v * 32 + lane
            d = Float32(0.0)
            if const_expr(self.weight == "prob"):
                G = Float32(0.0)
                for j in cutlass.range_constexpr(k):
                    if ids[j] == e:
                        G = G + dr[j]
                d = cute.math.exp(x[v] - row_max) * inv_sum * (G - c)
            elif const_expr(self.weight != "one"):
                for j in cutlass.range_constexpr(k):
                    if ids[j] == e:
                        if const_expr(self.weight == "score"):
                            d = d + dr[j] * r[j] * (Float32(1.0) - r[j])
                        elif const_expr(self.weight == "softmax_k"):
                            d = d + r[j] * (dr[j] - c) / Float32(self.temperature)
                        else:  # sum_k
                            d = d + (dr[j] - c) * inv_sum / Float32(self.temperature)
            if active and e < E:
                mDLogits[t, e] = d.to(self.dtype)


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
        logits = cute.runtime.make_fake_tensor(dtype, (T, E), stride=(E, 1), assumed_align=4)
        return cute.compile(RouteBackward(dtype, E, k, **static), logits, fake_table(Int32, T, k),
                            fake_table(Float32, T, k), fake_table(Float32, T, k),
                            cute.runtime.make_fake_tensor(dtype, (T, E), stride=(E, 1), assumed_align=4),
                            fake_stream(), options=COMPILE_OPTIONS)

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


def route_backward(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, d_weights: torch.Tensor,
                   d_logits: torch.Tensor, **static) -> torch.Tensor:
    """Launch on the current stream; writes ``d_logits [T, E]`` (the logits' dtype) and returns it."""
    T, E = logits.shape
    k = ids.shape[1]
    if T == 0:
        return d_logits
    fn = compile_route_backward(TORCH_TO_CUTE[logits.dtype], E, k, **static)
    x = logits if logits.is_contiguous() else logits.contiguous()
    out = d_logits if d_logits.is_contiguous() else torch.empty_like(d_logits, memory_format=torch.contiguous_format)
    fn(x, as_table(ids, torch.int32), as_table(weights, torch.float32), as_table(d_weights, torch.float32), out)
    if out is not d_logits:
        d_logits.copy_(out)
    return d_logits
