"""The gate weights of a token's k selected slots, from the selected scores (``wts``, fp32, in
registers): what the route kernel (``moebench.kernels.router``) applies after its selection,
and the softmax's denominator over all E (``prob``) from a lane group's share of the row."""

from __future__ import annotations

import math

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from moebench.kernels.lanes import lane_group_reduce, tree

_LOG2E = math.log2(math.e)


def _add(a, b):
    return a + b


@cute.jit
def inv_row_sum(x: cute.Tensor, base: Int32, row_max: Float32, V: cutlass.Constexpr[int], E: cutlass.Constexpr[int],
                G: cutlass.Constexpr[int]) -> Float32:
    """1 / the sum over a token's E experts of exp(x - row_max), this lane holding ``x[:V]`` of
    experts ``base ..`` in a group of G lanes (the softmax's denominator)."""
    terms = []
    for v in cutlass.range_constexpr(V):
        term = cute.math.exp2((x[v] - row_max) * _LOG2E, fastmath=True)
        if base + v >= E:
            term = Float32(0.0)
        terms.append(term)
    return Float32(1.0) / lane_group_reduce(_add, tree(_add, terms), G)


@cute.jit
def slot_weights(wts: cute.Tensor, k: cutlass.Constexpr[int], weight: cutlass.Constexpr[str],
                 temperature: cutlass.Constexpr[float], renormalize: cutlass.Constexpr[bool],
                 scaling: cutlass.Constexpr[float]):
    """``wts[:k]`` in place: ``softmax_k`` (softmax over the k, / temperature), ``sum_k`` (over
    their signed sum, / temperature; the sum clamped only where it is >= 0, like the reference),
    ``one``; other weightings as they are. Then renormalised over the k (``renormalize``) and
    scaled."""
    if const_expr(weight in ("softmax_k", "sum_k")):
        if const_expr(temperature != 1.0):
            for j in cutlass.range_constexpr(k):
                wts[j] = wts[j] / Float32(temperature)
        if const_expr(weight == "softmax_k"):
            mk = wts[0]
            for j in cutlass.range_constexpr(1, k):
                mk = cute.arch.fmax(mk, wts[j])
            for j in cutlass.range_constexpr(k):
                wts[j] = cute.math.exp2((wts[j] - mk) * _LOG2E, fastmath=True)
            _divide_by_sum(wts, k, False)
        else:
            _divide_by_sum(wts, k, True)
    elif const_expr(weight == "one"):
        for j in cutlass.range_constexpr(k):
            wts[j] = Float32(1.0)
    if const_expr(renormalize):
        _divide_by_sum(wts, k, False, 1e-20)
    if const_expr(scaling != 1.0):
        for j in cutlass.range_constexpr(k):
            wts[j] = wts[j] * Float32(scaling)


@cute.jit
def _divide_by_sum(wts: cute.Tensor, k: cutlass.Constexpr[int], clamp_nonnegative: cutlass.Constexpr[bool],
                   floor: cutlass.Constexpr[float] = 0.0):
    """``wts[:k]`` over their sum (added in slot order): the sum at least ``floor`` (> 0), or
    (``clamp_nonnegative``) at least 1e-20 where it is >= 0."""
    tot = wts[0]
    for j in cutlass.range_constexpr(1, k):
        tot += wts[j]
    if const_expr(floor > 0):
        tot = cute.arch.fmax(tot, Float32(floor))
    if const_expr(clamp_nonnegative):
        if tot >= Float32(0.0):
            tot = cute.arch.fmax(tot, Float32(1e-20))
    for j in cutlass.range_constexpr(k):
        wts[j] = wts[j] / tot
