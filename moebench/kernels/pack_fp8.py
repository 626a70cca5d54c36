"""Pack with quantization: ``x [T, H]`` (bf16 / fp16) to FP8 e4m3 packed rows ``[R, H]`` and one
fp32 scale per (row, 128 channels) ``[R, H / 128]``, in packed order (``routing.pack_fp8``).

Per 128-channel block of a token's row: ``amax = max(max |x|, 1e-4)``; ``block128``:
``q = fp8(x * (448 / amax))``, ``scale = amax / 448`` (DeepGEMM's per-block cast); ``ue8m0``: the
scale is the smallest power of two with ``448 * scale >= amax``, ``q = fp8(x * 2**-e)`` (exact
scaling). The casts round to nearest and saturate at +-448 (``cvt.rn.satfinite``, what torch's
cast does), the divisions are IEEE (``div.rn``): the result is bit-exact against the reference.

Like the scatter pack (``kernels.pack.PackScatter``, ``per_slot=False``): one row group per
token reads its row once and writes each kept slot's row; a block's 16 vectors sit on 16
adjacent lanes, whose shuffles give the block's amax. Rows no slot points at (a capacity's
tail, padding) are written as quantized zeros with ``zero_empty``.
"""

from __future__ import annotations

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
)

MODES = ("block128", "ue8m0")
BLOCK = 128
FP8_MAX = 448.0
AMAX_MIN = 1e-4
MAX_SLOTS = 16
FP8 = cutlass.Float8E4M3FN


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


class PackScatterFP8:
    """``out_q[scatter_idx[t, j]], out_s[...] = quantize(x[t])`` for kept slots (module doc)."""

    def __init__(self, dtype, H: int, S: int, *, mode: str = "block128", zero_empty: bool = False,
                 threads: int = 256, max_iters: int = 4):
        assert dtype.width == 16 and H % BLOCK == 0 and mode in MODES and 1 <= S <= MAX_SLOTS
        self.dtype, self.H, self.S, self.mode, self.zero_empty = dtype, H, S, mode, zero_empty
        self.vec = 8  # 16 bytes of x, 8 bytes of fp8
        nvec = H // self.vec
        self.tiling = RowTiling.make(nvec, max_iters, threads, tpr=min(128, _pow2_floor(nvec)))
        assert self.tiling.tpr % 16 == 0  # a block's 16 vectors on 16 adjacent lanes

    @cute.jit
    def __call__(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mQ: cute.Tensor,
                 mS: cute.Tensor, stream: cuda.CUstream):
        assert mX.element_type == self.dtype and mQ.element_type == cutlass.Uint8
        tl = self.tiling
        token_ctas = cute.ceil_div(mX.shape[0], tl.rows_per_cta)
        grid = token_ctas
        if const_expr(self.zero_empty):
            grid = token_ctas + cute.ceil_div(mQ.shape[0], tl.rows_per_cta)
        self.kernel(mX, mScatter, mGather, mQ, mS, token_ctas).launch(
            grid=[grid, 1, 1], block=[tl.threads, 1, 1], stream=stream)

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

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mScatter: cute.Tensor, mGather: cute.Tensor, mQ: cute.Tensor,
               mS: cute.Tensor, token_ctas: Int32):
        tl, vec, S = self.tiling, self.vec, self.S
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        group = tidx // tl.tpr
        lane = tidx % tl.tpr
        ld = load_atom(self.dtype)
        st = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), cutlass.Uint8, num_bits_per_copy=64)
        frag = cute.make_rmem_tensor((vec, tl.iters), self.dtype)
        qfrag = cute.make_rmem_tensor((vec, tl.iters), FP8)
        qbytes = cute.recast_tensor(qfrag, cutlass.Uint8)  # stored as bytes (the tensor is a uint8 view)
        sfrag = cute.make_rmem_tensor((tl.iters,), Float32)
        if bidx < token_ctas:
            tok = bidx * tl.rows_per_cta + group
            active = tok < mX.shape[0]  # every lane runs the shuffles
            dst = cute.make_rmem_tensor((S,), Int32)
            for j in cutlass.range_constexpr(S):
                dst[j] = Int32(-1)
                if active:
                    dst[j] = mScatter[tok, j]
            for c in cutlass.range(tl.chunks, unroll=1):
                base = c * (tl.tpr * tl.iters) + lane
                frag.fill(0)
                if active:
                    load_chunk(ld, row_vectors(mX, tok, vec), frag, base, tl)
                for i in cutlass.range_constexpr(tl.iters):
                    v = frag[None, i].load().to(Float32)
                    hi = v.reduce(cute.ReductionOp.MAX, -Float32.inf, reduction_profile=0)
                    lo = v.reduce(cute.ReductionOp.MIN, Float32.inf, reduction_profile=0)
                    amax = cute.arch.warp_reduction(cute.arch.fmax(hi, -lo), cute.arch.fmax, threads_in_group=16)
                    inv, scale = self.scales(amax)
                    qfrag[None, i].store((v * inv).to(FP8))
                    sfrag[i] = scale
                for j in cutlass.range_constexpr(S):
                    if active and dst[j] >= 0:
                        self.store_row(st, qbytes, sfrag, mQ, mS, dst[j], base, lane)
        else:
            if const_expr(self.zero_empty):  # rows no slot points at: quantized zeros
                row = (bidx - token_ctas) * tl.rows_per_cta + group
                inv, scale = self.scales(Float32(0.0))
                qfrag.fill(0)
                for i in cutlass.range_constexpr(tl.iters):
                    sfrag[i] = scale
                if row < mQ.shape[0]:
                    if mGather[row] == -1:
                        for c in cutlass.range(tl.chunks, unroll=1):
                            self.store_row(st, qbytes, sfrag, mQ, mS, row, c * (tl.tpr * tl.iters) + lane, lane)

    @cute.jit
    def store_row(self, st, qfrag: cute.Tensor, sfrag: cute.Tensor, mQ: cute.Tensor, mS: cute.Tensor, row: Int32,
                  base: Int32, lane: Int32):
        """This thread's vectors of a chunk (and, on a block's first lane, its scale) to ``row``."""
        tl = self.tiling
        gRow = row_vectors(mQ, row, self.vec)
        for i in cutlass.range_constexpr(tl.iters):
            col = base + i * tl.tpr
            if col < tl.nvec:
                cute.copy(st, qfrag[None, i], gRow[None, col])
                if lane % 16 == 0:
                    mS[row, col // 16] = sfrag[i]


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
