"""Capacity, routing metadata, pack and combine (moebench.routing).

* the capacity formula and hand-worked examples of every policy (position, probs, padded,
  renormalise after drop), written out in full;
* a slow loop reference of the whole metadata build, compared exactly on random cases;
* hypothesis property tests of the metadata invariants and of pack/combine;
* the seed's two behaviours and adversarial routings;
* no host synchronisation in the metadata build, pack and combine (source scan + a run with
  every host-syncing tensor method made to raise).
"""

from __future__ import annotations

import ast
import inspect
import math
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench import routing as R
from moebench.routing import CapacitySpec, RouterSpec

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------
# Loop reference of the metadata build
# --------------------------------------------------------------------------------------


def ref_metadata(ids, weights, E, cap: CapacitySpec, num_rows=None):
    """Everything build_metadata returns, one assignment at a time."""
    ids, w = ids.tolist(), weights.float().tolist()
    T = len(ids)
    S = len(ids[0])
    c = None if cap.factor is None else max(math.ceil(cap.factor * T * S / E), cap.min_capacity)
    keep = [[False] * S for _ in range(T)]
    for e in range(E):
        cand = [(t, j) for t in range(T) for j in range(S) if ids[t][j] == e]  # token order
        if c is not None:
            if cap.drop_policy == "probs":
                cand.sort(key=lambda tj: (-w[tj[0]][tj[1]], tj[0], tj[1]))
            cand = cand[:c]
        for t, j in cand:
            keep[t][j] = True
    counts = [sum(keep[t][j] and ids[t][j] == e for t in range(T) for j in range(S)) for e in range(E)]
    if c is None:
        rows = T * S if num_rows is None else num_rows
    elif cap.pad_to_capacity:
        rows = E * c
    else:
        rows = min(T * S, E * c)
    if c is not None and cap.pad_to_capacity:
        offsets = [e * c for e in range(E + 1)]
    else:
        offsets = [sum(counts[:e]) for e in range(E + 1)]
    gather = [-1] * rows
    scatter = [[-1] * S for _ in range(T)]
    for e in range(E):
        r = offsets[e]
        for t in range(T):
            for j in range(S):
                if keep[t][j] and ids[t][j] == e:
                    gather[r], scatter[t][j] = t, r
                    r += 1
    wk = [[w[t][j] if keep[t][j] else 0.0 for j in range(S)] for t in range(T)]
    if cap.renormalize_after_drop and c is not None:
        for t in range(T):
            s = math.fsum(wk[t])
            if s > 0:
                wk[t] = [v / s for v in wk[t]]
    routed = [sum(ids[t][j] == e for t in range(T) for j in range(S)) for e in range(E)]
    return dict(counts=counts, offsets=offsets, gather_idx=gather, scatter_idx=scatter, weights=wk,
                routed_counts=routed, capacity=c, rows=rows)


def assert_meta_equals_ref(meta, ref, exact_weights=True):
    for f in ("counts", "offsets", "gather_idx", "scatter_idx", "routed_counts"):
        t = getattr(meta, f)
        assert t.dtype == torch.int32, f
        assert t.tolist() == ref[f], f
    assert meta.capacity == ref["capacity"]
    assert meta.num_rows == ref["rows"]
    assert meta.weights.dtype == torch.float32
    rw = torch.tensor(ref["weights"], dtype=torch.float64).view(meta.weights.shape)
    if exact_weights:
        assert torch.equal(meta.weights.double(), rw)
    else:
        torch.testing.assert_close(meta.weights.double(), rw, rtol=1e-6, atol=1e-7)


def T_(rows, dtype=torch.int32):
    return torch.tensor(rows, dtype=dtype)


# --------------------------------------------------------------------------------------
# The capacity formula
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cf,min_cap,T,k,E,want", [
    (1.0, 1, 8, 2, 4, 4),      # exactly 4, not 5
    (1.25, 1, 8, 2, 4, 5),
    (0.5, 1, 4, 2, 3, 2),      # ceil(1.33)
    (1.0, 1, 3, 1, 4, 1),      # ceil(0.75)
    (0.01, 1, 4, 1, 2, 1),     # the minimum
    (0.1, 3, 4, 1, 2, 3),      # a larger minimum wins
    (2.0, 3, 8, 2, 4, 8),      # ... and loses
    (1.1, 1, 50, 1, 5, 11),    # 1.1 * 50 / 5 = 11 exactly (float rounding says 11.000000000000002)
    (1.1, 1, 100, 1, 11, 10),
    (1.1, 1, 90, 1, 3, 33),
    (1.0, 1, 4096, 8, 64, 512),
    (1.25, 1, 4096, 8, 64, 640),
])
def test_capacity_formula(cf, min_cap, T, k, E, want):
    assert CapacitySpec(cf, min_cap).capacity(T, k, E) == want
    ids = torch.arange(T * k, dtype=torch.int32).view(T, k) % E
    meta = R.build_metadata(ids, torch.ones(T, k), E, CapacitySpec(cf, min_cap))
    assert meta.capacity == want  # build_metadata takes k from ids.shape[1]


def test_dropless_has_no_capacity():
    assert CapacitySpec().dropless and CapacitySpec().capacity(100, 2, 8) is None
    assert not CapacitySpec(1.0).dropless


def test_expert_choice_capacity_uses_the_same_exact_ceil():
    assert R.RouterSpec(name="expert_choice", capacity_factor=1.1).num_rows(50, 1, 5) == 5 * 11
    ids, _ = R.route(torch.randn(50, 5), 1, R.RouterSpec(name="expert_choice", capacity_factor=1.1))
    assert ((ids >= 0).sum(0) == 11).all()


def test_capacity_yamls_map_onto_capacityspec():
    for p in sorted((ROOT / "conf" / "capacity").glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        spec = CapacitySpec(d["cf"], d["min_capacity"], d["drop_policy"], d["pad_to_capacity"],
                            d["renormalize_after_drop"])
        assert spec.drop_policy in CapacitySpec.DROP_POLICIES
        assert spec.dropless == (p.stem == "dropless")
        ids = torch.randint(0, 8, (40, 1), dtype=torch.int32)
        meta = R.build_metadata(ids, torch.rand(40, 1), 8, spec)
        assert meta.padded == (p.stem == "padded")


# --------------------------------------------------------------------------------------
# Hand-worked examples
# --------------------------------------------------------------------------------------

# T = 4 tokens, E = 3 experts, k = 2, cf = 0.5: capacity = ceil(0.5 * 4 * 2 / 3) = ceil(1.33) = 2
EX_IDS = [[0, 1], [0, 2], [0, 1], [1, 0]]
EX_W = [[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]]


def test_hand_position_policy():
    """expert 0 gets (t0,s0) (t1,s0) (t2,s0) (t3,s1): first come keeps t0, t1.
    expert 1 gets (t0,s1) (t2,s1) (t3,s0): keeps t0, t2.   expert 2 gets (t1,s1): keeps it.
    rows (offsets 0, 2, 4, end 5 of R = min(8, 3*2) = 6): e0: t0 t1 | e1: t0 t2 | e2: t1 | empty."""
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W), 3, CapacitySpec(0.5))
    assert meta.capacity == 2
    assert meta.counts.tolist() == [2, 2, 1]
    assert meta.offsets.tolist() == [0, 2, 4, 5]
    assert meta.gather_idx.tolist() == [0, 1, 0, 2, 1, -1]
    assert meta.scatter_idx.tolist() == [[0, 2], [1, 4], [-1, 3], [-1, -1]]
    torch.testing.assert_close(meta.weights, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.0, 0.1], [0.0, 0.0]]),
                               rtol=0, atol=0)
    assert meta.routed_counts.tolist() == [4, 3, 1]
    assert not meta.padded and meta.may_have_empty_rows


def test_hand_probs_policy():
    """expert 0 by weight: t2 .9, t1 .7 | t0 .6, t3 .2 dropped.  expert 1: t3 .8, t0 .4 | t2 .1 dropped.
    Rows stay in token order: e0: t1 t2 | e1: t0 t3 | e2: t1 | empty."""
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W), 3, CapacitySpec(0.5, drop_policy="probs"))
    assert meta.counts.tolist() == [2, 2, 1]
    assert meta.offsets.tolist() == [0, 2, 4, 5]
    assert meta.gather_idx.tolist() == [1, 2, 0, 3, 1, -1]
    assert meta.scatter_idx.tolist() == [[-1, 2], [0, 4], [1, -1], [3, -1]]
    torch.testing.assert_close(meta.weights, torch.tensor([[0.0, 0.4], [0.7, 0.3], [0.9, 0.0], [0.8, 0.0]]),
                               rtol=0, atol=0)


def test_hand_probs_policy_renormalised():
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W), 3,
                            CapacitySpec(0.5, drop_policy="probs", renormalize_after_drop=True))
    torch.testing.assert_close(meta.weights, torch.tensor([[0.0, 1.0], [0.7, 0.3], [1.0, 0.0], [1.0, 0.0]]))
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W), 3, CapacitySpec(0.5, renormalize_after_drop=True))
    # position: t2 keeps only slot 1 (0.1 -> 1.0); t3 keeps nothing (stays 0, not NaN)
    torch.testing.assert_close(meta.weights, torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.0, 1.0], [0.0, 0.0]]))


def test_hand_padded():
    """T = 4, E = 3, k = 1, cf = 1: capacity = ceil(4/3) = 2; padded rows = 6, offsets e * 2.
    ids 2, 0, 2, 2 -> e0: t1 + 1 empty | e1: 2 empty | e2: t0 t2 (t3 dropped, position)."""
    ids, w = T_([[2], [0], [2], [2]]), torch.tensor([[0.5], [0.9], [0.7], [0.6]])
    meta = R.build_metadata(ids, w, 3, CapacitySpec(1.0, pad_to_capacity=True))
    assert meta.padded and meta.capacity == 2 and meta.num_rows == 6
    assert meta.counts.tolist() == [1, 0, 2]
    assert meta.offsets.tolist() == [0, 2, 4, 6]
    assert meta.gather_idx.tolist() == [1, -1, -1, -1, 0, 2]
    assert meta.scatter_idx.tolist() == [[4], [0], [5], [-1]]
    # the same, unpadded: rows = min(4, 6) = 4, contiguous blocks
    meta = R.build_metadata(ids, w, 3, CapacitySpec(1.0))
    assert meta.offsets.tolist() == [0, 1, 1, 3]
    assert meta.gather_idx.tolist() == [1, 0, 2, -1]
    assert meta.scatter_idx.tolist() == [[1], [0], [2], [-1]]
    # probs: expert 2 keeps t2 (.7) and t3 (.6), drops t0 (.5)
    meta = R.build_metadata(ids, w, 3, CapacitySpec(1.0, drop_policy="probs", pad_to_capacity=True))
    assert meta.gather_idx.tolist() == [1, -1, -1, -1, 2, 3]
    assert meta.scatter_idx.tolist() == [[-1], [0], [4], [5]]
    # pack writes zeros in the empty rows, even into a poisoned buffer
    x = torch.arange(1.0, 9.0).view(4, 2)
    out = torch.full((6, 2), float("nan"))
    packed = R.pack(x, meta, out=out)
    assert packed is out
    assert packed.tolist() == [[3, 4], [0, 0], [0, 0], [0, 0], [5, 6], [7, 8]]
    # combine: dropped t0 gets 0, the others their weight times their row
    y = torch.arange(1.0, 13.0).view(6, 2)
    torch.testing.assert_close(R.combine(y, meta), torch.tensor([[0, 0], [0.9, 1.8], [0.7 * 9, 0.7 * 10],
                                                                 [0.6 * 11, 0.6 * 12]]))


def test_hand_probs_ties_go_to_the_lower_token():
    ids = T_([[0], [0], [0], [0], [0]])
    w = torch.tensor([[0.5], [0.5], [0.9], [0.5], [0.1]])
    cap = CapacitySpec(0.4, drop_policy="probs")  # ceil(0.4 * 5 / 1) = 2
    meta = R.build_metadata(ids, w, 1, cap)
    assert meta.scatter_idx.tolist() == [[0], [-1], [1], [-1], [-1]]  # t2 (.9), then t0 of the .5s
    cap = CapacitySpec(0.6, drop_policy="probs")  # 3: t2, t0, t1
    assert R.build_metadata(ids, w, 1, cap).scatter_idx.tolist() == [[0], [1], [2], [-1], [-1]]


def test_hand_keep_mask():
    keep = R.keep_mask(T_(EX_IDS), torch.tensor(EX_W), 3, 2, "position")
    assert keep.tolist() == [[True, True], [True, True], [False, True], [False, False]]
    keep = R.keep_mask(T_(EX_IDS), torch.tensor(EX_W), 3, 2, "probs")
    assert keep.tolist() == [[False, True], [True, True], [True, False], [True, False]]
    keep = R.keep_mask(T_([[-1, 0], [0, -1]]), torch.ones(2, 2), 1, 5, "probs")
    assert keep.tolist() == [[False, True], [True, False]]  # unused slots are never kept
    with pytest.raises(ValueError, match="drop_policy"):
        R.keep_mask(T_(EX_IDS), torch.tensor(EX_W), 3, 2, "random")


def test_hand_dropless():
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W), 3, CapacitySpec())
    assert meta.capacity is None and not meta.may_have_empty_rows
    assert meta.counts.tolist() == [4, 3, 1]
    assert meta.offsets.tolist() == [0, 4, 7, 8]
    assert meta.gather_idx.tolist() == [0, 1, 2, 3, 0, 2, 3, 1]
    assert meta.scatter_idx.tolist() == [[0, 4], [1, 7], [2, 5], [6, 3]]
    assert torch.equal(meta.weights, torch.tensor(EX_W))
    # renormalize_after_drop is about drops: dropless leaves the weights alone
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W) * 2, 3, CapacitySpec(renormalize_after_drop=True))
    assert torch.equal(meta.weights, torch.tensor(EX_W) * 2)


def test_hand_packed_weights():
    meta = R.build_metadata(T_(EX_IDS), torch.tensor(EX_W), 3, CapacitySpec(0.5, drop_policy="probs"))
    # rows: e0: t1 .7, t2 .9 | e1: t0 .4, t3 .8 | e2: t1 .3 | empty
    torch.testing.assert_close(meta.packed_weights(), torch.tensor([0.7, 0.9, 0.4, 0.8, 0.3, 0.0]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# Random cases: the loop reference and the invariants
# --------------------------------------------------------------------------------------


def random_routing(kind, T, E, k, seed):
    """ids [T, S] and weights [T, S] of a few shapes of routing, with ties in the weights."""
    g = torch.Generator().manual_seed(seed)
    if kind == "topk":  # distinct experts per token, quantised weights (ties for probs)
        ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
        w = torch.randint(1, 5, (T, k), generator=g).float() / 4
    elif kind == "skewed":  # most tokens want expert 0 (and then 1, ...)
        logits = torch.randn(T, E, generator=g) - 3 * torch.arange(E).float()
        ids, w = R.route(logits, k, RouterSpec(name="softmax_topk"))
    elif kind == "one_expert":  # every token's first slot on expert E-1
        rest = torch.rand(T, E - 1, generator=g).argsort(-1)[:, : k - 1] if E > 1 else torch.empty(T, 0)
        ids = torch.cat([torch.full((T, 1), E - 1), rest.long()], 1)
        w = torch.rand(T, k, generator=g)
    elif kind == "holes":  # expert-choice-like: slot j is expert j or -1
        ids = torch.where(torch.rand(T, E, generator=g) < 0.5, torch.arange(E), -1)
        ids[0, 0] = 0  # at least one packed row (as expert choice always has)
        w = torch.where(ids >= 0, torch.rand(T, E, generator=g), 0.0)
    else:
        raise ValueError(kind)
    return ids.to(torch.int32), w.float()


@st.composite
def routings(draw):
    T = draw(st.integers(1, 20), label="T")
    E = draw(st.integers(1, 8), label="E")
    k = draw(st.integers(1, E), label="k")
    kind = draw(st.sampled_from(["topk", "skewed", "one_expert", "holes"]), label="kind")
    cf = draw(st.one_of(st.none(), st.sampled_from([0.1, 0.5, 0.75, 1.0, 1.1, 1.25, 2.0, 8.0])), label="cf")
    cap = CapacitySpec(
        cf,
        draw(st.integers(0, 4), label="min_capacity"),
        draw(st.sampled_from(CapacitySpec.DROP_POLICIES), label="drop_policy"),
        cf is not None and draw(st.booleans(), label="pad"),
        draw(st.booleans(), label="renormalize_after_drop"),
    )
    ids, w = random_routing(kind, T, E, k, draw(st.integers(0, 2**20), label="seed"))
    # dropless rows: exactly the valid assignments (the router's num_rows)
    num_rows = int((ids >= 0).sum()) if (kind == "holes" and cf is None) else None
    return ids, w, E, cap, num_rows


def check_invariants(ids, w, E, cap, meta, x):
    T, S = ids.shape
    sc, gi = meta.scatter_idx.long(), meta.gather_idx.long()
    counts, offsets = meta.counts.long(), meta.offsets.long()
    kept = sc >= 0
    R_ = meta.num_rows
    # counts: kept per expert, sum = kept assignments; routed_counts: a bincount of the ids
    assert int(counts.sum()) == int(kept.sum())
    assert torch.equal(counts, torch.bincount(ids[kept].long(), minlength=E)[:E])
    assert torch.equal(meta.routed_counts.long(), torch.bincount(ids[ids >= 0].long(), minlength=E)[:E])
    assert not (kept & (ids < 0)).any()  # an unused slot is never kept
    # offsets: from 0, monotone, room for each expert's block
    assert offsets[0] == 0 and offsets.shape == (E + 1,)
    assert ((offsets[1:] - offsets[:-1]) >= counts).all()
    assert offsets[-1] <= R_ and gi.shape == (R_,)
    if meta.padded:
        assert torch.equal(offsets, torch.arange(E + 1) * meta.capacity) and R_ == E * meta.capacity
    # capacity: no expert over it; an expert drops only when full; dropless keeps all
    routed = meta.routed_counts.long()
    if meta.capacity is None:
        assert torch.equal(kept, ids >= 0)
    else:
        assert torch.equal(counts, routed.clamp(max=meta.capacity))
    # every kept (token, slot) exactly once: scatter rows distinct, gather points back
    rows = sc[kept]
    assert rows.unique().numel() == rows.numel()
    tok = torch.arange(T).unsqueeze(1).expand(T, S)
    assert torch.equal(gi[rows], tok[kept])
    assert int((gi >= 0).sum()) == rows.numel()  # no row claims a token that is not routed there
    # each kept row lies in its expert's block, the block's first counts[e] rows, in token order
    e_of = ids[kept].long()
    assert ((rows >= offsets[e_of]) & (rows < offsets[e_of] + counts[e_of])).all()
    for e in range(E):
        block = gi[offsets[e]: offsets[e] + counts[e]]
        assert (block >= 0).all() and (block[1:] > block[:-1]).all()
        assert (gi[offsets[e] + counts[e]: offsets[e + 1]] == -1).all()
    assert (gi[offsets[-1]:] == -1).all()
    # drop policies: position keeps a token-order prefix; probs keeps the heaviest, ties -> lower token
    if meta.capacity is not None:
        for e in range(E):
            at = (ids == e).nonzero().tolist()
            got = [bool(kept[t, j]) for t, j in at]
            if cap.drop_policy == "position":
                assert got == sorted(got, reverse=True)
            else:
                order = sorted(range(len(at)), key=lambda i: (-float(w[tuple(at[i])]), at[i][0]))
                assert [got[i] for i in order] == sorted(got, reverse=True)
    # weights: 0 where dropped; the router's where kept, or renormalised over the kept slots
    mw = meta.weights
    assert (mw[~kept] == 0).all()
    if cap.renormalize_after_drop and meta.capacity is not None:
        s = torch.where(kept, w, 0.0).sum(-1, keepdim=True)
        torch.testing.assert_close(mw, torch.where(kept, w / s.clamp_min(1e-20), 0.0))
        has = kept.any(1) & (s.squeeze(1) > 0)
        torch.testing.assert_close(mw.sum(-1)[has], torch.ones(int(has.sum())))
    else:
        assert torch.equal(mw[kept], w[kept])
    # packed_weights: the weights in row order, 0 in empty rows
    pw = meta.packed_weights()
    assert pw.shape == (R_,)
    assert torch.equal(pw[rows], mw[kept]) and (pw[gi < 0] == 0).all()
    # pack: row r = x[gather[r]], zeros in empty rows (into a poisoned buffer too)
    packed = R.pack(x, meta, out=torch.full((R_, x.shape[1]), float("nan")))
    assert torch.equal(packed[gi >= 0], x[gi[gi >= 0]])
    assert (packed[gi < 0] == 0).all()
    # combine(pack(x)) with identity experts: the gate-weighted sum over the kept slots
    out = R.combine(packed, meta)
    want = x.double() * mw.double().sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    unweighted = R.combine(packed, meta, weighted=False)
    torch.testing.assert_close(unweighted, x * kept.sum(-1, keepdim=True).float())
    # combine of arbitrary expert outputs, by a loop
    y = torch.randn(R_, x.shape[1], generator=torch.Generator().manual_seed(R_))
    ref = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t, j in kept.nonzero().tolist():
        ref[t] += float(mw[t, j]) * y[sc[t, j]].double()
    torch.testing.assert_close(R.combine(y, meta).double(), ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=250, deadline=None)
@given(routings())
def test_random_metadata_matches_loop_and_invariants(case):
    ids, w, E, cap, num_rows = case
    meta = R.build_metadata(ids, w, E, cap, num_rows)
    assert_meta_equals_ref(meta, ref_metadata(ids, w, E, cap, num_rows),
                           exact_weights=not cap.renormalize_after_drop)
    x = torch.randn(ids.shape[0], 3, generator=torch.Generator().manual_seed(ids.shape[0]))
    check_invariants(ids, w, E, cap, meta, x)


# --------------------------------------------------------------------------------------
# The seed's two behaviours
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,scale", [
    (RouterSpec(name="softmax_topk", renormalize=True), 1.0),
    (RouterSpec(name="topk_softmax"), 1.0),
    (RouterSpec(name="sigmoid_bias", scaling=2.5), 2.5),
    (RouterSpec(name="group_limited", n_group=4, topk_group=2, scaling=2.5), 2.5),
    (RouterSpec(name="hash"), 1.0),
    (RouterSpec(name="topk_hard"), 3.0),
])
def test_identity_routing_is_the_weighted_sum_of_x(spec, scale):
    T, E, k, H = 64, 16, 3, 32
    g = torch.Generator().manual_seed(0)
    logits, x = torch.randn(T, E, generator=g), torch.randn(T, H, generator=g)
    ids, w = R.route(logits, k, spec)
    meta = R.build_metadata(ids, w, E)
    out = R.combine(R.pack(x, meta), meta)
    torch.testing.assert_close(out, x * w.sum(-1, keepdim=True))
    torch.testing.assert_close(out, x * scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", [RouterSpec(name="topk_hard"), RouterSpec(name="softmax_topk", renormalize=True)])
@pytest.mark.parametrize("logits_kind", ["randn", "one_expert"])
@pytest.mark.parametrize("cap", [CapacitySpec(8.0), CapacitySpec(8.0, drop_policy="probs", pad_to_capacity=True),
                                 CapacitySpec(100.0, renormalize_after_drop=True), CapacitySpec()])
def test_top1_with_capacity_at_least_t_returns_x_exactly(dtype, spec, logits_kind, cap):
    T, E, H = 40, 8, 16  # cf 8 = E: capacity = ceil(8 * 40 / 8) = T
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(T, E, generator=g)
    if logits_kind == "one_expert":
        logits[:, 5] += 100
    x = torch.randn(T, H, generator=g).to(dtype)
    ids, w = R.route(logits, 1, spec)
    assert (w == 1).all()
    meta = R.build_metadata(ids, w, E, cap)
    assert meta.capacity is None or meta.capacity >= T
    out = R.combine(R.pack(x, meta), meta)
    assert out.dtype == dtype and torch.equal(out, x)
    buf = torch.full_like(x, float("nan"))
    assert R.combine(R.pack(x, meta), meta, out=buf) is buf and torch.equal(buf, x)


# --------------------------------------------------------------------------------------
# Adversarial routings
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(1.0), CapacitySpec(1.0, drop_policy="probs"),
                                 CapacitySpec(1.0, pad_to_capacity=True, renormalize_after_drop=True)])
def test_all_tokens_on_one_expert(cap):
    T, E, k = 12, 4, 1
    ids = torch.full((T, k), 2, dtype=torch.int32)
    w = torch.linspace(0.1, 0.9, T).unsqueeze(1)
    meta = R.build_metadata(ids, w, E, cap)
    c = T if cap.dropless else 3  # ceil(12 / 4)
    assert meta.counts.tolist() == [0, 0, c, 0]
    assert meta.routed_counts.tolist() == [0, 0, T, 0]
    kept = (meta.scatter_idx >= 0).squeeze(1)
    if cap.dropless or cap.drop_policy == "position":
        assert kept.tolist() == [True] * c + [False] * (T - c)
    else:
        assert kept.tolist() == [False] * (T - c) + [True] * c  # the heaviest are the last
    if cap.pad_to_capacity:
        assert meta.offsets.tolist() == [0, 3, 6, 9, 12] and (meta.gather_idx[:6] == -1).all()
    else:
        assert meta.offsets.tolist() == [0, 0, 0, c, c]
    check_invariants(ids, w, E, cap, meta, torch.randn(T, 4))


def test_experts_with_no_tokens():
    ids = T_([[0, 5], [5, 0], [0, 5]])
    meta = R.build_metadata(ids, torch.ones(3, 2), 7)
    assert meta.counts.tolist() == [3, 0, 0, 0, 0, 3, 0]
    assert meta.offsets.tolist() == [0, 3, 3, 3, 3, 3, 6, 6]
    assert meta.gather_idx.tolist() == [0, 1, 2, 0, 1, 2]
    meta = R.build_metadata(ids, torch.ones(3, 2), 7, CapacitySpec(1.0, pad_to_capacity=True))  # cap 1
    assert meta.offsets.tolist() == list(range(8)) and meta.num_rows == 7
    assert meta.gather_idx.tolist() == [0, -1, -1, -1, -1, 0, -1]
    assert meta.scatter_idx.tolist() == [[0, 5], [-1, -1], [-1, -1]]


@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(0.1), CapacitySpec(1.0, drop_policy="probs"),
                                 CapacitySpec(0.5, pad_to_capacity=True)])
def test_single_token(cap):
    ids, w = R.route(torch.randn(1, 6), 3, RouterSpec(name="softmax_topk"))
    meta = R.build_metadata(ids, w, 6, cap)
    assert_meta_equals_ref(meta, ref_metadata(ids, w, 6, cap))
    x = torch.randn(1, 5)
    check_invariants(ids, w, 6, cap, meta, x)
    assert (meta.scatter_idx >= 0).all()  # min_capacity 1 >= the one token


@pytest.mark.parametrize("cf", [None, 1.0, 0.5])
def test_k_equals_e(cf):
    T, E = 10, 4
    ids, w = R.route(torch.randn(T, E), E, RouterSpec(name="softmax_topk"))
    cap = CapacitySpec(cf)
    meta = R.build_metadata(ids, w, E, cap)
    c = T if cf in (None, 1.0) else 5  # ceil(cf * T * E / E)
    assert meta.routed_counts.tolist() == [T] * E
    assert meta.counts.tolist() == [c] * E
    for e in range(E):  # position: the first c tokens of every expert
        assert meta.gather_idx[meta.offsets[e]: meta.offsets[e + 1]].tolist() == list(range(c))
    check_invariants(ids, w, E, cap, meta, torch.randn(T, 3))


def test_expert_choice_with_c_equal_t():
    T, E, k = 6, 4, 2
    spec = RouterSpec(name="expert_choice", capacity_factor=4.0)  # ceil(4 * 6 * 2 / 4) = 12 -> T
    ids, w = R.route(torch.randn(T, E), k, spec)
    rows = spec.num_rows(T, k, E)
    assert rows == E * T
    meta = R.build_metadata(ids, w, E, CapacitySpec(), rows)
    assert meta.counts.tolist() == [T] * E and (meta.gather_idx >= 0).all()
    assert meta.gather_idx.tolist() == list(range(T)) * E
    x = torch.randn(T, 3)
    check_invariants(ids, w, E, CapacitySpec(), meta, x)
    torch.testing.assert_close(R.combine(R.pack(x, meta), meta), x)  # the softmax sums to 1


def test_expert_choice_metadata():
    T, E, k = 10, 4, 1
    spec = RouterSpec(name="expert_choice")  # C = ceil(10 / 4) = 3
    ids, w = R.route(torch.randn(T, E, generator=torch.Generator().manual_seed(2)), k, spec)
    rows = spec.num_rows(T, k, E)
    meta = R.build_metadata(ids, w, E, CapacitySpec(), rows)
    assert_meta_equals_ref(meta, ref_metadata(ids, w, E, CapacitySpec(), rows))
    assert meta.num_rows == 12 and meta.counts.tolist() == [3] * 4 and (meta.gather_idx >= 0).all()
    check_invariants(ids, w, E, CapacitySpec(), meta, torch.randn(T, 3))


@pytest.mark.parametrize("cap", [CapacitySpec(0.5), CapacitySpec(0.5, pad_to_capacity=True),
                                 CapacitySpec(0.5, drop_policy="probs", renormalize_after_drop=True)])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_combine_ignores_rows_of_dropped_slots(cap, bad):
    """A dropped slot contributes nothing: an inf/NaN expert output in some row must not reach
    tokens that do not use that row (it did, as 0 * inf, through the clamped index 0)."""
    T, E = 8, 2
    ids = torch.zeros(T, 1, dtype=torch.int32)  # capacity ceil(0.5 * 8 / 2) = 2: tokens 2.. drop
    w = torch.linspace(1, 0.2, T).unsqueeze(1)
    meta = R.build_metadata(ids, w, E, cap)
    y = torch.ones(meta.num_rows, 4)
    y[0] = bad  # row 0 belongs to token 0
    out = R.combine(y, meta)
    assert not torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1:]).all()
    assert (out[2:] == 0).all()
    assert torch.isfinite(R.combine(y, meta, weighted=False)[1:]).all()


def test_combine_ignores_unused_expert_choice_slots():
    T, E = 8, 4
    spec = RouterSpec(name="expert_choice")
    ids, w = R.route(torch.randn(T, E), 1, spec)
    meta = R.build_metadata(ids, w, E, CapacitySpec(), spec.num_rows(T, 1, E))
    y = torch.ones(meta.num_rows, 2)
    y[0] = float("nan")
    out = R.combine(y, meta)
    uses_row0 = (meta.scatter_idx == 0).any(1)
    assert torch.isfinite(out[~uses_row0]).all() and not torch.isfinite(out[uses_row0]).all()


# --------------------------------------------------------------------------------------
# No host synchronisation in the metadata build, pack and combine
# --------------------------------------------------------------------------------------

#: tensor methods / torch functions that wait for the device (or copy to the host)
SYNCING = {"item", "tolist", "nonzero", "argwhere", "bincount", "unique", "unique_consecutive",
           "masked_select", "cpu", "numpy", "repeat_interleave", "any", "all", "equal", "allclose",
           "histc", "__bool__", "__int__", "__float__"}
SYNC_FREE = ["build_metadata", "keep_mask", "pack", "combine"]


def syncing_calls(src: str, module_funcs: dict[str, str]) -> list[str]:
    """Names of host-syncing calls in ``src`` and in the module-level functions it calls
    (transitively); also ``if``/``while``/``int()``/``float()``/``bool()`` on non-literals."""
    found, seen, todo = [], set(), [src]
    while todo:
        tree = ast.parse(textwrap.dedent(todo.pop()))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if name in SYNCING:
                    found.append(name)
                if name in ("int", "float", "bool") and node.args and not isinstance(node.args[0], ast.Constant):
                    found.append(f"{name}()")
                if name in module_funcs and name not in seen:
                    seen.add(name)
                    todo.append(module_funcs[name])
            elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Compare):
                found.append("boolean-mask indexing")
    return found


def _module_funcs():
    from moebench.routing import dispatch, metadata

    funcs = {}
    for module in (metadata, dispatch):
        src = inspect.getsource(module)
        funcs.update({n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body
                      if isinstance(n, ast.FunctionDef)})
    return funcs


def test_source_scan_finds_syncs():
    """The scanner itself: it must flag the usual ways to synchronise."""
    funcs = {"helper": "def helper(x):\n    return torch.bincount(x)\n"}
    assert syncing_calls("def f(x):\n    return x.sum().item()\n", {}) == ["item"]
    assert syncing_calls("def f(x):\n    return helper(x)\n", funcs) == ["bincount"]
    assert "nonzero" in syncing_calls("def f(x):\n    return (x > 0).nonzero()\n", {})
    assert "boolean-mask indexing" in syncing_calls("def f(x):\n    return x[x > 0]\n", {})
    assert "int()" in syncing_calls("def f(x):\n    return int(x.sum())\n", {})
    assert syncing_calls("def f(x):\n    return torch.where(x > 0, x, 0)\n", {}) == []


@pytest.mark.parametrize("fn", SYNC_FREE)
def test_no_host_sync_in_source(fn):
    funcs = _module_funcs()
    assert syncing_calls(funcs[fn], funcs) == []


@pytest.mark.parametrize("cap", [CapacitySpec(), CapacitySpec(1.0), CapacitySpec(1.25, drop_policy="probs"),
                                 CapacitySpec(1.0, pad_to_capacity=True, renormalize_after_drop=True)])
def test_no_host_sync_when_run(cap, monkeypatch):
    """Run the build, pack and combine with every host-syncing tensor method raising."""
    ids, w = R.route(torch.randn(64, 8), 2, RouterSpec(name="softmax_topk"))
    x = torch.randn(64, 4)
    ref = R.build_metadata(ids, w, 8, cap)
    ref_out = R.combine(R.pack(x, ref), ref)

    def boom(*a, **k):
        raise AssertionError("host synchronisation")

    for name in ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
                 "any", "all", "unique", "bincount", "masked_select", "argwhere", "repeat_interleave"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for name in ("nonzero", "bincount", "unique", "masked_select", "argwhere", "repeat_interleave", "equal",
                 "allclose", "any", "all"):
        monkeypatch.setattr(torch, name, boom)
    meta = R.build_metadata(ids, w, 8, cap)
    out = R.combine(R.pack(x, meta), meta)
    monkeypatch.undo()
    assert torch.equal(out, ref_out) and torch.equal(meta.scatter_idx, ref.scatter_idx)
