"""Routers (moebench.routing.route) against slow per-token loop references.

Every reference below is written independently of moebench.routing: the scores are the same
fp32 tensors the code computes (softmax / sigmoid / plain logits of ``logits.float()``), the
*selection* is plain Python sorting with explicit ``(-score, index)`` keys, and the weights are
recomputed in float64. Cases include forced ties: logits quantised to a few values, coarse bf16
inputs, duplicated columns and all-equal rows.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench import routing as R

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------

MODES = ("randn", "quantized", "bf16", "bf16_coarse", "dupcols", "zeros", "wide")
SHAPES = [(1, 1, 1), (1, 6, 6), (7, 6, 2), (33, 16, 4), (20, 8, 8), (50, 5, 3)]  # (T, E, k)


def case_logits(mode: str, T: int, E: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mode == "randn":
        return torch.randn(T, E, generator=g)
    if mode == "quantized":  # five values: ties everywhere
        return torch.randint(-2, 3, (T, E), generator=g).float()
    if mode == "bf16":
        return torch.randn(T, E, generator=g).to(torch.bfloat16)
    if mode == "bf16_coarse":  # ~5 distinct bf16 values around 1
        return (1 + 0.02 * torch.randn(T, E, generator=g)).to(torch.bfloat16)
    if mode == "dupcols":  # columns copied from a narrower base: exact duplicate experts
        base = torch.randn(T, max(1, E // 2), generator=g)
        return base[:, torch.randint(0, base.shape[1], (E,), generator=g)]
    if mode == "zeros":
        return torch.zeros(T, E)
    if mode == "wide":  # distinct logits whose fp32 softmax underflows to 0 / sigmoid saturates to 1
        return 80 * torch.randn(T, E, generator=g)
    raise ValueError(mode)


def _top(row: list[float], cands, k: int) -> list[int]:
    """Top-k of ``row`` among ``cands``: higher score first, equal scores -> lower index."""
    return sorted(cands, key=lambda e: (-row[e], e))[:k]


# --------------------------------------------------------------------------------------
# Loop references
# --------------------------------------------------------------------------------------


def ref_softmax_topk(logits, k, renormalize):
    p = torch.softmax(logits.float(), dim=-1)  # the fp32 scores the router selects on
    ids, ws = [], []
    for t in range(logits.shape[0]):
        row = p[t].tolist()
        sel = _top(row, range(len(row)), k)
        w = [row[e] for e in sel]
        if renormalize:
            s = math.fsum(w)
            w = [v / s for v in w]
        ids.append(sel)
        ws.append(w)
    return ids, ws


def ref_topk_softmax(logits, k, temperature, normalize):
    x = logits.float()
    ids, ws = [], []
    for t in range(x.shape[0]):
        row = x[t].tolist()
        sel = _top(row, range(len(row)), k)
        v = [row[e] / temperature for e in sel]
        if normalize == "softmax":
            m = max(v)
            ex = [math.exp(a - m) for a in v]
            w = [a / math.fsum(ex) for a in ex]
        else:
            s = math.fsum(v) or 1.0  # a zero sum is compared nowhere (ill-conditioned)
            w = [a / s for a in v]
        ids.append(sel)
        ws.append(w)
    return ids, ws


def ref_deepseek(logits, k, bias, scaling, n_group, topk_group, score, group_score):
    """sigmoid_bias (n_group None/1) and group_limited, one token at a time."""
    x = logits.float()
    s = torch.sigmoid(x) if score == "sigmoid" else torch.softmax(x, dim=-1)
    choice = s if bias is None else s + bias.float()  # fp32, as the router adds them
    T, E = x.shape
    ids, ws = [], []
    for t in range(T):
        c, sc = choice[t].tolist(), s[t].tolist()
        cands = list(range(E))
        if n_group is not None and n_group > 1:
            G = E // n_group
            gscore = []
            for g in range(n_group):
                vals = sorted(c[g * G:(g + 1) * G], reverse=True)
                if group_score == "top2_sum" and len(vals) >= 2:
                    gscore.append(float(np.float32(vals[0]) + np.float32(vals[1])))  # fp32 add
                else:
                    gscore.append(vals[0])
            groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
            cands = [e for e in range(E) if e // G in groups]
        sel = _top(c, cands, k)
        w = [sc[e] for e in sel]
        # the sum is clamped at (fp32) 1e-20, as HF's V3 adds 1e-20: where every selected score
        # underflows (sigmoid(-100) = 0) the weights stay 0 (not NaN) and are not normalised
        tot = max(math.fsum(w), float(np.float32(1e-20)))
        ids.append(sel)
        ws.append([v / tot * scaling for v in w])
    return ids, ws


def ref_hash(T, E, k):
    ids = []
    for t in range(T):
        h = (t * 2654435761) % 2**32
        first = (h ^ (h >> 16)) % E
        ids.append([(first + j) % E for j in range(k)])
    return ids, [[float(np.float32(1.0 / k))] * k for _ in range(T)]  # 1/k as an fp32 weight


def ref_expert_choice(logits, k, cf):
    T, E = logits.shape
    C = min(T, max(1, math.ceil(Fraction(cf) * T * k / E)))
    p = torch.softmax(logits.float(), dim=-1)
    ids = [[-1] * E for _ in range(T)]
    ws = [[0.0] * E for _ in range(T)]
    for e in range(E):
        col = p[:, e].tolist()
        for t in sorted(range(T), key=lambda t: (-col[t], t))[:C]:
            ids[t][e] = e
            ws[t][e] = col[t]
    return ids, ws, C


def assert_route(got, ref_ids, ref_w, *, exact_weights=False, rtol=2e-6, atol=1e-7, weight_rows=None):
    ids, w = got
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == w.shape == (len(ref_ids), len(ref_ids[0]))
    assert ids.tolist() == ref_ids
    rw = torch.tensor(ref_w, dtype=torch.float64)
    if weight_rows is not None:
        w, rw = w[weight_rows], rw[weight_rows]
    if exact_weights:
        assert torch.equal(w.double(), rw)
    else:
        torch.testing.assert_close(w.double(), rw, rtol=rtol, atol=atol)


grid = pytest.mark.parametrize("mode", MODES)
shapes = pytest.mark.parametrize("T,E,k", SHAPES)

# --------------------------------------------------------------------------------------
# Per-router comparisons against the loop references
# --------------------------------------------------------------------------------------


@grid
@shapes
@pytest.mark.parametrize("renormalize", [False, True])
def test_softmax_topk_matches_loop(mode, T, E, k, renormalize):
    x = case_logits(mode, T, E, seed=T * 31 + E)
    got = R.route(x, k, R.RouterSpec(name="softmax_topk", renormalize=renormalize))
    ids, w = ref_softmax_topk(x, k, renormalize)
    assert_route(got, ids, w, exact_weights=not renormalize)


@grid
@shapes
def test_top1_is_switch_softmax_top1(mode, T, E, k):
    x = case_logits(mode, T, E, seed=7 + T)
    got = R.route(x, 1, R.RouterSpec(name="top1"))
    ids, w = ref_softmax_topk(x, 1, False)
    assert_route(got, ids, w, exact_weights=True)


@grid
@shapes
@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_topk_softmax_matches_loop(mode, T, E, k, temperature):
    x = case_logits(mode, T, E, seed=11 * T + E)
    got = R.route(x, k, R.RouterSpec(name="topk_softmax", temperature=temperature))
    ids, w = ref_topk_softmax(x, k, temperature, "softmax")
    assert_route(got, ids, w, rtol=1e-5, atol=1e-6)


@grid
@shapes
def test_topk_softmax_sum_normalise_matches_loop(mode, T, E, k):
    x = case_logits(mode, T, E, seed=13 * T + E)
    got = R.route(x, k, R.RouterSpec(name="topk_softmax", normalize="sum", temperature=2.0))
    ids, w = ref_topk_softmax(x, k, 2.0, "sum")
    # w = v / sum(v) is ill-conditioned where the sum of the k logits is ~0: compare the rest
    sums = torch.tensor([math.fsum(x.float()[t, i].tolist()) for t, i in enumerate(ids)])
    ok = sums.abs() > 1e-2
    assert_route(got, ids, w, rtol=1e-5, atol=1e-6, weight_rows=ok)
    assert torch.isfinite(got[1]).all()


def test_topk_softmax_sum_divides_by_the_signed_sum():
    """Negative logits: w = v / sum(v), so the weights still sum to 1 (no clamp to 1e-20)."""
    x = torch.tensor([[-1.0, -2.0, -3.0], [0.5, -0.3, -1.0], [4.0, 1.0, 2.0]])
    ids, w = R.route(x, 2, R.RouterSpec(name="topk_softmax", normalize="sum"))
    assert ids.tolist() == [[0, 1], [0, 1], [0, 2]]
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 2 / 3], [2.5, -1.5], [4 / 6, 2 / 6]]))
    torch.testing.assert_close(w.sum(-1), torch.ones(3))


@grid
@shapes
def test_topk_hard_matches_loop(mode, T, E, k):
    x = case_logits(mode, T, E, seed=17 * T + E)
    got = R.route(x, k, R.RouterSpec(name="topk_hard"))
    xf = x.float()
    ids = [_top(xf[t].tolist(), range(E), k) for t in range(T)]
    assert_route(got, ids, [[1.0] * k] * T, exact_weights=True)


def _bias(kind, E, seed):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        return 0.1 * torch.randn(E, generator=g)
    return 0.25 * torch.randint(0, 2, (E,), generator=g).float()  # ties among equal-bias experts


@grid
@shapes
@pytest.mark.parametrize("bias_kind", [None, "randn", "quantized"])
def test_sigmoid_bias_matches_loop(mode, T, E, k, bias_kind):
    x = case_logits(mode, T, E, seed=19 * T + E)
    bias = _bias(bias_kind, E, T)
    got = R.route(x, k, R.RouterSpec(name="sigmoid_bias", scaling=2.5, n_group=2, topk_group=1), bias)
    # sigmoid_bias ignores n_group: group-limited selection is router=group_limited
    ids, w = ref_deepseek(x, k, bias, 2.5, None, None, "sigmoid", "top2_sum")
    assert_route(got, ids, w)


GROUP_CASES = [  # (E, n_group, topk_group, k)
    (8, 4, 2, 1), (8, 4, 2, 4), (12, 3, 1, 4), (16, 8, 4, 8), (16, 8, 4, 3), (6, 6, 3, 2), (4, 1, 1, 2),
    (8, 2, 2, 8),
]


@pytest.mark.parametrize("mode", ["randn", "quantized", "bf16_coarse", "dupcols", "zeros"])
@pytest.mark.parametrize("E,n_group,topk_group,k", GROUP_CASES)
@pytest.mark.parametrize("score,group_score,bias_kind", [
    ("sigmoid", "top2_sum", "randn"), ("sigmoid", "top2_sum", "quantized"), ("sigmoid", "top2_sum", None),
    ("sigmoid", "max", "randn"), ("softmax", "max", None), ("softmax", "top2_sum", "quantized"),
])
def test_group_limited_matches_loop(mode, E, n_group, topk_group, k, score, group_score, bias_kind):
    T = 24
    x = case_logits(mode, T, E, seed=E * 100 + n_group * 10 + k)
    bias = _bias(bias_kind, E, E + k)
    spec = R.RouterSpec(name="group_limited", n_group=n_group, topk_group=topk_group, score=score,
                        group_score=group_score, scaling=2.5)
    got = R.route(x, k, spec, bias)
    ids, w = ref_deepseek(x, k, bias, 2.5, n_group, topk_group, score, group_score)
    assert_route(got, ids, w)


@grid
@shapes
def test_hash_matches_formula(mode, T, E, k):
    x = case_logits(mode, T, E)
    got = R.route(x, k, R.RouterSpec(name="hash"))
    ids, w = ref_hash(T, E, k)
    assert_route(got, ids, w, exact_weights=True)


@grid
@pytest.mark.parametrize("T,E,k", [(1, 1, 1), (1, 6, 2), (7, 6, 2), (33, 16, 4), (20, 8, 8), (50, 5, 3), (9, 4, 4)])
@pytest.mark.parametrize("cf", [0.5, 1.0, 1.25, 2.0, 100.0])
def test_expert_choice_matches_loop(mode, T, E, k, cf):
    x = case_logits(mode, T, E, seed=23 * T + E)
    spec = R.RouterSpec(name="expert_choice", capacity_factor=cf)
    ids, w = R.route(x, k, spec)
    rids, rw, C = ref_expert_choice(x, k, cf)
    assert_route((ids, w), rids, rw, exact_weights=True)
    assert ((ids >= 0).sum(0) == C).all()  # every expert takes exactly C tokens
    assert spec.num_slots(k, E) == E
    assert spec.num_rows(T, k, E) == E * C == int((ids >= 0).sum())


# --------------------------------------------------------------------------------------
# Tie-breaking, by hand
# --------------------------------------------------------------------------------------


def test_ties_break_toward_the_lower_expert_index_by_hand():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [2.0, 1.0, 2.0, 1.0, 2.0]])
    for name in ("softmax_topk", "topk_softmax", "topk_hard", "sigmoid_bias"):
        ids, _ = R.route(x, 2, R.RouterSpec(name=name))
        assert ids.tolist() == [[1, 2], [0, 1], [0, 2]], name
        ids, _ = R.route(x, 4, R.RouterSpec(name=name))
        assert ids.tolist() == [[1, 2, 4, 3], [0, 1, 2, 3], [0, 2, 4, 1]], name
    ids, _ = R.route(x, 1, R.RouterSpec(name="top1"))
    assert ids.tolist() == [[1], [0], [0]]
    # group_limited: groups {0,1}, {2,3}: equal group scores -> group 0 (lower index)
    ids, w = R.route(torch.zeros(1, 4), 2, R.RouterSpec(name="group_limited", n_group=2, topk_group=1))
    assert ids.tolist() == [[0, 1]]


def test_expert_choice_ties_break_toward_the_lower_token_index_by_hand():
    x = torch.zeros(5, 2)  # every prob 0.5; C = ceil(1 * 5 * 1 / 2) = 3
    ids, w = R.route(x, 1, R.RouterSpec(name="expert_choice"))
    assert ids.tolist() == [[0, 1], [0, 1], [0, 1], [-1, -1], [-1, -1]]
    assert w.tolist() == [[0.5, 0.5]] * 3 + [[0.0, 0.0]] * 2
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # C = 2
    ids, _ = R.route(x, 1, R.RouterSpec(name="expert_choice"))
    assert ids.tolist() == [[-1, 1], [0, -1], [-1, 1], [0, -1]]


def test_selection_is_on_the_fp32_scores_not_the_logits():
    """Distinct logits can have equal fp32 scores (softmax underflow, sigmoid saturation):
    selection is on the scores, so those tie and resolve toward the lower index."""
    x = torch.tensor([[-200.0, -150.0, 0.0]])  # softmax: [0, 0, 1]
    ids, w = R.route(x, 2, R.RouterSpec(name="softmax_topk"))
    assert ids.tolist() == [[2, 0]] and w.tolist() == [[1.0, 0.0]]
    ids, _ = R.route(x, 2, R.RouterSpec(name="topk_hard"))  # on logits: -150 beats -200
    assert ids.tolist() == [[2, 1]]
    x = torch.tensor([[30.0, 40.0, 50.0, 0.0]])  # sigmoid: [1, 1, 1, 0.5]
    ids, w = R.route(x, 2, R.RouterSpec(name="sigmoid_bias"))
    assert ids.tolist() == [[0, 1]] and w.tolist() == [[0.5, 0.5]]
    _, w = R.route(torch.full((1, 3), -200.0), 2, R.RouterSpec(name="sigmoid_bias"))  # all scores 0
    assert w.tolist() == [[0.0, 0.0]]  # the 1e-20 clamp: zeros, not NaN


def test_tie_modes_really_produce_ties():
    """The forced-tie inputs do put equal scores across the top-k boundary (else the
    tie tests above would prove nothing)."""
    for mode in ("quantized", "bf16_coarse", "dupcols", "wide"):
        x = case_logits(mode, 33, 16, seed=33 * 31 + 16).float()
        if mode == "wide":
            x = torch.softmax(x, -1)
        srt = x.sort(-1, descending=True).values
        assert (srt[:, 3] == srt[:, 4]).any(), mode  # k = 4 boundary


# --------------------------------------------------------------------------------------
# Semantics by hand
# --------------------------------------------------------------------------------------


def test_mixtral_topk_then_softmax_equals_softmax_topk_renormalised():
    x = torch.randn(256, 8, generator=torch.Generator().manual_seed(3)) * 2
    for k in (1, 2, 3, 8):
        vals, ids = torch.topk(x, k, dim=-1)  # Mixtral: top-k on logits, softmax over the k
        mixtral = torch.softmax(vals, dim=-1)
        got_ids, got_w = R.route(x, k, R.RouterSpec(name="softmax_topk", renormalize=True))
        assert torch.equal(got_ids.long(), ids)
        torch.testing.assert_close(got_w, mixtral, rtol=1e-6, atol=1e-7)
        # and topk_softmax at temperature 1 is the same thing
        t_ids, t_w = R.route(x, k, R.RouterSpec(name="topk_softmax"))
        assert torch.equal(t_ids.long(), ids)
        torch.testing.assert_close(t_w, mixtral, rtol=1e-6, atol=1e-7)


def test_softmax_topk_weights_are_probabilities():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(4))
    ids, w = R.route(x, 4, R.RouterSpec(name="softmax_topk"))
    p = torch.softmax(x.double(), -1)
    torch.testing.assert_close(w.double(), p.gather(1, ids.long()), rtol=1e-6, atol=1e-8)
    assert (w.sum(-1) < 1).all() and (w[:, :-1] >= w[:, 1:]).all()
    _, wn = R.route(x, 4, R.RouterSpec(name="softmax_topk", renormalize=True))
    torch.testing.assert_close(wn.sum(-1), torch.ones(64))
    torch.testing.assert_close(wn, w / w.sum(-1, keepdim=True))


def test_topk_softmax_temperature():
    x = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    _, w1 = R.route(x, 2, R.RouterSpec(name="topk_softmax", temperature=1.0))
    _, w2 = R.route(x, 2, R.RouterSpec(name="topk_softmax", temperature=2.0))
    e1, e2 = math.exp(1.0), math.exp(0.5)
    torch.testing.assert_close(w1, torch.tensor([[e1 / (e1 + 1), 1 / (e1 + 1)]]))
    torch.testing.assert_close(w2, torch.tensor([[e2 / (e2 + 1), 1 / (e2 + 1)]]))
    with pytest.raises(ValueError, match="normalize"):
        R.route(x, 2, R.RouterSpec(name="topk_softmax", normalize="l2"))


def test_sigmoid_bias_selects_with_bias_weights_without():
    x = torch.tensor([[0.0, 0.1, 0.2, 0.3]])
    bias = torch.tensor([0.5, 0.0, 0.0, 0.0])
    ids, w = R.route(x, 2, R.RouterSpec(name="sigmoid_bias", scaling=2.5), bias)
    assert ids.tolist() == [[0, 3]]  # 0.5 + 0.5 beats sigmoid(0.3) = 0.574
    s0, s3 = 1 / (1 + math.exp(-0.0)), 1 / (1 + math.exp(-0.3))
    torch.testing.assert_close(w, torch.tensor([[s0 / (s0 + s3) * 2.5, s3 / (s0 + s3) * 2.5]]))
    ids, w = R.route(x, 2, R.RouterSpec(name="sigmoid_bias", scaling=1.0))  # no bias
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_group_limited_v3_gate_by_hand():
    """Groups {0,1} and {2,3}; biased scores [0.6, 0.6, 0.1, 0.9]: top-2 sums 1.2 vs 1.0 keep
    group 0, though expert 3 is the best single expert; max keeps group 1."""
    x = torch.zeros(1, 4)  # sigmoid = 0.5 each
    bias = torch.tensor([0.1, 0.1, -0.4, 0.4])
    spec = R.RouterSpec(name="group_limited", n_group=2, topk_group=1, scaling=2.5)
    ids, w = R.route(x, 2, spec, bias)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[1.25, 1.25]]))  # unbiased 0.5 / 1.0 * 2.5
    ids, _ = R.route(x, 2, R.RouterSpec(name="group_limited", n_group=2, topk_group=1, group_score="max"), bias)
    assert ids.tolist() == [[3, 2]]
    ids, _ = R.route(x, 2, R.RouterSpec(name="sigmoid_bias"), bias)  # no group limit
    assert ids.tolist() == [[3, 0]]
    # topk_group = n_group: no group is excluded, same as sigmoid_bias
    xr = torch.randn(40, 16, generator=torch.Generator().manual_seed(5))
    b = 0.1 * torch.randn(16, generator=torch.Generator().manual_seed(6))
    a = R.route(xr, 6, R.RouterSpec(name="group_limited", n_group=4, topk_group=4, scaling=2.5), b)
    s = R.route(xr, 6, R.RouterSpec(name="sigmoid_bias", scaling=2.5), b)
    assert torch.equal(a[0], s[0]) and torch.equal(a[1], s[1])


def test_group_limited_selects_only_inside_the_kept_groups():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(8))
    ids, _ = R.route(x, 4, R.RouterSpec(name="group_limited", n_group=8, topk_group=2))
    groups = (ids.long() // 2).tolist()
    assert all(len(set(g)) <= 2 for g in groups)


def test_hash_properties():
    x = torch.randn(500, 8)
    ids, w = R.route(x, 3, R.RouterSpec(name="hash"))
    s = ids.sort(-1).values
    assert (s[:, 1:] != s[:, :-1]).all()  # k distinct experts
    assert torch.equal(w, torch.full((500, 3), 1 / 3))
    # a fixed function of the token position: not of the logits, their dtype, or T
    ids2, _ = R.route(torch.zeros(500, 8, dtype=torch.bfloat16), 3, R.RouterSpec(name="hash"))
    assert torch.equal(ids, ids2)
    ids3, _ = R.route(torch.randn(37, 8), 3, R.RouterSpec(name="hash"))
    assert torch.equal(ids3, ids[:37])
    # roughly balanced over many tokens
    counts = torch.bincount(R.route(torch.zeros(8192, 8), 1, R.RouterSpec(name="hash"))[0].flatten().long(),
                            minlength=8)
    assert counts.max() / counts.float().mean() < 1.2
    assert (counts > 0).all()


def test_expert_choice_with_c_equal_t_chooses_everything():
    x = torch.randn(6, 4)
    ids, w = R.route(x, 2, R.RouterSpec(name="expert_choice", capacity_factor=10.0))  # C = min(T, 30) = 6
    assert torch.equal(ids, torch.arange(4, dtype=torch.int32).expand(6, 4))
    torch.testing.assert_close(w, torch.softmax(x, -1), rtol=0, atol=0)


def test_bf16_logits_route_like_their_fp32_values():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    for name in ("softmax_topk", "topk_softmax", "topk_hard", "sigmoid_bias", "group_limited", "expert_choice"):
        spec = R.RouterSpec(name=name, n_group=4, topk_group=2)
        a, b = R.route(x, 4, spec), R.route(x.float(), 4, spec)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), name


def test_selection_scores_are_what_the_router_selects_on():
    x = case_logits("quantized", 30, 8, seed=1)
    bias = _bias("quantized", 8, 2)
    for name in ("softmax_topk", "top1", "topk_softmax", "topk_hard", "sigmoid_bias"):
        spec = R.RouterSpec(name=name)
        k = 1 if name == "top1" else 3
        ids, _ = R.route(x, k, spec, bias)
        sel = R.selection_scores(x, spec, bias)
        assert sel.shape == (30, 8) and sel.dtype == torch.float32
        top = sel.sort(-1, descending=True).values[:, :k]
        assert torch.equal(sel.gather(1, ids.long()), top), name
    for name in ("hash", "expert_choice", "group_limited"):
        assert R.selection_scores(x, R.RouterSpec(name=name)) is None


def test_unknown_router_is_rejected():
    with pytest.raises(ValueError, match="router='nope'"):
        R.route(torch.zeros(2, 4), 1, R.RouterSpec(name="nope"))


def test_expert_bias_is_seeded():
    spec = R.RouterSpec(name="sigmoid_bias", bias_std=0.1)
    a, b, c = spec.expert_bias(64, "cpu", 0), spec.expert_bias(64, "cpu", 0), spec.expert_bias(64, "cpu", 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.05 < a.std().item() < 0.2
    assert R.RouterSpec(name="sigmoid_bias").expert_bias(64, "cpu") is None


# --------------------------------------------------------------------------------------
# The YAMLs under conf/router
# --------------------------------------------------------------------------------------


def _router_yamls():
    out = []
    for p in sorted((ROOT / "conf" / "router").glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        d.pop("defaults", None)  # the schema (moebench.config) it is checked against
        if "router" in d:  # '# @package _global_' files (top1) nest the router
            d = d["router"]
        out.append(pytest.param(d, id=p.stem))
    return out


@pytest.mark.parametrize("conf", _router_yamls())
def test_every_router_yaml_routes(conf):
    spec = R.RouterSpec(**conf)
    assert spec.name in R.RouterSpec.NAMES
    T, E = 40, 16
    k = 1 if spec.name == "top1" else 4
    x = torch.randn(T, E, generator=torch.Generator().manual_seed(10))
    bias = spec.expert_bias(E, "cpu")
    assert (bias is not None) == (spec.bias_std > 0)
    ids, w = R.route(x, k, spec, bias)
    S = spec.num_slots(k, E)
    assert ids.shape == w.shape == (T, S)
    valid = ids >= 0
    assert (ids[valid] < E).all() and (w[~valid] == 0).all() and torch.isfinite(w).all()
    assert int(valid.sum()) == spec.num_rows(T, k, E)
    meta = R.build_metadata(ids, w, E, R.CapacitySpec(), spec.num_rows(T, k, E))
    assert (meta.gather_idx >= 0).all()  # dropless rows exactly cover the valid assignments


# --------------------------------------------------------------------------------------
# Random cases over every router (hypothesis)
# --------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["softmax_topk", "topk_softmax", "sigmoid_bias", "group_limited", "topk_hard",
                          "expert_choice", "top1"]),
    mode=st.sampled_from(MODES),
    T=st.integers(1, 24),
    n_group=st.sampled_from([1, 2, 4]),
    gsize=st.integers(1, 4),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_random_routes_match_loops(name, mode, T, n_group, gsize, data, seed):
    E = n_group * gsize
    k = 1 if name == "top1" else data.draw(st.integers(1, E), label="k")
    topk_group = data.draw(st.integers(-(-k // gsize), n_group), label="topk_group")  # enough experts for k
    x = case_logits(mode, T, E, seed)
    bias = _bias(data.draw(st.sampled_from([None, "randn", "quantized"]), label="bias"), E, seed + 1)
    spec = R.RouterSpec(name=name, renormalize=bool(seed & 1), n_group=n_group, topk_group=topk_group,
                        scaling=1.5, capacity_factor=0.75 + (seed % 4) * 0.5)
    got = R.route(x, k, spec, bias)
    if name in ("softmax_topk", "top1"):
        ids, w = ref_softmax_topk(x, k, spec.renormalize and name == "softmax_topk")
    elif name == "topk_softmax":
        ids, w = ref_topk_softmax(x, k, 1.0, "softmax")
    elif name == "topk_hard":
        ids, w = [_top(x.float()[t].tolist(), range(E), k) for t in range(T)], [[1.0] * k] * T
    elif name == "expert_choice":
        ids, w, _ = ref_expert_choice(x, k, spec.capacity_factor)
    else:
        grouped = name == "group_limited"
        ids, w = ref_deepseek(x, k, bias, 1.5, n_group if grouped else None, topk_group, "sigmoid", "top2_sum")
    assert_route(got, ids, w, rtol=1e-5, atol=1e-6)
