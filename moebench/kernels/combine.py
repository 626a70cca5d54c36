"""Combine: packed rows ``y [R, H]`` back to token order ``out [T, H]`` (``routing.combine``).

``out[t] = sum_j w[t, j] * y[scatter_idx[t, j]]`` over the slots with ``scatter_idx >= 0``
(``w = 1`` when not ``weighted``), accumulated in fp32 and rounded once to ``y``'s dtype.

One row group per token (:class:`Combine`): it reads the token's ``S`` destination rows and
weights, then walks the hidden dimension in chunks; per chunk each thread issues the loads
of all ``S`` rows (``S * iters`` independent 128-bit loads in flight), then sums them slot by
slot in slot order and stores one 128-bit vector per step. Each output row is owned by
one row group, so there are no atomics and the result is deterministic. Dropped or unused
slots (-1) are never read: their fragment stays zero.

Decode (a few tokens): the row loads wait for the indices, two memory round trips in a row.
Where all of ``y`` is small (``prefetch_rows``), the CTAs first prefetch it into the L2
(``cp.async.bulk.prefetch``, each packed row's column share by one thread of one CTA, every row
once over the grid), so the index loads and the rows' trip from memory overlap and the row
loads find the L2.

Fewer packed rows than that (``stage_rows``, at most STAGE_ROWS: one or two tokens) are
*staged*: each thread copies its columns of every packed row into shared memory
(``cp.async``, issued with the index loads), then reads its slots' rows there: the index and
row trips from memory overlap, and what follows the indices is a shared-memory read, not an
L2 round trip.

Compiled once per (dtype, H, S, weighted, tiling, cache hints); T and R are runtime values.
Measured on an H200 (notes/kernels.md): 94-103 % of a same-call device copy.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.common import (
    COMPILE_OPTIONS,
    SPLIT_CTAS,
    TORCH_TO_CUTE,
    VEC_BYTES,
    CompileCache,
    RowTiling,
    as_rows,
    as_table,
    chunk_range,
    col_splits,
    fake_rows,
    fake_stream,
    fake_table,
    few_ctas_tune,
    load_atom,
    load_chunk,
    prefetch_l2,
    row_vectors,
    rows_ok,
    store_atom,
    store_chunk,
    vec_elems,
)

#: most slots per token the kernel unrolls over
MAX_SLOTS = 16
#: target for the 128-bit loads a thread has in flight per chunk (S * iters)...
LOADS_IN_FLIGHT = 16
#: ... and the most it may have (their fragments must fit in registers)
MAX_LOADS = 32
#: y of at most this many bytes is prefetched into the L2 as the kernel starts (impl.prefetch_mb;
#: 0: never): decode sizes, far below the L2 (50 MB on an H100 / H200)
PREFETCH_BYTES = 8 << 20
#: y of at most this many rows (impl.stage_rows; 0: never) is staged whole: each thread copies its
#: columns of every packed row into shared memory (cp.async) while the indices load, then reads
#: its slots' rows there (a token at k 8, two at k 4: T 1 and 2 of the decode presets)
STAGE_ROWS = 8
#: ... where they fit this much shared memory a CTA (no opt-in to more)
STAGE_BYTES = 48 * 1024


def stage_bytes(tiling: RowTiling, rows: int) -> int:
    """Shared memory of ``rows`` staged packed rows: each thread's vectors of each row."""
    return rows * tiling.threads * tiling.iters * VEC_BYTES


class Combine:
    """Gate-weighted (or plain) sum of each token's packed rows, fp32 accumulation."""

    def __init__(self, dtype, H: int, S: int, *, weighted: bool = True, threads: int = 256,
                 max_iters: int = 0, tpr: int = 0, hint: str = "none", prefetch_rows: int = 0,
                 stage_rows: int = 0):
        assert 1 <= S <= MAX_SLOTS
        self.dtype = dtype
        self.vec = vec_elems(dtype)
        assert H % self.vec == 0, f"H={H} is not a multiple of {self.vec} elements"
        self.S = S
        self.weighted = weighted
        # S * iters fragments of 16 bytes live in registers: past MAX_LOADS they spill
        # (measured: max_iters=8 at S=8 ran 20x slower)
        max_iters = min(max_iters if max_iters > 0 else LOADS_IN_FLIGHT // S, MAX_LOADS // S)
        max_iters = max(1, max_iters)
        self.tiling = RowTiling.make(H // self.vec, max_iters, threads, tpr)
        self.hint = hint
        self.prefetch_rows = prefetch_rows  # y of at most this many rows is prefetched (0: never)
        # y of at most this many rows (runtime R <= stage_rows, the host's choice) staged whole in
        # shared memory, [vec, threads, iters, stage_rows]: a thread's vectors of row r in slot r
        self.stage_rows = stage_rows
        self.smem_bytes = stage_bytes(self.tiling, stage_rows)
        assert self.smem_bytes <= STAGE_BYTES and not (stage_rows and prefetch_rows)

    @cute.jit
    def __call__(self, mY: cute.Tensor, mScatter: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor, splits: Int32,
                 stream: cuda.CUstream):
        assert mY.element_type == self.dtype and mOut.element_type == self.dtype
        tl = self.tiling
        self.kernel(mY, mScatter, mW, mOut).launch(
            grid=[cute.ceil_div(mOut.shape[0], tl.rows_per_cta), splits, 1], block=[tl.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mY: cute.Tensor, mScatter: cute.Tensor, mW: cute.Tensor, mOut: cute.Tensor):
        tl, S, vec = self.tiling, self.S, self.vec
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        tok = bidx * tl.rows_per_cta + tidx // tl.tpr  # this row group's token
        lane = tidx % tl.tpr
        ld, st = load_atom(self.dtype, self.hint), store_atom(self.dtype, self.hint)
        lo, hi = chunk_range(tl)  # all the chunks, or this CTA's share (column splits)
        if const_expr(self.prefetch_rows > 0):
            R = mY.shape[0]
            if R <= self.prefetch_rows:  # rows bidx, bidx + gridDim.x, ..., this CTA's columns
                nx, _, _ = cute.arch.grid_dim()
                v0 = lo * (tl.tpr * tl.iters)
                nbytes = (cutlass.min(hi * (tl.tpr * tl.iters), tl.nvec) - v0) * VEC_BYTES
                for r in cutlass.range(bidx + tidx * nx, R, tl.threads * nx, unroll=1):
                    prefetch_l2(mY, r, v0 * vec, nbytes)
        if const_expr(self.stage_rows > 0):
            smem = cutlass.memory.SmemAllocator()
            sY = smem.allocate_tensor(self.dtype, cute.make_layout((vec, tl.threads, tl.iters, self.stage_rows)),
                                      byte_alignment=16)
            g2s = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(cache_mode=cute.nvgpu.LoadCacheMode.GLOBAL),
                                      self.dtype, num_bits_per_copy=128)
        if tok < mOut.shape[0]:
            if const_expr(self.stage_rows > 0):  # the first chunk's rows, in flight with the indices
                self.stage(mY, sY, g2s, lo * (tl.tpr * tl.iters) + lane, tidx)
            # the token's packed rows and gate weights (4-byte loads; the threads of a row
            # group read the same words, one transaction per warp)
            src = cute.make_rmem_tensor((S,), Int32)
            w = cute.make_rmem_tensor((S,), Float32)
            for j in cutlass.range_constexpr(S):
                src[j] = mScatter[tok, j]
                if const_expr(self.weighted):
                    w[j] = mW[tok, j]
            gOut = row_vectors(mOut, tok, vec)
            frag = cute.make_rmem_tensor((vec, tl.iters, S), self.dtype)  # loaded rows
            res = cute.make_rmem_tensor((vec, tl.iters), self.dtype)  # rounded sums
            for c in cutlass.range(lo, hi, unroll=1):
                base = c * (tl.tpr * tl.iters) + lane
                # 1. issue every load of the chunk, S rows x iters vectors; dropped or
                #    unused slots are not read and keep a zero fragment
                frag.fill(0)
                if const_expr(self.stage_rows > 0):
                    if c != lo:
                        self.stage(mY, sY, g2s, base, tidx)
                    cute.arch.cp_async_wait_group(0)  # this thread's own copies: no barrier
                    for j in cutlass.range_constexpr(S):
                        if src[j] >= 0:
                            frag[None, None, j].store(sY[None, tidx, None, src[j]].load())
                else:
                    for j in cutlass.range_constexpr(S):
                        if src[j] >= 0:
                            load_chunk(ld, row_vectors(mY, src[j], vec), frag[None, None, j], base, tl)
                # 2. sum in slot order in fp32, round once to the dtype, store
                for i in cutlass.range_constexpr(tl.iters):
                    acc = cute.zeros_like(frag[None, i, 0].load(), Float32)
                    for j in cutlass.range_constexpr(S):
                        v = frag[None, i, j].load().to(Float32)
                        if const_expr(self.weighted):
                            acc = acc + v * w[j]
                        else:
                            acc = acc + v
                    res[None, i].store(acc.to(self.dtype))
                store_chunk(st, res, gOut, base, tl)

    @cute.jit
    def stage(self, mY: cute.Tensor, sY: cute.Tensor, g2s: cute.CopyAtom, base: Int32, tidx: Int32):
        """Copy this thread's vectors of a chunk (first column ``base``) of every packed row
        (``R <= stage_rows``) into its slots of ``sY`` (``cp.async``, committed, not waited for)."""
        for r in cutlass.range_constexpr(self.stage_rows):
            if r < mY.shape[0]:
                load_chunk(g2s, row_vectors(mY, r, self.vec), sY[None, tidx, None, r], base, self.tiling)
        cute.arch.cp_async_commit_group()


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

_cache = CompileCache()


def compile_combine(dtype, H: int, S: int, weighted: bool, **tune):
    """The compiled combine for ``dtype`` (a CuTeDSL type), ``H`` and ``S`` slots."""
    key = ("combine", dtype, H, S, weighted, tuple(sorted(tune.items())))

    def build():
        T, R = cute.sym_int(), cute.sym_int()
        return cute.compile(Combine(dtype, H, S, weighted=weighted, **tune), fake_rows(dtype, R, H),
                            fake_table(Int32, T, S), fake_table(Float32, T, S), fake_rows(dtype, T, H), Int32(1),
                            fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


_tilings: dict = {}


def combine_tiling(dtype, H: int, S: int, prefetch_rows: int = 0, stage_rows: int = 0, **tune) -> RowTiling:
    """The row tiling of the compiled combine of this static key (for the host's grid; the
    prefetch and the staging do not change it)."""
    key = (dtype, H, S, tuple(sorted(tune.items())))
    t = _tilings.get(key)
    if t is None:
        t = _tilings[key] = Combine(dtype, H, S, **tune).tiling
    return t


def combine_tune(dtype, H: int, S: int, T: int, R: int, prefetch_bytes: int = PREFETCH_BYTES,
                 stage_rows: int = STAGE_ROWS, **tune) -> dict:
    """The combine kernel's static keywords for ``T`` tokens and ``R`` packed rows of ``H``
    elements of ``dtype``: one vector per thread in a grid of fewer than FEW_CTAS CTAs; y staged
    whole in shared memory where ``R <= stage_rows`` (0: never) and it fits, else the L2
    prefetch where the ``R`` rows total at most ``prefetch_bytes`` (0: never)."""
    tune = few_ctas_tune(tune, combine_tiling(dtype, H, S, **tune).grid(T))
    row_bytes = H * dtype.width // 8
    tiling = combine_tiling(dtype, H, S, **tune)
    if 0 < R <= stage_rows and stage_bytes(tiling, stage_rows) <= STAGE_BYTES:
        return {**tune, "stage_rows": stage_rows}
    if 0 < R * row_bytes <= prefetch_bytes:
        tune = {**tune, "prefetch_rows": prefetch_bytes // row_bytes}
    return tune


def combine(y: torch.Tensor, scatter_idx: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
            weighted: bool = True, split_ctas: int = SPLIT_CTAS, prefetch_bytes: int = PREFETCH_BYTES,
            stage_rows: int = STAGE_ROWS, **tune) -> torch.Tensor:
    """Launch the combine on the current stream; writes ``out [T, H]`` and returns it. A grid of
    fewer than ``split_ctas`` CTAs is split along the rows (``common.col_splits``; 0: never), one
    of fewer than ``common.FEW_CTAS`` moves one vector per thread per chunk; a ``y`` of at most
    ``stage_rows`` rows is staged in shared memory, else one of at most ``prefetch_bytes`` is
    prefetched into the L2 (the kernel with ``prefetch_rows``).

    The caller has checked dtype, H and S (see ``moebench.impls.cute_impl``)."""
    T, S = scatter_idx.shape
    H = out.shape[1]
    if T == 0:
        return out
    if y.shape[0] == 0:  # no packed rows: every slot is dropped
        return out.zero_()
    dtype = TORCH_TO_CUTE[y.dtype]
    y = as_rows(y)
    dst = out if rows_ok(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
    tune = combine_tune(dtype, H, S, T, y.shape[0], prefetch_bytes, stage_rows, **tune)
    tiling = combine_tiling(dtype, H, S, **tune)
    splits = col_splits(tiling, tiling.grid(T), split_ctas)
    compile_combine(dtype, H, S, weighted, **tune)(
        y, as_table(scatter_idx, torch.int32), as_table(weights, torch.float32), dst, splits)
    if dst is not out:
        out.copy_(dst)
    return out
