"""The route kernel's sorting networks (moebench.kernels.sorting) on plain Python ints: the
networks sort every 0-1 input (so every input), and a lane group's fold leaves every lane with
the group's lowest n, with padding slots (None) and any number of keys a lane."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("cutlass")

from moebench.kernels import sorting as ks  # noqa: E402


@pytest.mark.parametrize("n,pairs", [(1, 0), (2, 1), (4, 5), (8, 19), (16, 63)])
def test_batcher_networks_sort_every_zero_one_input(n, pairs):
    assert len(ks.batcher_pairs(n)) == pairs
    for bits in range(1 << n):
        v = [(bits >> i) & 1 for i in range(n)]
        assert ks.sort_ascending(v, min, max) == sorted(v)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_bitonic_merge_sorts_bitonic_sequences(n):
    assert len(ks.bitonic_merge_pairs(n)) == n // 2 * (n.bit_length() - 1)
    for bits in range(1 << n):  # ascending then descending halves, all 0-1 ones
        v = [(bits >> i) & 1 for i in range(n)]
        a, b = sorted(v[: n // 2]), sorted(v[n // 2:], reverse=True)
        assert ks._exchange(a + b, ks.bitonic_merge_pairs(n), min, max) == sorted(a + b)


def test_group_lowest_is_the_groups_lowest_n_in_every_lane():
    r = random.Random(0)
    for _ in range(3000):
        V = r.choice([1, 2, 3, 4, 5, 8, 12, 16, 20, 32])
        n = r.choice([m for m in (1, 2, 4, 8, 16) if m <= V])
        G = r.choice([1, 2, 4, 8, 32])
        lanes = [[r.randrange(40) for _ in range(V)] for _ in range(G)]
        tops = [ks.lowest(lane, n, min, max) for lane in lanes]
        s = 1
        while s < G:  # what group_lowest's xor shuffles give lane g at step s
            tops = [ks.lowest_of_two(tops[g], tops[g ^ s], min, max) for g in range(G)]
            s *= 2
        want = sorted(x for lane in lanes for x in lane)[:n]
        assert all(t == want for t in tops), (V, n, G)
    # the DSL entry point, its shuffle given: one lane
    assert ks.group_lowest([5, 3, 9, 1], 2, 1, None, min, max) == [1, 3]


def test_with_next_is_the_groups_next_key_after_the_lowest_n():
    """``with_next``: the n + 1-th lowest of the group (None where it holds n keys or fewer), the
    fp32 route's tie check without a pass over the keys after the networks."""
    r = random.Random(1)
    for _ in range(3000):
        V = r.choice([1, 2, 3, 4, 5, 8, 12, 16, 20, 32, 64])
        n = r.choice([m for m in (1, 2, 4, 8, 16) if m <= V])
        G = r.choice([1, 2, 4, 8, 32])
        lanes = [[r.randrange(40) for _ in range(V)] for _ in range(G)]
        got = [ks.lowest(lane, n, min, max, with_next=True) for lane in lanes]
        for lane, (top, nxt) in zip(lanes, got):
            want = sorted(lane)
            assert top == want[:n] and nxt == (want[n] if V > n else None), (V, n)
        s = 1
        while s < G:  # group_lowest's xor shuffles at step s
            got = [(ks.lowest_of_two(got[g][0], got[g ^ s][0], min, max),
                    ks._lowest_of([got[g][1], got[g ^ s][1], ks.next_of_two(got[g][0], got[g ^ s][0], min, max)], min))
                   for g in range(G)]
            s *= 2
        want = sorted(x for lane in lanes for x in lane)
        assert all(g == (want[:n], want[n] if len(want) > n else None) for g in got), (V, n, G)
    assert ks.group_lowest([5, 3, 9, 1], 2, 1, None, min, max, with_next=True) == ([1, 3], 5)
    assert ks.group_lowest([5, 3], 2, 1, None, min, max, with_next=True) == ([3, 5], None)


def test_padding_slots_lose():
    assert ks.lowest([7, 5, 2], 2, min, max) == [2, 5]  # chunks [7, 5] and [2, padding]
    assert ks.sort_ascending([None, 3, None, 1], min, max) == [1, 3, None, None]
    assert ks.lowest_of_two([1, None], [0, 4], min, max) == [0, 1]
