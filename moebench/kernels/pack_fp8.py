"""Pack with quantization: ``x [T, H]`` (bf16 / fp16) to FP8 e4m3 packed rows ``[R, H]`` and one
fp32 scale per (row, 128 channels) ``[R, H / 128]``, in packed order (``routing.pack_fp8``).

Per 128-channel block of a token's row: ``amax = max(max |x|, 1e-4)``; ``block128``:
``q = fp8(x * (448 / amax))``, ``scale = amax / 448`` (DeepGEMM's per-block cast); ``ue8m0``: the
scale is the smallest power of two with ``448 * scale >= amax``, ``q = fp8(x * 2**-e)`` (exact
scaling). The casts round to nearest and saturate at +-448 (``cvt.rn.satfinite``, what torch's
cast does), the divisions are IEEE (``div.rn``): the result is bit-exact against the reference.

Like the scatter pack (``kernels.pack.PackScatter``, ``per_slot=False``): one row group per
token (or per ``tokens`` tokens, their loads all in flight) reads its row once and writes each
kept slot's row. A thread quantizes ``vec`` consecutive channels at a time (8: one 16-byte load,
an 8-byte store; 16: two loads, one 16-byte store), so a block's ``128 / vec`` units sit on
adjacent lanes, whose shuffles give the block's amax. Scales: ``lanes`` -- each block's first
lane stores its scale with the row's values (a 4-byte store per block and slot); ``row`` --
staged in shared memory and stored once per (row, slot) by consecutive lanes (one 128-byte
store per 32 blocks). Rows no slot points at (a capacity's tail, padding) are written as
quantized zeros with ``zero_empty``, by the same CTAs (``common.zero_grid``).

The tiling (``threads``, ``tpr``, ``max_iters``, ``vec``, ``tokens``, ``scales``, ``hint``,
``min_ctas``) is static: ``impl=cute``'s ``threads`` / ``max_iters`` / ``cache_hint`` and its
``fp8_*`` options pick it.
"""

from __future__ import annotations

import cuda.bindings.driver as cuda
import torch

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.common import (
    CACHE_HINTS,
    COMPILE_OPTIONS,
    TORCH_TO_CUTE,
    CompileCache,
    RowTiling,
    as_rows,
    as_table,
    empty_rows,
    fake_rows,
    fake_stream,
    fake_table,
    fake_vector,
    launch_capped,
    load_atom,
    probe_empty_row,
    row_vectors,
    zero_grid,
    zero_rows_per_group,
)

MODES = ("block128", "ue8m0")
BLOCK = 128
FP8_MAX = 448.0
AMAX_MIN = 1e-4
MAX_SLOTS = 16
FP8 = cutlass.Float8E4M3FN
#: channels a thread quantizes at once (its fp8 store: 8 or 16 bytes)
VECS = (8, 16)
#: how the scales are stored (module doc)
SCALE_STORES = ("lanes", "row")
#: tokens one row group packs at once, their loads all in flight
MAX_TOKENS = 4


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


class PackScatterFP8:
    """``out_q[scatter_idx[t, j]], out_s[...] = quantize(x[t])`` for kept slots (module doc)."""

    def __init__(self, dtype, H: int, S: int, *, mode: str = "block128", zero_empty: bool = False,
                 threads: int = 256, max_iters: int = 4, tpr: int = 0, vec: int = 8, tokens: int = 1,
                 scales: str = "lanes", hint: str = "none", min_ctas: int = 0):
        assert dtype.width == 16 and H % BLOCK == 0 and mode in MODES and 1 <= S <= MAX_SLOTS
        assert vec in VECS and scales in SCALE_STORES and hint in CACHE_HINTS and 1 <= tokens <= MAX_TOKENS
        self.dtype, self.H, self.S, self.mode, self.zero_empty = dtype, H, S, mode, zero_empty
        self.vec, self.tokens, self.scale_store, self.hint, self.min_ctas = vec, tokens, scales, hint, min_ctas
        self.loads = vec // 8  # 16-byte loads of x per unit of `vec` channels
        self.lanes = BLOCK // vec  # lanes of a 128-channel block
        self.nblocks = H // BLOCK
        nunit = H // vec
        # a power of two from a block's lanes up to the row (default: up to 128)
        tpr = min(max(tpr if tpr > 0 else 128, self.lanes), _pow2_floor(nunit), threads)
        self.tiling = RowTiling.make(nunit, max_iters, threads, tpr=tpr)
        assert self.tiling.tpr % self.lanes == 0  # a block's units on adjacent lanes of one warp

    @cute.jit
    def __call__(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mQ: cute.Tensor,
                 mS: cute.Tensor, stream: cuda.CUstream):
        assert mX.element_type == self.dtype and mQ.element_type == cutlass.Uint8
        tl = self.tiling
        token_ctas = cute.ceil_div(mX.shape[0], tl.rows_per_cta * self.tokens)
        grid, zslice = token_ctas, Int32(0)
        if const_expr(self.zero_empty):
            grid, zslice = zero_grid(token_ctas, mQ.shape[0], tl.rows_per_cta, tl.tpr)
        # registers capped for min_ctas CTAs per SM (0: none)
        launch_capped(self.kernel(mX, mScatter, mGather, mQ, mS, token_ctas, zslice), [grid, 1, 1],
                      [tl.threads, 1, 1], stream, self.min_ctas)

    @cute.jit
    def scales(self, amax: Float32):
        """(the multiplier applied to x, the stored scale) of a block with this amax."""
        a = cute.arch.fmax(amax, Float32(AMAX_MIN))
        inv = Float32(FP8_MAX) / a
        scale = a / Float32(FP8_MAX)
        if const_expr(self.mode == "ue8m0"):
            # a = 1.m * 2**ea; 448 = 1.75 * 2**8: e = ea - 8, one more when 1.m > 1.75
            bits = cute.make_rmem_tensor((2,), Int32)
            word = cute.recast_tensor(bits, Float32)
            word[0] = a
            e = ((bits[0] >> 23) & Int32(0xFF)) - Int32(127 + 8)
            if (bits[0] & Int32(0x7FFFFF)) > Int32(0x600000):
                e = e + Int32(1)
            bits[0] = (e + Int32(127)) << 23
            bits[1] = (Int32(127) - e) << 23
            scale = word[0]
            inv = word[1]
        return inv, scale

    def store_atom(self):
        """The fp8 values' store: ``vec`` bytes (streaming with ``hint=stream``)."""
        if self.hint == "stream":
            return cute.make_copy_atom(cute.nvgpu.CopyR2GOp(), cutlass.Uint8, num_bits_per_copy=8 * self.vec,
                                       store_cache_mode=cute.nvgpu.StoreCacheMode.STREAMING)
        return cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), cutlass.Uint8, num_bits_per_copy=8 * self.vec)

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mQ: cute.Tensor,
               mS: cute.Tensor, token_ctas: Int32, zslice: Int32):
        tl, vec, S, NTOK, L = self.tiling, self.vec, self.S, self.tokens, self.loads
        rpc = tl.rows_per_cta
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        group = tidx // tl.tpr
        lane = tidx % tl.tpr
        ld = load_atom(self.dtype, self.hint)
        st = self.store_atom()
        U = tl.iters * NTOK  # units in registers per chunk: unit (token t, vector i) is t * iters + i
        frag = cute.make_rmem_tensor((vec, U), self.dtype)
        fvec = frag  # its 16-byte pieces
        if const_expr(L > 1):
            fvec = cute.make_tensor(frag.iterator, cute.make_layout((8, L * U)))
        qfrag = cute.make_rmem_tensor((vec, U), FP8)
        qbytes = cute.recast_tensor(qfrag, cutlass.Uint8)  # stored as bytes (the tensor is a uint8 view)
        sfrag = cute.make_rmem_tensor((U,), Float32)
        if const_expr(self.scale_store == "row"):
            smem = cutlass.memory.SmemAllocator()
            sS = smem.allocate_tensor(Float32, cute.make_layout((rpc * NTOK, self.nblocks), stride=(self.nblocks, 1)),
                                      byte_alignment=16)
        probe = Int32(0)
        if const_expr(self.zero_empty):  # one of this row group's rows of the CTA's slice
            probe = probe_empty_row(mGather, bidx, zslice, group, lane, rpc, tl.tpr)
        if bidx < token_ctas:
            tok0 = (bidx * rpc + group) * NTOK
            dst = cute.make_rmem_tensor((S * NTOK,), Int32)
            for t in cutlass.range_constexpr(NTOK):
                for j in cutlass.range_constexpr(S):
                    dst[t * S + j] = Int32(-1)
                    if tok0 + t < mX.shape[0]:
                        dst[t * S + j] = mScatter[tok0 + t, j]
            for c in cutlass.range(tl.chunks, unroll=1):
                base = c * (tl.tpr * tl.iters) + lane
                frag.fill(0)  # a missing token quantizes zeros (every lane runs the shuffles)
                for t in cutlass.range_constexpr(NTOK):
                    if tok0 + t < mX.shape[0]:
                        gX = row_vectors(mX, tok0 + t, 8)
                        for i in cutlass.range_constexpr(tl.iters):
                            col = base + i * tl.tpr
                            if not tl.predicated or col < tl.nvec:
                                for h in cutlass.range_constexpr(L):
                                    cute.copy(ld, gX[None, col * L + h], fvec[None, (t * tl.iters + i) * L + h])
                for t in cutlass.range_constexpr(NTOK):
                    for i in cutlass.range_constexpr(tl.iters):
                        u = t * tl.iters + i
                        v = frag[None, u].load().to(Float32)
                        hi = v.reduce(cute.ReductionOp.MAX, -Float32.inf, reduction_profile=0)
                        lo = v.reduce(cute.ReductionOp.MIN, Float32.inf, reduction_profile=0)
                        amax = cute.arch.warp_reduction(cute.arch.fmax(hi, -lo), cute.arch.fmax,
                                                        threads_in_group=self.lanes)
                        inv, scale = self.scales(amax)
                        qfrag[None, u].store((v * inv).to(FP8))
                        sfrag[u] = scale
                        if const_expr(self.scale_store == "row"):
                            col = base + i * tl.tpr
                            if lane % self.lanes == 0 and col < tl.nvec:
                                sS[group * NTOK + t, col // self.lanes] = scale
                for t in cutlass.range_constexpr(NTOK):
                    for j in cutlass.range_constexpr(S):
                        if tok0 + t < mX.shape[0] and dst[t * S + j] >= 0:
                            self.store_row(st, qbytes, sfrag, mQ, mS, dst[t * S + j], base, lane, t * tl.iters)
            if const_expr(self.scale_store == "row"):  # a row's scales by consecutive lanes, once per slot
                cute.arch.sync_threads()
                for t in cutlass.range_constexpr(NTOK):
                    for j in cutlass.range_constexpr(S):
                        if dst[t * S + j] >= 0:
                            for b in cutlass.range(lane, self.nblocks, tl.tpr, unroll=1):
                                mS[dst[t * S + j], b] = sS[group * NTOK + t, b]
        if const_expr(self.zero_empty):  # the group's empty rows of the slice: quantized zeros
            empty = empty_rows(probe, mQ.shape[0], bidx, zslice, group, lane, rpc, tl.tpr)
            _, zscale = self.scales(Float32(0.0))
            qfrag.fill(0)
            for m in cutlass.range_constexpr(zero_rows_per_group(tl.tpr)):
                if ((empty >> m) & 1) != 0:
                    row = bidx * zslice + group + m * rpc
                    for c in cutlass.range(tl.chunks, unroll=1):
                        self.store_row(st, qbytes, sfrag, mQ, mS, row, c * (tl.tpr * tl.iters) + lane, lane, 0,
                                       values_only=True)
                    for b in cutlass.range(lane, self.nblocks, tl.tpr, unroll=1):
                        mS[row, b] = zscale

    @cute.jit
    def store_row(self, st, qbytes: cute.Tensor, sfrag: cute.Tensor, mQ: cute.Tensor, mS: cute.Tensor, row: Int32,
                  base: Int32, lane: Int32, u0: cutlass.Constexpr[int], values_only: cutlass.Constexpr[bool] = False):
        """This thread's units ``u0 ..`` of a chunk to ``row`` (with ``scales=lanes``, a block's
        first lane stores its scale too)."""
        tl = self.tiling
        gRow = row_vectors(mQ, row, self.vec)
        for i in cutlass.range_constexpr(tl.iters):
            col = base + i * tl.tpr
            if not tl.predicated or col < tl.nvec:
                cute.copy(st, qbytes[None, u0 + i], gRow[None, col])
                if const_expr(self.scale_store == "lanes" and not values_only):
                    if lane % self.lanes == 0:
                        mS[row, col // self.lanes] = sfrag[u0 + i]


# --------------------------------------------------------------------------------------
# Compile (once per static key) and launch
# --------------------------------------------------------------------------------------

_cache = CompileCache()


def compile_pack_fp8(dtype, H: int, S: int, mode: str, zero_empty: bool, **tune):
    key = ("pack_fp8", dtype, H, S, mode, zero_empty, tuple(sorted(tune.items())))

    def build():
        T, R = cute.sym_int(), cute.sym_int()
        return cute.compile(PackScatterFP8(dtype, H, S, mode=mode, zero_empty=zero_empty, **tune),
                            fake_rows(dtype, T, H), fake_table(Int32, T, S), fake_vector(Int32, R),
                            fake_rows(cutlass.Uint8, R, H), fake_table(Float32, R, H // BLOCK), fake_stream(),
                            options=COMPILE_OPTIONS)

    return _cache.get(key, build)


def pack_fp8(x: torch.Tensor, gather_idx: torch.Tensor, scatter_idx: torch.Tensor, out_q: torch.Tensor,
             out_s: torch.Tensor, mode: str = "block128", zero_empty: bool = True, **tune):
    """Launch on the current stream; writes ``out_q [R, H]`` (float8_e4m3fn) and ``out_s
    [R, H / 128]`` (fp32) and returns them. The caller has checked dtype, H and S."""
    T, H = x.shape
    if out_q.shape[0] == 0:
        return out_q, out_s
    fn = compile_pack_fp8(TORCH_TO_CUTE[x.dtype], H, scatter_idx.shape[1], mode, zero_empty, **tune)
    fn(as_rows(x), as_table(scatter_idx, torch.int32), as_table(gather_idx, torch.int32), out_q.view(torch.uint8),
       out_s)
    return out_q, out_s
