"""What the pack and combine kernels share: the row tiling, dtype maps, the compile cache,
fake tensors for shape-generic compilation, and the 16-byte copy atoms.

Row tiling
----------
Both kernels move whole rows of ``H`` elements between row-indexed tensors. A row is seen
as ``nvec = H / vec`` 16-byte vectors (``vec`` = 8 bf16/fp16 or 4 fp32 elements) and is
handled by ``tpr`` consecutive threads of a CTA (a "row group"): at step ``i`` thread
``lane`` moves vector ``lane + i * tpr``, so each step of a warp covers 512 contiguous bytes
(coalesced), and a thread has ``iters`` independent 16-byte accesses in flight before it
uses any of them. A row longer than ``tpr * iters`` vectors is walked in ``chunks``; the
last chunk is predicated when the row does not divide evenly.

A CTA of ``threads`` threads holds ``threads / tpr`` row groups, i.e. that many rows; the
grid has one CTA per ``rows_per_cta`` rows, so the number of rows is a runtime value and a
new token count never recompiles.

Column splits (decode)
----------------------
A few rows make a grid of a few CTAs, each walking its rows' chunks one after another: at T 1
a combine of 14 KB rows ran 7 dependent memory round trips on one SM. The grid's y dimension
(a runtime value, :func:`col_splits`) cuts each row's chunks into that many consecutive
shares, one per CTA (:func:`chunk_range`): the same compiled kernel runs a few rows on many
SMs, each CTA with one round trip in flight. At large T the grid is 1 high, as before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

import cutlass
import cutlass.cute as cute
from cutlass import Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.cutlass_dsl import dsl_user_op
from cutlass.experimental.primitives.nvvm_wrapper import cp_async_bulk_prefetch

#: bytes per vector access (128-bit loads and stores)
VEC_BYTES = 16

#: torch dtype -> CuTeDSL numeric type, for the dtypes these kernels handle
TORCH_TO_CUTE = {
    torch.bfloat16: cutlass.BFloat16,
    torch.float16: cutlass.Float16,
    torch.float32: cutlass.Float32,
}


def vec_elems(dtype) -> int:
    """Elements per 16-byte vector of a CuTeDSL numeric type."""
    return VEC_BYTES * 8 // dtype.width


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True)
class RowTiling:
    """How a CTA's threads walk rows of ``nvec`` 16-byte vectors (see the module doc)."""

    nvec: int  # 16-byte vectors per row
    tpr: int  # threads per row group
    iters: int  # vectors a thread has in flight per chunk
    chunks: int  # chunks per row
    threads: int  # threads per CTA

    @classmethod
    def make(cls, nvec: int, max_iters: int, threads: int = 256, tpr: int = 0, min_iters: int = 0) -> "RowTiling":
        """Pick ``tpr`` (a power of two up to 128 and up to the row, unless given) and
        ``iters <= max_iters``, preferring an exact split of the row into chunks: the
        smallest exact ``iters >= min_iters`` when ``min_iters`` is given, else the largest."""
        assert nvec >= 1 and max_iters >= 1 and threads % 32 == 0
        if tpr <= 0:
            tpr = min(128, _pow2_floor(nvec))
        tpr = min(tpr, threads)
        per_thread = -(-nvec // tpr)  # vectors each thread moves per row
        # divisors of per_thread that fit: no predicate when tpr divides the row
        exact = [d for d in range(1, min(per_thread, max_iters) + 1) if per_thread % d == 0]
        short = [d for d in exact if d >= min_iters] if min_iters > 0 else []
        if short:
            iters = short[0]
        elif 2 * exact[-1] >= min(per_thread, max_iters):
            iters = exact[-1]
        else:  # a prime-ish count: balance the chunks, predicate the tail
            iters = -(-per_thread // -(-per_thread // max_iters))
        return cls(nvec, tpr, iters, -(-per_thread // iters), threads)

    @property
    def rows_per_cta(self) -> int:
        return self.threads // self.tpr

    @property
    def predicated(self) -> bool:
        """Does the last chunk run past the row (so each access checks its column)?"""
        return self.tpr * self.iters * self.chunks != self.nvec

    def grid(self, rows: int) -> int:
        return -(-rows // self.rows_per_cta)


#: the pack / combine grids are split along the row (column splits) until they hold about this
#: many CTAs (impl.split_ctas; 0: never split)
SPLIT_CTAS = 1024
#: a grid of fewer CTAs than this (an H100's or H200's SMs) does not fill the GPU once: pack and
#: combine then move one vector per thread per chunk (``max_iters`` 1, unless given), so the
#: column splits spread each row over more CTAs, each with one round trip. H200, rotated
#: (h200_decode_s8/knobs8.csv): combine at T 1 3.35 -> 2.68 us with the L2 prefetch at
#: deepseek_v3, qwen3_30b_a3b 4.16 -> 2.68, gpt_oss_120b 3.80 -> 2.09 (pack: see ``kernels.pack``);
#: at T 128 (512 CTAs) one vector per thread had lost (pack 5.84 against 5.29 us, deepseek_v3)
FEW_CTAS = 132


def few_ctas_tune(tune: dict, ctas: int) -> dict:
    """``tune`` with ``max_iters=1`` for a grid of fewer than FEW_CTAS CTAs, where it leaves
    ``max_iters`` to the kernel's default."""
    if ctas < FEW_CTAS and not tune.get("max_iters"):
        return {**tune, "max_iters": 1}
    return tune


def col_splits(tiling: RowTiling, ctas: int, target: int = SPLIT_CTAS) -> int:
    """How many CTAs share each row group's chunks (the grid's height): enough to bring a grid
    of ``ctas`` CTAs near ``target``, at most one chunk each, none empty; 1 when the grid is
    large already, the row is one chunk, or ``target`` is 0."""
    if target <= 0 or tiling.chunks == 1 or ctas >= target:
        return 1
    splits = min(tiling.chunks, -(-target // max(ctas, 1)))
    per = -(-tiling.chunks // splits)  # chunks per CTA
    return -(-tiling.chunks // per)


@cute.jit
def chunk_range(tiling: cutlass.Constexpr):
    """This CTA's chunks of its rows, ``[lo, hi)``: all of them in a grid 1 high, else share
    ``blockIdx.y`` of ``gridDim.y`` (see the module doc)."""
    if const_expr(tiling.chunks == 1):  # a row is one chunk: never split (the loop as before)
        return 0, 1
    _, by, _ = cute.arch.block_idx()
    _, ny, _ = cute.arch.grid_dim()
    per = (tiling.chunks + ny - 1) // ny
    lo = by * per
    return lo, cutlass.min(lo + per, tiling.chunks)


# --------------------------------------------------------------------------------------
# Copy atoms
# --------------------------------------------------------------------------------------

#: cache hints: ``none`` = plain ld/st.global; ``stream`` = loads that do not keep the line
#: in L1 (``L1::no_allocate``) and streaming stores (``st.global.cs``) for data touched once
CACHE_HINTS = ("none", "stream")


def load_atom(dtype, hint: str = "none"):
    """A 128-bit global -> register copy atom."""
    if hint == "stream":
        return cute.make_copy_atom(cute.nvgpu.CopyG2ROp(), dtype, num_bits_per_copy=128,
                                   l1c_evict_priority=cute.nvgpu.CacheEvictionPriority.NO_ALLOCATE)
    return cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)


def store_atom(dtype, hint: str = "none"):
    """A 128-bit register -> global copy atom."""
    if hint == "stream":
        return cute.make_copy_atom(cute.nvgpu.CopyR2GOp(), dtype, num_bits_per_copy=128,
                                   store_cache_mode=cute.nvgpu.StoreCacheMode.STREAMING)
    return cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), dtype, num_bits_per_copy=128)


@dsl_user_op
def _use(word: Int32, *, loc=None, ip=None) -> None:
    """An empty volatile asm that reads ``word`` and clobbers memory: nothing is emitted, but what
    produced ``word`` stays before it, and no memory access moves across it."""
    llvm.inline_asm(res=None, operands_=[Int32(word).ir_value(loc=loc, ip=ip)], asm_string="",
                    constraints="r,~{memory}", has_side_effects=True, asm_dialect=llvm.AsmDialect.AD_ATT, loc=loc, ip=ip)


@cute.jit
def issued(frag: cute.Tensor):
    """The loads into ``frag`` are issued here, before what follows (a compiler barrier: no wait,
    no fence). A load whose only use is a store under ``if dst >= 0`` is otherwise moved into the
    branch, so it waits for the index the branch reads: two memory round trips in a row where one
    was meant (the per-slot pack's PTX before this; H200 T 1: see ``kernels.pack``)."""
    words = cute.recast_tensor(frag, Int32)
    for i in cutlass.range_constexpr(cute.size(words)):
        _use(words[i])


@cute.jit
def prefetch_l2(mT: cute.Tensor, row, col, nbytes):
    """Bring ``nbytes`` (a multiple of 16) of row ``row`` of a row-major tensor, from element
    ``col`` (16-byte aligned), into the L2: one ``cp.async.bulk.prefetch.L2`` (asynchronous,
    best effort, nothing waits for it)."""
    cp_async_bulk_prefetch(mT[row, None].iterator + col, nbytes)


@cute.jit
def row_vectors(mT: cute.Tensor, row, vec: cutlass.Constexpr[int]) -> cute.Tensor:
    """Row ``row`` of a row-major ``[rows, H]`` tensor as ``((vec), nvec)``: mode 1 picks a
    16-byte vector. The row stride is a multiple of ``vec`` (fake tensors say so), so every
    vector is 16-byte aligned and the copy atoms stay 128-bit."""
    return cute.zipped_divide(mT[row, None], (vec,))


@cute.jit
def load_chunk(atom: cute.CopyAtom, gRow: cute.Tensor, frag: cute.Tensor, base: Int32,
               tiling: cutlass.Constexpr):
    """Load this thread's ``tiling.iters`` vectors of a row chunk into ``frag`` (all issued
    before any is used). ``base`` is the thread's first vector column in the chunk."""
    for i in cutlass.range_constexpr(tiling.iters):
        col = base + i * tiling.tpr
        if const_expr(tiling.predicated):
            if col < tiling.nvec:
                cute.copy(atom, gRow[None, col], frag[None, i])
        else:
            cute.copy(atom, gRow[None, col], frag[None, i])


@cute.jit
def store_chunk(atom: cute.CopyAtom, frag: cute.Tensor, gRow: cute.Tensor, base: Int32,
                tiling: cutlass.Constexpr):
    """Store ``frag`` to this thread's vectors of a row chunk (see :func:`load_chunk`)."""
    for i in cutlass.range_constexpr(tiling.iters):
        col = base + i * tiling.tpr
        if const_expr(tiling.predicated):
            if col < tiling.nvec:
                cute.copy(atom, frag[None, i], gRow[None, col])
        else:
            cute.copy(atom, frag[None, i], gRow[None, col])


# --------------------------------------------------------------------------------------
# Empty rows (capacity tail, padding) zero-filled inside a scatter kernel's own grid
# --------------------------------------------------------------------------------------

#: the packed rows a scatter kernel's row group checks (``gather_idx == -1``: zero it) at
#: most. The packed rows are cut into one slice per CTA of the grid, which is the token CTAs,
#: or more when R is large against T (``zero_grid``); row group ``g`` takes rows
#: ``start + g, start + g + rows_per_cta, ...`` of its CTA's slice. One launch, and no CTA
#: that only reads an index: one extra CTA per ``rows_per_cta`` packed rows (what the kernels
#: did first) took qwen3_30b_a3b's pack from 86 to 73 % of copy at capacity.align=128 (H200).
ZERO_ROWS_PER_GROUP = 8


def zero_rows_per_group(tpr: int) -> int:
    """Rows of a slice per row group: one lane of each warp of the group probes each."""
    return min(ZERO_ROWS_PER_GROUP, tpr)


@cute.jit
def zero_grid(token_ctas: Int32, R: Int32, rows_per_cta: cutlass.Constexpr[int], tpr: cutlass.Constexpr[int]):
    """(the grid, the packed rows of each CTA's slice): every packed row in a slice, at most
    ``zero_rows_per_group(tpr)`` per row group."""
    grid = cutlass.max(token_ctas, cute.ceil_div(R, rows_per_cta * zero_rows_per_group(tpr)))
    return grid, cute.ceil_div(R, grid)


@cute.jit
def _probe_row(bidx: Int32, zslice: Int32, group: Int32, lane: Int32, rows_per_cta: cutlass.Constexpr[int],
               tpr: cutlass.Constexpr[int]):
    """(this thread's probe m, its row): lane ``m`` of each warp of a row group probes row
    ``bidx * zslice + group + m * rows_per_cta`` of its CTA's slice."""
    m = lane % min(tpr, 32)
    return m, bidx * zslice + group + m * rows_per_cta


@cute.jit
def probe_empty_row(mGather: cute.Tensor, bidx: Int32, zslice: Int32, group: Int32, lane: Int32,
                    rows_per_cta: cutlass.Constexpr[int], tpr: cutlass.Constexpr[int]) -> Int32:
    """``gather_idx`` of this thread's row of its group's share of the CTA's slice (its index
    clamped to the last row: no branch, so the load issues at once, in flight with the row
    loads). Looked at only by :func:`empty_rows`, after the row work."""
    _, r = _probe_row(bidx, zslice, group, lane, rows_per_cta, tpr)
    return mGather[cutlass.min(r, mGather.shape[0] - 1)]


@cute.jit
def empty_rows(probe: Int32, R: Int32, bidx: Int32, zslice: Int32, group: Int32, lane: Int32,
               rows_per_cta: cutlass.Constexpr[int], tpr: cutlass.Constexpr[int]) -> Int32:
    """The row group's empty rows of its share of the slice (``gather_idx == -1``; -2, past the
    last aligned block, is nobody's) as a bit mask, bit ``m`` for its row ``m``, from every
    thread's :func:`probe_empty_row`. A warp vote: every lane of the warp calls it."""
    m, r = _probe_row(bidx, zslice, group, lane, rows_per_cta, tpr)
    empty = (probe == -1) & (m < zero_rows_per_group(tpr)) & (r < cutlass.min(bidx * zslice + zslice, R))
    votes = cute.arch.vote_ballot_sync(empty)
    base = cute.arch.lane_idx() - m  # the warp lane of this group's probe 0
    return (votes >> base) & Int32((1 << zero_rows_per_group(tpr)) - 1)


# --------------------------------------------------------------------------------------
# Compilation: fake tensors (dynamic row counts) and a per-key cache
# --------------------------------------------------------------------------------------


def fake_rows(dtype, rows, H: int):
    """A ``[rows, H]`` row-major tensor: ``rows`` a SymInt (runtime), ``H`` static, the row
    stride dynamic but a multiple of 16 bytes, the base 16-byte aligned."""
    vec = vec_elems(dtype)
    return cute.runtime.make_fake_tensor(dtype, (rows, H), stride=(cute.sym_int64(divisibility=vec), 1),
                                         assumed_align=VEC_BYTES)


def fake_table(dtype, rows, cols: int, align: int = 4):
    """A contiguous ``[rows, cols]`` index / weight table (static row stride ``cols``), its base
    ``align``-byte aligned (16 where a kernel writes its rows as vectors)."""
    return cute.runtime.make_fake_tensor(dtype, (rows, cols), stride=(cols, 1), assumed_align=align)


def fake_vector(dtype, rows):
    return cute.runtime.make_fake_tensor(dtype, (rows,), stride=(1,), assumed_align=4)


def fake_stream():
    """The compiled function takes the caller's current stream (TVM-FFI environment stream)."""
    return cute.runtime.make_fake_stream(use_tvm_ffi_env_stream=True)


def launch_capped(launch, grid, block, stream, min_ctas: int = 0) -> None:
    """Launch a ``@cute.kernel`` call with registers capped so ``min_ctas`` CTAs fit an SM (0: no
    cap). CuTeDSL asks the device for its shared memory per SM when no carveout is given; the
    default carveout (-1) stands in where there is no device (compiling on a CPU)."""
    if min_ctas > 0:
        launch.launch(grid=grid, block=block, stream=stream, min_blocks_per_mp=min_ctas,
                      preferred_smem_carveout=None if torch.cuda.is_available() else -1)
    else:
        launch.launch(grid=grid, block=block, stream=stream)


#: compile options: TVM-FFI calling convention (torch tensors passed straight in)
COMPILE_OPTIONS = "--enable-tvm-ffi"


class CompileCache:
    """Compiled kernels by static key; ``hits`` / ``misses`` let tests see recompiles."""

    def __init__(self):
        self._fns: dict = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key, build):
        fn = self._fns.get(key)
        if fn is not None:
            self.hits += 1
            return fn
        with self._lock:
            fn = self._fns.get(key)
            if fn is None:
                self.misses += 1
                fn = self._fns[key] = build()
            return fn

    def __len__(self) -> int:
        return len(self._fns)

    def clear(self) -> None:
        self._fns.clear()
        self.hits = self.misses = 0


# --------------------------------------------------------------------------------------
# Host-side argument handling
# --------------------------------------------------------------------------------------


def rows_ok(t: torch.Tensor) -> bool:
    """Can the kernels address ``t [rows, H]`` as 16-byte vectors (last stride 1, row
    stride a multiple of 16 bytes, 16-byte aligned base)?"""
    vec = VEC_BYTES // t.element_size()
    return t.stride(-1) == 1 and t.stride(0) % vec == 0 and t.data_ptr() % VEC_BYTES == 0


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when :func:`rows_ok`, else a fresh contiguous (hence aligned) copy."""
    return t if rows_ok(t) else t.clone(memory_format=torch.contiguous_format)


def as_table(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An index / weight table as a contiguous tensor of ``dtype``."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


