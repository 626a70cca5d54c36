"""How a token's experts spread over a *lane group* (``G`` consecutive threads, a power of two up
to a warp; lane ``g`` holds experts ``g*V .. g*V+V-1``), how many a lane holds by default, and
the reductions and selections over a group: what the route kernel (``moebench.kernels.router``)
and the route backward (``moebench.kernels.backward``) share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.common import VEC_BYTES

#: most experts per lane (register budget) and per token (32 lanes x 32)
MAX_PER_LANE = 32
MAX_EXPERTS = 1024
#: most experts per lane of a *wide* layout (asked for with max_per_lane): only the keyed route
#: holds it (one int32 key an expert, the row read again for the exact selection after a tie),
#: like quack's top-k, 64 values a thread and 4 threads a row at E 256
WIDE_PER_LANE = 64
#: fp32 logits in CTAs of 512 threads or more (128 registers a thread) hold at most this many
#: experts a lane from FP32_NARROW_MIN_E experts and FP32_NARROW_MIN_K slots on (the default,
#: max_per_lane=0): 32 a lane spill 256-268 bytes a thread (ptxas, every fp32 layout of 32 a lane,
#: k 2 to 16), 16 a lane none. H200, T 16384, rotated, route / select us, 32 -> 16 a lane
#: (runs/sample/h200_s10, call 3): E 128 k 8 11.03 / 8.54 -> 8.92 / 7.60, E 256 k 8 17.37 / 12.11
#: -> 14.32 / 12.12; 256 threads a CTA instead (no cap below 255 registers, half the warps):
#: 10.00 / 8.97 and 16.86 / 13.53. k 2 (runs/sample/h200_s14, call 2: 124 -> 64 registers):
#: E 256 12.11 / 8.65 -> 7.99 / 7.38, E 128 6.56 / 5.98 -> 5.39 / 4.75
FP32_LANE_EXPERTS = 16
FP32_NARROW_MIN_E, FP32_NARROW_MIN_K = 128, 2


def tree(op, vals: list):
    """Reduce a static list pairwise (a tree: log2(n) dependent steps, not n); a wide lane's list
    (more than MAX_PER_LANE) first into 8 chains, so half the list is not live at once."""
    if len(vals) > MAX_PER_LANE:
        acc = list(vals[:8])
        for i in range(8, len(vals)):
            acc[i % 8] = op(acc[i % 8], vals[i])
        vals = acc
    while len(vals) > 1:
        vals = [op(vals[i], vals[i + 1]) if i + 1 < len(vals) else vals[i] for i in range(0, len(vals), 2)]
    return vals[0]


def lane_experts(dtype, E: int, k: int, threads: int) -> int:
    """The most experts a lane holds by default (``max_per_lane=0``): FP32_LANE_EXPERTS for fp32
    logits in CTAs of 512 threads or more from FP32_NARROW_MIN_E experts and FP32_NARROW_MIN_K
    slots on, else MAX_PER_LANE."""
    if dtype.width == 32 and threads >= 512 and E >= FP32_NARROW_MIN_E and k >= FP32_NARROW_MIN_K:
        return FP32_LANE_EXPERTS
    return MAX_PER_LANE


def _pow2_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class LaneLayout:
    """How a token's E experts spread over a lane group: ``G`` lanes of ``V`` experts each
    (lane ``g`` holds ``g*V .. g*V+V-1``), loaded as vectors of ``W`` elements."""

    E: int
    G: int
    V: int
    W: int

    @classmethod
    def make(cls, E: int, elem_bytes: int, group_size: int = 0, max_per_lane: int = MAX_PER_LANE) -> "LaneLayout":
        """The fewest experts per lane that fit ``max_per_lane`` (fewer shuffles per slot),
        or, with ``group_size`` (group-limited routers), whole groups per lane."""
        assert 1 <= E <= MAX_EXPERTS and max_per_lane <= WIDE_PER_LANE
        cap = max(max_per_lane, MAX_PER_LANE)
        max_per_lane = max(max_per_lane, -(-E // 32))  # at most a warp per token
        if group_size:
            per_lane = group_size * max(1, max_per_lane // group_size)
            G = _pow2_ceil(-(-E // per_lane))
            V = per_lane if G > 1 else E
        else:
            G = _pow2_ceil(-(-E // max_per_lane))
            V = -(-E // G)
        assert G <= 32 and V <= cap
        # widest vector (up to 16 bytes) that divides both the row and each lane's share
        W = VEC_BYTES // elem_bytes
        while W > 1 and (E % W or V % W):
            W //= 2
        return cls(E, G, V, W)


@cute.jit
def lane_group_reduce(op: cutlass.Constexpr, x, G: cutlass.Constexpr[int]):
    """``op`` over a lane group of ``G`` consecutive lanes (a power of two, up to a warp): xor
    shuffles stay inside the group, and every lane gets the result."""
    for i in cutlass.range_constexpr(int(math.log2(G))):
        x = op(x, cute.arch.shuffle_sync_bfly(x, offset=1 << i))
    return x


@cute.jit
def group_min_index(i: Int32, w: Float32, G: cutlass.Constexpr[int]):
    """The lowest index over a lane group of G, with the value that came with it."""
    for s in cutlass.range_constexpr(int(math.log2(G))):
        oi = cute.arch.shuffle_sync_bfly(i, offset=1 << s)
        ow = cute.arch.shuffle_sync_bfly(w, offset=1 << s)
        if oi < i:
            i = oi
            w = ow
    return i, w


@cute.jit
def select_max(sel: cute.Tensor, src: cute.Tensor, base: Int32, n: cutlass.Constexpr[int],
               src_is_sel: cutlass.Constexpr[bool], G: cutlass.Constexpr[int]):
    """Take the largest of ``sel[:n]`` over a lane group of G (lowest index on ties), mark it
    taken (NaN) and return (its index, ``src`` at it). ``base`` = this lane's first index."""
    m = tree(cute.arch.fmax, [sel[v] for v in range(n)])
    m = lane_group_reduce(cute.arch.fmax, m, G)
    idx = Int32(1 << 30)
    w = m
    for v in cutlass.range_constexpr(n - 1, -1, -1):
        if sel[v] == m:
            idx = base + v
            if const_expr(not src_is_sel):
                w = src[v]
    if const_expr(src_is_sel):
        idx = lane_group_reduce(cutlass.min, idx, G)
    else:
        idx, w = group_min_index(idx, w, G)
    for v in cutlass.range_constexpr(n):
        if base + v == idx:
            sel[v] = Float32.nan
    return idx, w


@cute.jit
def select_keyed(nkeys: cute.Tensor, below: Int32, first: cutlass.Constexpr[bool], V: cutlass.Constexpr[int],
                 G: cutlass.Constexpr[int]) -> Int32:
    """Keyed selection over a lane group of G, V keys a lane (unique, held negated: ``nkeys =
    -key``, INT32_MAX past E): the largest key, among those ``< below`` after the first slot.
    The first is ``-min(nkeys)``; then the max is ``c - min(c - key)`` with ``c = below - 1 +
    2**31`` in wrapping int32, which orders keys ``< below`` first and the taken ones (``>=
    below``, and those past E) last, so nothing is marked. As ``c - key = nkey + c``, a slot
    costs one fused add-min per expert (four independent chains)."""
    m = below
    if const_expr(first):
        m = Int32(0) - lane_group_reduce(cutlass.min, tree(cutlass.min, [nkeys[v] for v in range(V)]), G)
    else:
        c = below + Int32(2**31 - 1)
        nc = min(4, V)
        acc = [nkeys[v] + c for v in range(nc)]
        for v in cutlass.range_constexpr(nc, V):
            acc[v % nc] = cutlass.min(acc[v % nc], nkeys[v] + c)
        m = c - lane_group_reduce(cutlass.min, tree(cutlass.min, acc), G)
    return m
