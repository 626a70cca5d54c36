"""Pack: tokens ``x [T, H]`` to expert-contiguous rows ``out [R, H]`` (``routing.pack``).

Row ``r`` of the output is ``x[gather_idx[r]]``, or zeros where ``gather_idx[r] == -1``
(rows no token fills: the tail under a capacity, the padding of ``pad_to_capacity``).
Two formulations, both pure data movement with 128-bit accesses:

``gather``  (:class:`PackGather`)  one row group per *packed row*: read ``gather_idx[r]``,
            copy that token's row, or write zeros. Every packed row is written exactly
            once, empty rows included. Reads ``x`` once per slot (``R * H``): a token's
            ``k`` copies sit in different expert blocks, far apart in time, so the L2
            rarely serves the repeats.
``scatter`` (:class:`PackScatter`) walks the *tokens* in order and writes ``x[t]`` to each
            row ``scatter_idx[t, j] >= 0``, either one row group per token (one load,
            ``S`` stores) or one per (token, slot) pair (a copy's one load, one store;
            the pairs of a token share a CTA, so memory still reads ``x[t]`` once). Moves
            exactly the strict bytes (``T * H`` read, ``R * H`` written). It cannot see
            empty rows, so when the metadata may have some (``zero_empty``) each CTA
            also zeroes the rows that hold -1 in its slice of the packed rows
            (``common.ZERO_ROWS_PER_GROUP``: one launch, no CTA that only reads indices).

Both are compiled once per static configuration (dtype, H, S, tiling, cache hints); the
token and row counts are runtime values. Measured on an H200 (notes/kernels.md): scatter
86-89 % of a same-call device copy, gather 55-70 %.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import torch

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr

from moebench.kernels.common import (
    COMPILE_OPTIONS,
    FEW_CTAS,
    SPLIT_CTAS,
    TORCH_TO_CUTE,
    CompileCache,
    RowTiling,
    as_rows,
    as_table,
    chunk_range,
    col_splits,
    empty_rows,
    fake_rows,
    fake_stream,
    fake_table,
    fake_vector,
    few_ctas_tune,
    issued,
    load_atom,
    load_chunk,
    probe_empty_row,
    row_vectors,
    rows_ok,
    store_atom,
    store_chunk,
    vec_elems,
    zero_grid,
    zero_rows_per_group,
)

MODES = ("gather", "scatter")
#: most slots the scatter kernel unrolls over (the gather kernel does not depend on S)
MAX_SLOTS = 16
#: vectors a thread keeps in flight per chunk: the smallest exact split of its share of a
#: row with at least MIN_ITERS, at most MAX_ITERS. H200 (notes/kernels.md): at seed 2 x 2
#: beat 1 x 4 by ~1.7 %; at deepseek_v3 1 x 7 beat 7 x 1 by 1-4 %.
MIN_ITERS, MAX_ITERS = 2, 8
#: rows at least this long scatter per (token, slot); shorter ones per token (H200: +1 to
#: +2 % at seed's 8 KB and deepseek_v3's 14 KB rows, -1 % at qwen3_30b_a3b's 4 KB rows)
PER_SLOT_MIN_ROW_BYTES = 8192


class PackGather:
    """``out[r] = x[gather_idx[r]]`` (zeros for -1): one row group per packed row."""

    def __init__(self, dtype, H: int, *, threads: int = 256, max_iters: int = MAX_ITERS, tpr: int = 0,
                 hint: str = "none"):
        self.dtype = dtype
        self.vec = vec_elems(dtype)
        assert H % self.vec == 0, f"H={H} is not a multiple of {self.vec} elements"
        self.tiling = RowTiling.make(H // self.vec, max_iters, threads, tpr, min_iters=MIN_ITERS)
        self.hint = hint

    @cute.jit
    def __call__(self, mX: cute.Tensor, mGather: cute.Tensor, mOut: cute.Tensor, splits: Int32,
                 stream: cuda.CUstream):
        assert mX.element_type == self.dtype and mOut.element_type == self.dtype
        tl = self.tiling
        self.kernel(mX, mGather, mOut).launch(
            grid=[cute.ceil_div(mOut.shape[0], tl.rows_per_cta), splits, 1], block=[tl.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mGather: cute.Tensor, mOut: cute.Tensor):
        tl = self.tiling
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        row = bidx * tl.rows_per_cta + tidx // tl.tpr  # this row group's packed row
        lane = tidx % tl.tpr
        ld, st = load_atom(self.dtype, self.hint), store_atom(self.dtype, self.hint)
        frag = cute.make_rmem_tensor((self.vec, tl.iters), self.dtype)
        lo, hi = chunk_range(tl)  # all the chunks, or this CTA's share (column splits)
        if row < mOut.shape[0]:
            src = mGather[row]
            gOut = row_vectors(mOut, row, self.vec)
            if src >= 0:
                gX = row_vectors(mX, src, self.vec)
                for c in cutlass.range(lo, hi, unroll=1):
                    base = c * (tl.tpr * tl.iters) + lane
                    load_chunk(ld, gX, frag, base, tl)
                    store_chunk(st, frag, gOut, base, tl)
            else:  # an empty row (capacity tail / padding)
                frag.fill(0)
                for c in cutlass.range(lo, hi, unroll=1):
                    store_chunk(st, frag, gOut, c * (tl.tpr * tl.iters) + lane, tl)


class PackScatter:
    """``out[scatter_idx[t, j]] = x[t]`` for kept slots, in token order so ``x`` is read from
    memory once. With ``zero_empty`` every CTA also zeroes the rows whose ``gather_idx`` is -1
    in its slice of the packed rows (``common.zero_grid``: the grid is the token CTAs, more
    only when R is large against T).

    ``per_slot=False``: one row group per token loads ``x[t]`` once and stores it ``S``
    times. ``per_slot=True``: one row group per (token, slot) pair, one load and one store
    per vector like a copy; the ``S`` row groups of a token sit side by side in a CTA, so
    the repeated loads of ``x[t]`` are served by L1/L2, not memory."""

    def __init__(self, dtype, H: int, S: int, *, zero_empty: bool = False, per_slot: bool = False,
                 threads: int = 256, max_iters: int = MAX_ITERS, tpr: int = 0, hint: str = "none"):
        assert 1 <= S <= MAX_SLOTS
        self.dtype = dtype
        self.vec = vec_elems(dtype)
        assert H % self.vec == 0, f"H={H} is not a multiple of {self.vec} elements"
        self.S = S
        self.zero_empty = zero_empty
        self.per_slot = per_slot
        self.tiling = RowTiling.make(H // self.vec, max_iters, threads, tpr, min_iters=MIN_ITERS)
        self.hint = hint

    @cute.jit
    def __call__(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mOut: cute.Tensor,
                 splits: Int32, stream: cuda.CUstream):
        assert mX.element_type == self.dtype and mOut.element_type == self.dtype
        tl = self.tiling
        work = mX.shape[0] * self.S if const_expr(self.per_slot) else mX.shape[0]  # row groups' items
        token_ctas = cute.ceil_div(work, tl.rows_per_cta)
        grid, zslice = token_ctas, Int32(0)
        if const_expr(self.zero_empty):
            grid, zslice = zero_grid(token_ctas, mOut.shape[0], tl.rows_per_cta, tl.tpr)
        self.kernel(mX, mScatter, mGather, mOut, token_ctas, zslice).launch(
            grid=[grid, splits, 1], block=[tl.threads, 1, 1], stream=stream)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mOut: cute.Tensor,
               token_ctas: Int32, zslice: Int32):
        tl = self.tiling
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        group = tidx // tl.tpr
        lane = tidx % tl.tpr
        ld, st = load_atom(self.dtype, self.hint), store_atom(self.dtype, self.hint)
        frag = cute.make_rmem_tensor((self.vec, tl.iters), self.dtype)
        lo, hi = chunk_range(tl)  # all the chunks, or this CTA's share (column splits)
        probe = Int32(0)
        if const_expr(self.zero_empty):  # one of this row group's rows of the CTA's slice
            probe = probe_empty_row(mGather, bidx, zslice, group, lane, tl.rows_per_cta, tl.tpr)
        if bidx < token_ctas:
            if const_expr(self.per_slot):
                pair = bidx * tl.rows_per_cta + group  # (token, slot) = divmod(pair, S)
                if pair < mX.shape[0] * self.S:
                    tok = pair // self.S
                    gX = row_vectors(mX, tok, self.vec)
                    for c in cutlass.range(lo, hi, unroll=1):
                        base = c * (tl.tpr * tl.iters) + lane
                        load_chunk(ld, gX, frag, base, tl)
                        issued(frag)  # the row's loads, then its destination's: both in flight
                        dst = mScatter[tok, pair - tok * self.S]
                        if dst >= 0:
                            store_chunk(st, frag, row_vectors(mOut, dst, self.vec), base, tl)
            else:
                tok = bidx * tl.rows_per_cta + group
                if tok < mX.shape[0]:
                    dst = cute.make_rmem_tensor((self.S,), Int32)
                    gX = row_vectors(mX, tok, self.vec)
                    for c in cutlass.range(lo, hi, unroll=1):
                        base = c * (tl.tpr * tl.iters) + lane
                        load_chunk(ld, gX, frag, base, tl)
                        issued(frag)  # the row's loads, then the token's destination rows: all in flight
                        for j in cutlass.range_constexpr(self.S):
                            dst[j] = mScatter[tok, j]
                        for j in cutlass.range_constexpr(self.S):
                            if dst[j] >= 0:
                                store_chunk(st, frag, row_vectors(mOut, dst[j], self.vec), base, tl)
        if const_expr(self.zero_empty):  # the group's empty rows of the slice: capacity tail / padding
            empty = empty_rows(probe, mOut.shape[0], bidx, zslice, group, lane, tl.rows_per_cta, tl.tpr)
            frag.fill(0)
            for m in cutlass.range_constexpr(zero_rows_per_group(tl.tpr)):
                if ((empty >> m) & 1) != 0:
                    gOut = row_vectors(mOut, bidx * zslice + group + m * tl.rows_per_cta, self.vec)
                    for c in cutlass.range(lo, hi, unroll=1):
                        store_chunk(st, frag, gOut, c * (tl.tpr * tl.iters) + lane, tl)


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

_cache = CompileCache()


def compile_gather(dtype, H: int, **tune):
    """The compiled gather pack for ``dtype`` (a CuTeDSL type) and ``H``; rows are dynamic."""
    key = ("gather", dtype, H, tuple(sorted(tune.items())))

    def build():
        T, R = cute.sym_int(), cute.sym_int()
        return cute.compile(PackGather(dtype, H, **tune), fake_rows(dtype, T, H), fake_vector(Int32, R),
                            fake_rows(dtype, R, H), Int32(1), fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def compile_scatter(dtype, H: int, S: int, zero_empty: bool, **tune):
    """The compiled scatter pack for ``dtype``, ``H`` and ``S`` slots; T and R are dynamic."""
    key = ("scatter", dtype, H, S, zero_empty, tuple(sorted(tune.items())))

    def build():
        T, R = cute.sym_int(), cute.sym_int()
        return cute.compile(PackScatter(dtype, H, S, zero_empty=zero_empty, **tune), fake_rows(dtype, T, H),
                            fake_table(Int32, T, S), fake_vector(Int32, R), fake_rows(dtype, R, H), Int32(1),
                            fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def scatter_tuning(dtype, H: int, per_slot: bool | None = None, pairs: int | None = None) -> dict:
    """The scatter kernel's default: one row group per (token, slot) for rows of at least
    PER_SLOT_MIN_ROW_BYTES, and for shorter rows where the ``pairs`` (token, slot) pairs are
    fewer than FEW_CTAS (a decode batch: per token its grid would be a few CTAs); per token
    otherwise. H200, rotated (runs/sample/h200_s11, call 5: per token against
    ``impl.scatter_per_slot=true``): qwen3_30b_a3b_decode (4 KB rows) T 1 / 2 /
    16: 2.11 / 2.63 / 2.74 -> 2.02 / 2.04 / 2.22 us, gpt_oss_120b_decode (5.6 KB) 1.88 / 1.94 /
    2.04 -> 1.83 / 1.86 / 2.00; at T 128 (1024 and 512 pairs) per slot lost at gpt_oss (2.50 ->
    2.73), tied at qwen3."""
    if per_slot is None:
        per_slot = H * dtype.width // 8 >= PER_SLOT_MIN_ROW_BYTES or (pairs is not None and pairs < FEW_CTAS)
    return {"per_slot": per_slot}


_tilings: dict = {}


def pack_tiling(dtype, H: int, threads: int = 256, max_iters: int = MAX_ITERS, tpr: int = 0, **_) -> RowTiling:
    """The row tiling of both pack kernels for these tuning keywords (for the host's grid)."""
    key = (dtype, H, threads, max_iters, tpr)
    t = _tilings.get(key)
    if t is None:
        t = _tilings[key] = RowTiling.make(H // vec_elems(dtype), max_iters, threads, tpr, min_iters=MIN_ITERS)
    return t


def pack_tune(dtype, H: int, ctas: int, **tune) -> dict:
    """The pack's tuning keywords for a grid of ``ctas`` CTAs: one vector per thread per chunk
    (``common.few_ctas_tune``) where the grid is under FEW_CTAS and the default tiling gives a
    thread more than MIN_ITERS vectors. H200, rotated, T 1: deepseek_v3's 7 vectors 2.39 -> 2.15
    us, gpt_oss_120b's 3 2.02 -> 1.90; qwen3_30b_a3b's 2 lost (2.13 -> 2.39), so they stay."""
    if pack_tiling(dtype, H, **tune).iters <= MIN_ITERS:
        return tune
    return few_ctas_tune(tune, ctas)


def pack(x: torch.Tensor, gather_idx: torch.Tensor, scatter_idx: torch.Tensor, out: torch.Tensor,
         mode: str = "scatter", zero_empty: bool = True, split_ctas: int = SPLIT_CTAS, **tune) -> torch.Tensor:
    """Launch the pack on ``x``'s current stream; writes ``out [R, H]`` and returns it. A grid of
    fewer than ``split_ctas`` CTAs is split along the rows (``common.col_splits``; 0: never), and
    one of fewer than ``common.FEW_CTAS`` may move one vector per thread (:func:`pack_tune`).

    The caller has checked dtype, H and S (see ``moebench.impls.cute_impl``)."""
    T, H = x.shape
    R = out.shape[0]
    if R == 0:
        return out
    if T == 0:  # no tokens: every packed row is empty
        return out.zero_()
    dtype = TORCH_TO_CUTE[x.dtype]
    x = as_rows(x)
    dst = out if rows_ok(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
    gather_idx = as_table(gather_idx, torch.int32)
    tiling = pack_tiling(dtype, H, **tune)
    if mode == "gather":
        tune = pack_tune(dtype, H, tiling.grid(R), **tune)
        tiling = pack_tiling(dtype, H, **tune)
        splits = col_splits(tiling, tiling.grid(R), split_ctas)
        compile_gather(dtype, H, **tune)(x, gather_idx, dst, splits)
    elif mode == "scatter":
        scatter_idx = as_table(scatter_idx, torch.int32)
        S = scatter_idx.shape[1]
        ctas = tiling.grid(T * S if tune.get("per_slot") else T) + (tiling.grid(R) if zero_empty else 0)
        tune = pack_tune(dtype, H, ctas, **tune)  # the grid's CTAs do not depend on max_iters
        tiling = pack_tiling(dtype, H, **tune)
        splits = col_splits(tiling, ctas, split_ctas)
        compile_scatter(dtype, H, S, zero_empty, **tune)(x, scatter_idx, gather_idx, dst, splits)
    else:
        raise ValueError(f"pack mode={mode!r}; accepted: {', '.join(MODES)}")
    if dst is not out:
        out.copy_(dst)
    return out
