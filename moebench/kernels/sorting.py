"""Sorting networks over registers, for the route kernel's merge selection
(``moebench.kernels.router``, ``merge=True``).

A lane's keys are a static list of values (held in registers); a *network* is a static list of
compare-exchanges, each one min and one max, so the selection has no branch and no shared
memory. The lowest ``n`` (a power of two) of a lane group's keys, ascending:

    each lane:   sort its keys in chunks of n (Batcher's odd-even merge sort), then fold the
                 chunks into one: the lowest n of two ascending lists a, b are
                 min(a[i], b[n-1-i]) (a bitonic sequence), sorted by a bitonic merge
    the group:   the same fold with the list of the lane ``g ^ 2**s`` (n xor shuffles), for
                 each of log2(G) steps; every lane ends with the group's lowest n

Per key, a chunk sort and fold cost about (log2(n)^2 / 4 + log2(n) / 2 + 1) compare-exchanges
instead of one min per key and slot of the per-slot selection. ``None`` stands for a key known
at compile time to lose (a padding slot past a lane's last key): its compare-exchanges are left
out. ``lo`` / ``hi`` default to CuTeDSL's min / max; plain Python ints work too (the tests).
"""

from __future__ import annotations

import math

import cutlass

from moebench.kernels.lanes import tree


def batcher_pairs(n: int) -> list[tuple[int, int]]:
    """The compare-exchanges (i < j: the lower value to i) of Batcher's odd-even merge sort of
    ``n`` (a power of two) elements: 1 / 5 / 19 / 63 for n 2 / 4 / 8 / 16."""
    assert n >= 1 and n & (n - 1) == 0
    pairs = []
    p = 1
    while p < n:
        q = p
        while q >= 1:
            for j in range(q % p, n - q, 2 * q):
                for i in range(min(q, n - j - q)):
                    if (i + j) // (2 * p) == (i + j + q) // (2 * p):
                        pairs.append((i + j, i + j + q))
            q //= 2
        p *= 2
    return pairs


def bitonic_merge_pairs(n: int) -> list[tuple[int, int]]:
    """The compare-exchanges that sort a bitonic sequence of ``n`` (a power of two) ascending:
    half-cleaners of n, n / 2, .., 2 (n / 2 * log2(n) of them)."""
    assert n >= 1 and n & (n - 1) == 0
    pairs = []
    step = n // 2
    while step >= 1:
        pairs += [(i, i + step) for i in range(n) if not i & step]
        step //= 2
    return pairs


def _exchange(vals: list, pairs, lo, hi) -> list:
    vals = list(vals)
    for i, j in pairs:
        a, b = vals[i], vals[j]
        if b is None:
            continue
        if a is None:
            vals[i], vals[j] = b, None
        else:
            vals[i], vals[j] = lo(a, b), hi(a, b)
    return vals


def sort_ascending(vals: list, lo=cutlass.min, hi=cutlass.max) -> list:
    """``vals`` (a power-of-two length, None last-ranked) sorted ascending."""
    return _exchange(vals, batcher_pairs(len(vals)), lo, hi)


def lowest_of_two(a: list, b: list, lo=cutlass.min, hi=cutlass.max) -> list:
    """The lowest n of two ascending lists of n (a power of two), ascending."""
    n = len(a)
    assert len(b) == n
    c = [x if y is None else y if x is None else lo(x, y) for x, y in zip(a, reversed(b))]
    return _exchange(c, bitonic_merge_pairs(n), lo, hi)


def _lowest_of(vals: list, lo):
    """The lowest of ``vals`` (None: last-ranked), pairwise; None if all are."""
    vals = [v for v in vals if v is not None]
    return tree(lo, vals) if vals else None


def next_of_two(a: list, b: list, lo=cutlass.min, hi=cutlass.max):
    """The n + 1-th lowest of two ascending lists of n: the lowest of the upper half
    max(a[i], b[n-1-i]) (None if every pair holds a padding slot)."""
    return _lowest_of([None if x is None or y is None else hi(x, y) for x, y in zip(a, reversed(b))], lo)


def lowest(vals: list, n: int, lo=cutlass.min, hi=cutlass.max, with_next: bool = False):
    """The lowest ``n`` (a power of two, at most len(vals)) of a lane's ``vals``, ascending; with
    ``with_next``, also the n + 1-th lowest (None where the lane has n keys or fewer): the lowest
    of what each fold drops, so the keys need not be kept for one more pass."""
    assert n & (n - 1) == 0 and 1 <= n <= len(vals)
    chunks = [list(vals[c:c + n]) for c in range(0, len(vals), n)]
    chunks[-1] += [None] * (n - len(chunks[-1]))
    top = sort_ascending(chunks[0], lo, hi)
    nxt = None
    for chunk in chunks[1:]:
        chunk = sort_ascending(chunk, lo, hi)
        if with_next:
            nxt = _lowest_of([nxt, next_of_two(top, chunk, lo, hi)], lo)
        top = lowest_of_two(top, chunk, lo, hi)
    return (top, nxt) if with_next else top


def group_lowest(vals: list, n: int, G: int, shuffle, lo=cutlass.min, hi=cutlass.max, with_next: bool = False):
    """The lowest ``n`` of a lane group's keys (``vals`` this lane's, G lanes a power of two up to
    a warp), ascending, in every lane of the group; ``shuffle(x, offset)`` = x of lane ^ offset.
    With ``with_next``, also the group's n + 1-th lowest (None where the group has n keys or fewer)."""
    top, nxt = lowest(vals, n, lo, hi, True) if with_next else (lowest(vals, n, lo, hi), None)
    for s in range(int(math.log2(G))):
        other = [None if x is None else shuffle(x, 1 << s) for x in top]
        if with_next:  # every lane holds the same static pattern of padding slots
            nxt = _lowest_of([nxt, None if nxt is None else shuffle(nxt, 1 << s), next_of_two(top, other, lo, hi)], lo)
        top = lowest_of_two(top, other, lo, hi)
    return (top, nxt) if with_next else top
