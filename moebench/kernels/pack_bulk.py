"""Scatter-pack with Hopper bulk copies (``cp.async.bulk``, the TMA engine, no tensor map).

Same contract as ``moebench.kernels.pack.pack(..., mode="scatter")``: ``out[scatter_idx[t, j]]
= x[t]`` for every slot ``j`` with ``scatter_idx[t, j] >= 0``; with ``zero_empty`` the rows
whose ``gather_idx`` is -1 (capacity tail, padding) are zeroed by the same launch.

Design
------
No data goes through registers. The work is a list of *items* ``(token t, chunk c)``: a row
of ``H`` elements (``H * b`` bytes, a multiple of 16) is cut into ``chunks`` pieces of at most
``chunk_bytes``. Each warp of a CTA is an independent *worker* with ``stages`` shared-memory
stage buffers of ``chunk_bytes`` and one mbarrier per stage; it walks its items (grid-stride
over all workers when ``persistent``, a contiguous block of ``items_per_worker`` otherwise):

1. lane 0 arms the stage's mbarrier (``mbarrier.arrive.expect_tx`` with the chunk's bytes)
   and issues one bulk load ``cp.async.bulk.shared::cluster.global.mbarrier::complete_tx``
   of ``x[t]``'s chunk into the stage; lanes ``j < S`` read ``scatter_idx[t, j]`` into a
   register of that stage (the loop is unrolled over the stages, so the index is static);
2. when the stage's mbarrier flips, lane ``j`` issues the bulk store
   ``cp.async.bulk.global.shared::cta.bulk_group`` of the stage to row ``scatter_idx[t, j]``
   (the S stores of a token go out in parallel from S lanes) and commits a bulk group;
3. ``lag`` items later, ``cp.async.bulk.wait_group.read lag`` tells every lane that its
   stores from that older stage have finished reading shared memory, and lane 0 refills it
   with item ``i + stages``. So ``stages - lag`` loads and ~``lag`` store groups are in
   flight per worker at any time.

Memory reads ``x`` once and writes ``out`` ``k`` times, the strict bytes, with no register
traffic; both directions are driven by the copy engine. The empty rows (``zero_empty``) are
written after a worker's items: stage 0 is zero-filled (generic stores, then
``fence.proxy.async.shared::cta``) and each lane bulk-stores it to the empty rows it finds in
``gather_idx`` (grid-stride over rows x chunks).

Limits: H * b a multiple of 16 bytes (H a multiple of 8 for 16-bit dtypes, of 4 for fp32);
at most 32 slots per token (one lane per slot); row stride a multiple of 16 bytes.
Shared memory per CTA: ``warps * stages * chunk_bytes`` (+ 8 bytes per stage).

Compiled once per static key (dtype, H, S, zero_empty, tuning, SM count for the persistent
grid); T and R are runtime values (fake tensors with ``cute.sym_int`` rows, TVM-FFI calling
convention), as in ``moebench.kernels.pack``.
"""

from __future__ import annotations

import torch

import cutlass
import cutlass.cute as cute
import cuda.bindings.driver as cuda
from cutlass import Int32, const_expr
from cutlass._mlir.dialects import llvm
from cutlass.experimental import primitives as prims

from moebench.kernels.common import (
    COMPILE_OPTIONS,
    TORCH_TO_CUTE,
    VEC_BYTES,
    CompileCache,
    as_rows,
    as_table,
    fake_rows,
    fake_stream,
    fake_table,
    fake_vector,
    rows_ok,
)

#: one lane per slot issues that slot's bulk store
MAX_SLOTS = 32
#: H100 / H200 usable shared memory per SM (227 KB per CTA max); the persistent grid asks
#: for ``ctas_per_sm`` CTAs of ``warps * stages * chunk_bytes`` each
SMEM_PER_SM = 228 * 1024
#: L2 cache hints for both bulk directions: ``none``, or ``evict_first`` (a
#: ``createpolicy.fractional.L2::evict_first`` policy on every load and store: data touched once)
HINTS = ("none", "evict_first")
#: default tuning: 4 stages of up to 8 KB per worker, 1 warp per CTA, 4 CTAs per SM
DEFAULTS = {"chunk_bytes": 8192, "stages": 4, "lag": 1, "warps": 1, "ctas_per_sm": 4, "persistent": True,
            "items_per_worker": 16, "hint": "none"}


class Unsupported(ValueError):
    """The bulk pack cannot handle these arguments (the caller reports the reason)."""


def chunking(row_bytes: int, chunk_bytes: int) -> tuple[int, int]:
    """``(chunks, bytes per chunk)``: the fewest balanced chunks of at most ``chunk_bytes``
    (both multiples of 16); the last chunk may be shorter when the row does not divide."""
    assert row_bytes % VEC_BYTES == 0 and chunk_bytes % VEC_BYTES == 0 and chunk_bytes > 0
    nvec = row_bytes // VEC_BYTES
    chunks = -(-row_bytes // chunk_bytes)
    per = -(-nvec // chunks)  # vectors per chunk, balanced
    chunks = -(-nvec // per)
    return chunks, per * VEC_BYTES


def _gmem_llvm_ptr(ptr: cute.Pointer):
    """An ``llvm.ptr<1>`` (global) for a gmem cute pointer."""
    p = ptr.to_llvm_ptr()
    if llvm.PointerType(p.type).address_space != cutlass.AddressSpace.gmem.value:
        p = llvm.addrspacecast(llvm.PointerType.get(cutlass.AddressSpace.gmem.value), p)
    return p


class PackBulk:
    """Scatter-pack by bulk copies (see the module doc)."""

    def __init__(self, dtype, H: int, S: int, *, zero_empty: bool = False, chunk_bytes: int = 8192,
                 stages: int = 4, lag: int = 1, warps: int = 1, ctas_per_sm: int = 4, persistent: bool = True,
                 items_per_worker: int = 16, hint: str = "none", num_sms: int = 132):
        row_bytes = H * dtype.width // 8
        if row_bytes % VEC_BYTES:
            raise Unsupported(f"bulk pack needs rows of a multiple of 16 bytes; H={H} x {dtype.width // 8} B")
        if not 1 <= S <= MAX_SLOTS:
            raise Unsupported(f"bulk pack handles 1..{MAX_SLOTS} slots per token, not S={S}")
        if hint not in HINTS:
            raise ValueError(f"bulk pack hint={hint!r}; accepted: {', '.join(HINTS)}")
        self.hint = hint
        assert chunk_bytes % VEC_BYTES == 0 and stages >= 2 and 1 <= lag < stages and 1 <= warps <= 32
        self.dtype = dtype
        self.H, self.S = H, S
        self.zero_empty = zero_empty
        self.row_bytes = row_bytes
        self.chunks, self.chunk_bytes = chunking(row_bytes, min(chunk_bytes, row_bytes))
        self.exact = self.chunks * self.chunk_bytes == row_bytes
        self.chunk_elems = self.chunk_bytes * 8 // dtype.width
        self.stages, self.lag, self.warps = stages, lag, warps
        self.persistent = persistent
        self.items_per_worker = items_per_worker
        smem = warps * stages * self.chunk_bytes + 8 * warps * stages
        if smem > 227 * 1024:
            raise Unsupported(f"bulk pack needs {smem} B of shared memory per CTA (max 227 KB)")
        ctas_per_sm = max(1, min(ctas_per_sm, SMEM_PER_SM // (smem + 1024), 32 // warps))
        self.ctas_per_sm = ctas_per_sm
        self.max_ctas = num_sms * ctas_per_sm

    @cute.jit
    def __call__(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mOut: cute.Tensor,
                 stream: cuda.CUstream):
        assert mX.element_type == self.dtype and mOut.element_type == self.dtype
        items = mX.shape[0] * self.chunks
        if const_expr(self.persistent):
            grid = cutlass.min(cute.ceil_div(items, self.warps), self.max_ctas)
            if const_expr(self.zero_empty):
                grid = self.max_ctas  # the zeroing pass walks R rows on every worker
        else:
            grid = cute.ceil_div(items, self.warps * self.items_per_worker)
            if const_expr(self.zero_empty):
                grid = cutlass.max(grid, 1)
        self.kernel(mX, mScatter, mGather, mOut).launch(
            grid=[grid, 1, 1], block=[32 * self.warps, 1, 1], stream=stream)

    # -- per-item addresses ----------------------------------------------------------------
    @cute.jit
    def item_bytes(self, c: Int32) -> Int32:
        if const_expr(self.exact):
            return Int32(self.chunk_bytes)
        else:
            return cutlass.min(Int32(self.chunk_bytes), Int32(self.row_bytes) - c * self.chunk_bytes)

    @cute.jit
    def policy(self):
        """The L2 cache policy operand of the bulk copies (None: no ``.L2::cache_hint``)."""
        if const_expr(self.hint == "evict_first"):
            return cute.arch.inline_ptx("createpolicy.fractional.L2::evict_first.b64 {$w0}, 1.0;",
                                        write_only_types=[cutlass.Int64])
        else:
            return None

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mOut: cute.Tensor):
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        gdim, _, _ = cute.arch.grid_dim()
        warp = cute.arch.make_warp_uniform(tidx // 32)
        lane = tidx % 32
        stages = self.stages
        lag = self.lag

        smem = cutlass.memory.SmemAllocator()
        sBuf = smem.allocate_array(self.dtype, self.warps * stages * self.chunk_elems, byte_alignment=128)
        sBar = smem.allocate_array(cutlass.Int64, self.warps * stages, byte_alignment=8)
        my_buf = sBuf + warp * (stages * self.chunk_elems)
        my_bar = sBar + warp * stages

        if lane == 0:
            for s in cutlass.range_constexpr(stages):
                cute.arch.mbarrier_init(my_bar + s, 1)
        cute.arch.mbarrier_init_fence()
        cute.arch.sync_warp()

        # this worker's items: first + i * step, i < n
        n_items = mX.shape[0] * self.chunks
        worker = bidx * self.warps + warp
        n_workers = gdim * self.warps
        first = worker
        step = n_workers
        n = Int32(0)
        if const_expr(self.persistent):
            if worker < n_items:
                n = cute.ceil_div(n_items - worker, n_workers)
        else:
            first = worker * self.items_per_worker
            step = 1
            if first < n_items:
                n = cutlass.min(n_items - first, Int32(self.items_per_worker))

        dst = cute.make_rmem_tensor((stages,), Int32)  # lane j: slot j's row of each stage's item

        # prologue: fill every stage
        for s in cutlass.range_constexpr(stages):
            if s < n:
                self.issue_load(mX, mScatter, my_buf, my_bar, dst, first + s * step, s, lane)

        for outer in cutlass.range(cute.ceil_div(n, stages), unroll=1):
            for s in cutlass.range_constexpr(stages):
                i = outer * stages + s
                if i < n:
                    cute.arch.mbarrier_wait(my_bar + s, outer % 2)
                    item = first + i * step
                    tok = item // self.chunks
                    c = item - tok * self.chunks
                    if lane < self.S:
                        if dst[s] >= 0:
                            row = mOut[dst[s], None]
                            prims.cp_async_bulk_global_shared_cta(
                                _gmem_llvm_ptr(row.iterator + c * self.chunk_elems),
                                (my_buf + s * self.chunk_elems).to_llvm_ptr(),
                                self.item_bytes(c), l2_cache_hint=self.policy())
                    cute.arch.cp_async_bulk_commit_group()
                    # refill the stage used `lag` items ago with item i - lag + stages
                    r = i - lag + stages
                    if (i >= lag) & (r < n):
                        cute.arch.cp_async_bulk_wait_group(lag, read=True)
                        cute.arch.sync_warp()
                        self.issue_load(mX, mScatter, my_buf, my_bar, dst, first + r * step, (s - lag) % stages,
                                        lane)
        cute.arch.cp_async_bulk_wait_group(0, read=True)

        if const_expr(self.zero_empty):
            cute.arch.sync_warp()  # every lane's stores have read their stages: stage 0 is free
            self.zero_rows(mGather, mOut, my_buf, lane, worker, n_workers)

    @cute.jit
    def issue_load(self, mX: cute.Tensor, mScatter: cute.Tensor, my_buf: cute.Pointer, my_bar: cute.Pointer,
                   dst: cute.Tensor, item: Int32, s: cutlass.Constexpr[int], lane: Int32):
        """Item ``item`` -> stage ``s``: lane 0 arms the barrier and issues the bulk load; lanes
        ``j < S`` fetch the token's destination row for slot ``j``."""
        tok = item // self.chunks
        c = item - tok * self.chunks
        if lane == 0:
            nbytes = self.item_bytes(c)
            cute.arch.mbarrier_arrive_and_expect_tx(my_bar + s, nbytes)
            row = mX[tok, None]
            prims.cp_async_bulk_shared_cluster_global(
                (my_buf + s * self.chunk_elems).to_llvm_ptr(),
                _gmem_llvm_ptr(row.iterator + c * self.chunk_elems),
                (my_bar + s).to_llvm_ptr(),
                nbytes, l2_cache_hint=self.policy())
        if lane < self.S:
            dst[s] = mScatter[tok, lane]

    @cute.jit
    def zero_rows(self, mGather: cute.Tensor, mOut: cute.Tensor, my_buf: cute.Pointer, lane: Int32,
                  worker: Int32, n_workers: Int32):
        """Bulk-store a zeroed stage to every chunk of the rows whose ``gather_idx`` is -1."""
        words = cute.make_tensor(cute.recast_ptr(my_buf, dtype=Int32), cute.make_layout(self.chunk_bytes // 4))
        for w in cutlass.range(lane, self.chunk_bytes // 4, 32, unroll=1):
            words[w] = Int32(0)
        cute.arch.fence_proxy("async.shared", space="cta")
        cute.arch.sync_warp()
        total = mOut.shape[0] * self.chunks
        for q in cutlass.range(worker * 32 + lane, total, n_workers * 32, unroll=1):
            row = q // self.chunks
            c = q - row * self.chunks
            if mGather[row] < 0:
                gRow = mOut[row, None]
                prims.cp_async_bulk_global_shared_cta(
                    _gmem_llvm_ptr(gRow.iterator + c * self.chunk_elems), my_buf.to_llvm_ptr(), self.item_bytes(c),
                    l2_cache_hint=self.policy())
            cute.arch.cp_async_bulk_commit_group()
        cute.arch.cp_async_bulk_wait_group(0, read=True)


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

_cache = CompileCache()


def _num_sms() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 132  # H100 SXM / H200 (compile-only on a CPU machine)


def tuning(**tune) -> dict:
    """The full tuning dict (defaults filled in)."""
    unknown = set(tune) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown bulk pack options: {sorted(unknown)}")
    return {**DEFAULTS, **tune}


def compile_bulk(dtype, H: int, S: int, zero_empty: bool, num_sms: int | None = None, **tune):
    """The compiled bulk scatter-pack for ``dtype`` (a CuTeDSL type), ``H`` and ``S``; T and R
    are dynamic. Raises :class:`Unsupported` for shapes it cannot handle."""
    tune = tuning(**tune)
    num_sms = _num_sms() if num_sms is None else num_sms
    key = ("bulk", dtype, H, S, zero_empty, num_sms, tuple(sorted(tune.items())))

    def build():
        kernel = PackBulk(dtype, H, S, zero_empty=zero_empty, num_sms=num_sms, **tune)
        T, R = cute.sym_int(), cute.sym_int()
        return cute.compile(kernel, fake_rows(dtype, T, H), fake_table(Int32, T, S), fake_vector(Int32, R),
                            fake_rows(dtype, R, H), fake_stream(), options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def supports(dtype: torch.dtype, H: int, S: int) -> str | None:
    """None when the bulk pack handles these, else the reason."""
    if dtype not in TORCH_TO_CUTE:
        return f"bulk pack handles bfloat16/float16/float32, not {dtype}"
    if H <= 0 or (H * torch.empty((), dtype=dtype).element_size()) % VEC_BYTES:
        return f"bulk pack needs rows of a multiple of 16 bytes (H={H}, {dtype})"
    if not 1 <= S <= MAX_SLOTS:
        return f"bulk pack handles 1..{MAX_SLOTS} slots per token, not S={S}"
    return None


def pack(x: torch.Tensor, gather_idx: torch.Tensor, scatter_idx: torch.Tensor, out: torch.Tensor,
         mode: str = "scatter", zero_empty: bool = True, **tune) -> torch.Tensor:
    """Launch the bulk scatter-pack on ``x``'s current stream; writes ``out [R, H]``, returns it.

    Same arguments as ``moebench.kernels.pack.pack`` (``mode`` must be ``scatter``); ``tune``
    takes the keys of :data:`DEFAULTS`. Raises :class:`Unsupported` with the reason for
    dtypes / shapes it cannot handle."""
    if mode != "scatter":
        raise Unsupported(f"bulk pack is a scatter pack; mode={mode!r}")
    T, H = x.shape
    R = out.shape[0]
    S = scatter_idx.shape[1] if scatter_idx.dim() == 2 else 1
    why = supports(x.dtype, H, S)
    if why:
        raise Unsupported(why)
    if R == 0:
        return out
    if T == 0:
        return out.zero_()
    dtype = TORCH_TO_CUTE[x.dtype]
    x = as_rows(x)
    dst = out if rows_ok(out) else torch.empty_like(out, memory_format=torch.contiguous_format)
    gather_idx = as_table(gather_idx, torch.int32)
    scatter_idx = as_table(scatter_idx.reshape(T, S), torch.int32)
    compile_bulk(dtype, H, S, zero_empty, **tune)(x, scatter_idx, gather_idx, dst)
    if dst is not out:
        out.copy_(dst)
    return out
