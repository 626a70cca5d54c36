"""Balance / drop metrics (moebench.metrics) and routing distributions (moebench.logits)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moebench import routing as R
from moebench.logits import KINDS, load_trace, make_logits, zipf_bias
from moebench.metrics import routing_metrics
from moebench.routing import CapacitySpec, RouterSpec

# --------------------------------------------------------------------------------------
# Metrics, by hand
# --------------------------------------------------------------------------------------

# T = 4, E = 3, k = 2, cf = 0.5 -> capacity 2 (see tests/test_capacity.py for the rows)
EX_IDS = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]], dtype=torch.int32)
EX_W = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.8, 0.2]])


def test_metrics_hand_capacity():
    meta = R.build_metadata(EX_IDS, EX_W, 3, CapacitySpec(0.5))
    m = routing_metrics(meta, EX_IDS)
    # routed loads 4, 3, 1: mean 8/3, max/mean 1.5, population std sqrt(14/9)
    assert m["expert_counts"] == [4, 3, 1]
    assert m["load_mean"] == pytest.approx(8 / 3)
    assert m["load_max_over_mean"] == pytest.approx(1.5)
    assert m["load_cv"] == pytest.approx(math.sqrt(14 / 9) / (8 / 3))
    # kept: t0 both, t1 both, t2 slot 1 -> 5 of 8; t3 lost both slots -> 1 of 4 tokens
    assert m["kept_assignments"] == 5
    assert m["avg_drop_rate"] == pytest.approx(3 / 8)
    assert m["token_drop_rate"] == pytest.approx(1 / 4)
    # rows = min(8, 3 * 2) = 6, 5 used
    assert m["padding_waste"] == pytest.approx(1 / 6)
    assert math.isnan(m["gate_entropy"])  # no logits given


def test_metrics_hand_padded():
    ids = torch.tensor([[2], [0], [2], [2]], dtype=torch.int32)
    meta = R.build_metadata(ids, torch.ones(4, 1), 3, CapacitySpec(1.0, pad_to_capacity=True))  # cap 2, 6 rows
    m = routing_metrics(meta, ids)
    assert m["expert_counts"] == [1, 0, 3]
    assert m["load_max_over_mean"] == pytest.approx(3 / (4 / 3))
    assert m["load_cv"] == pytest.approx(math.sqrt(((1 - 4 / 3) ** 2 + (4 / 3) ** 2 + (3 - 4 / 3) ** 2) / 3) / (4 / 3))
    assert m["kept_assignments"] == 3
    assert m["avg_drop_rate"] == pytest.approx(1 / 4)
    assert m["token_drop_rate"] == pytest.approx(1 / 4)
    assert m["padding_waste"] == pytest.approx(1 - 3 / 6)


def test_metrics_dropless_balanced():
    ids = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]], dtype=torch.int32)
    meta = R.build_metadata(ids, torch.full((4, 2), 0.5), 4)
    m = routing_metrics(meta, ids, torch.zeros(4, 4))
    assert m["expert_counts"] == [2, 2, 2, 2]
    assert (m["load_mean"], m["load_max_over_mean"], m["load_cv"]) == (2.0, 1.0, 0.0)
    assert (m["avg_drop_rate"], m["token_drop_rate"], m["padding_waste"]) == (0.0, 0.0, 0.0)
    assert m["kept_assignments"] == 8
    assert m["gate_entropy"] == pytest.approx(math.log(4))  # uniform logits -> log E


def test_metrics_all_on_one_expert():
    T, E = 8, 4
    ids = torch.zeros(T, 1, dtype=torch.int32)
    meta = R.build_metadata(ids, torch.ones(T, 1), E, CapacitySpec(1.0))  # capacity 2
    m = routing_metrics(meta, ids)
    assert m["load_max_over_mean"] == pytest.approx(E)
    assert m["load_cv"] == pytest.approx(math.sqrt(3))  # counts 8,0,0,0: std sqrt(12), mean 2
    assert m["avg_drop_rate"] == pytest.approx(6 / 8)
    assert m["token_drop_rate"] == pytest.approx(6 / 8)
    assert meta.num_rows == 8  # min(T * k, E * capacity) = min(8, 8)
    assert m["padding_waste"] == pytest.approx(1 - 2 / 8)


@pytest.mark.parametrize("E", [1, 2, 8, 64])
def test_gate_entropy(E):
    meta = R.build_metadata(torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1), E)
    ids = torch.zeros(3, 1, dtype=torch.int32)
    assert routing_metrics(meta, ids, torch.full((3, E), 1.7))["gate_entropy"] == pytest.approx(math.log(E), abs=1e-6)
    peaked = torch.zeros(3, E)
    peaked[:, 0] = 200.0  # softmax is one-hot (the others underflow to 0): entropy 0, not NaN
    assert routing_metrics(meta, ids, peaked)["gate_entropy"] == pytest.approx(0.0, abs=1e-6)
    # mean over tokens of -sum p log p; [0, log 3] -> p = [1/4, 3/4]
    lg = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    meta2 = R.build_metadata(torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1), 2)
    got = routing_metrics(meta2, torch.zeros(2, 1, dtype=torch.int32), lg)["gate_entropy"]
    assert got == pytest.approx((h + math.log(2)) / 2, rel=1e-6)


def test_metrics_expert_choice_counts_only_valid_slots():
    ids = torch.tensor([[0, -1], [0, 1], [-1, -1], [-1, 1]], dtype=torch.int32)
    meta = R.build_metadata(ids, (ids >= 0).float(), 2, CapacitySpec(), num_rows=4)
    m = routing_metrics(meta, ids)
    assert m["expert_counts"] == [2, 2] and m["kept_assignments"] == 4
    assert m["avg_drop_rate"] == 0.0
    assert m["token_drop_rate"] == 0.0  # token 2 had no expert: not a dropped token
    assert m["padding_waste"] == 0.0
    # under a capacity of 1 (ceil(0.25 * 4 * 2 / 2)): e0 keeps t0 and drops t1 (which keeps its
    # e1 slot); e1 keeps t1 and drops t3, its only slot. t2 never had a slot, so it counts in
    # neither part of token_drop_rate: 1 (t3) of the 3 routed tokens
    meta = R.build_metadata(ids, (ids >= 0).float(), 2, CapacitySpec(0.25))
    m = routing_metrics(meta, ids)
    assert meta.capacity == 1 and m["kept_assignments"] == 2
    assert m["avg_drop_rate"] == pytest.approx(2 / 4)
    assert m["token_drop_rate"] == pytest.approx(1 / 3)


def test_metrics_nothing_routed():
    ids = torch.full((3, 2), -1, dtype=torch.int32)
    meta = R.build_metadata(ids, torch.zeros(3, 2), 2, CapacitySpec(), num_rows=0)
    m = routing_metrics(meta, ids)
    assert m["load_mean"] == 0.0 and math.isnan(m["load_max_over_mean"]) and math.isnan(m["load_cv"])
    assert (m["avg_drop_rate"], m["token_drop_rate"], m["padding_waste"]) == (0.0, 0.0, 0.0)


def test_metrics_drop_rates_match_counts_on_random_routings():
    for cf in (0.5, 1.0, 1.25):
        logits = make_logits("zipf", 512, 16, seed=1)
        ids, w = R.route(logits, 4, RouterSpec(name="softmax_topk"))
        meta = R.build_metadata(ids, w, 16, CapacitySpec(cf, drop_policy="probs"))
        m = routing_metrics(meta, ids, logits)
        kept = meta.scatter_idx >= 0
        assert m["avg_drop_rate"] == pytest.approx(1 - kept.float().mean().item())
        assert m["token_drop_rate"] == pytest.approx((~kept.any(1)).float().mean().item())
        assert m["padding_waste"] == pytest.approx(1 - kept.sum().item() / meta.num_rows)
        assert m["expert_counts"] == torch.bincount(ids.flatten().long(), minlength=16).tolist()
        assert 0 <= m["token_drop_rate"] <= m["avg_drop_rate"] <= 1


# --------------------------------------------------------------------------------------
# Logits
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uniform", "zipf", "hot"])
def test_logits_seeded(kind):
    a = make_logits(kind, 64, 8, seed=3)
    b = make_logits(kind, 64, 8, seed=3)
    c = make_logits(kind, 64, 8, seed=4)
    assert a.shape == (64, 8) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    h = make_logits(kind, 64, 8, seed=3, dtype=torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(h, a.to(torch.bfloat16))


def test_uniform_is_standard_normal_times_scale():
    x = make_logits("uniform", 4096, 16, seed=0, scale=2.0)
    assert abs(x.mean().item()) < 0.05 and x.std().item() == pytest.approx(2.0, rel=0.03)


def _load(kind, seed=0, T=8192, E=16, k=2, **kw):
    logits = make_logits(kind, T, E, seed=seed, **kw)
    ids, w = R.route(logits, k, RouterSpec(name="softmax_topk"))
    return routing_metrics(R.build_metadata(ids, w, E), ids, logits)


def test_zipf_is_skewed():
    uni, zipf = _load("uniform"), _load("zipf", alpha=1.2)
    assert uni["load_max_over_mean"] < 1.2
    assert zipf["load_max_over_mean"] > 2.0
    assert zipf["load_cv"] > 3 * uni["load_cv"]
    assert zipf["gate_entropy"] < uni["gate_entropy"]
    assert _load("zipf", alpha=2.0)["load_max_over_mean"] > zipf["load_max_over_mean"]


def test_zipf_bias_is_a_seeded_permutation_of_rank_offsets():
    E, alpha = 16, 1.2
    seen = set()
    for seed in range(6):
        b = zipf_bias(E, alpha, torch.Generator().manual_seed(seed))
        want = -alpha * torch.log(torch.arange(1, E + 1).double())
        torch.testing.assert_close(b.sort(descending=True).values.double(), want, rtol=1e-6, atol=1e-6)
        seen.add(int(b.argmax()))
    assert len(seen) > 1  # the popular expert is not always index 0


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_hot_puts_a_fraction_of_tokens_on_the_hot_experts(fraction):
    T, E, n_hot = 20000, 16, 2
    x = make_logits("hot", T, E, seed=5, hot_fraction=fraction, hot_experts=n_hot)
    hot = set(x.mean(0).topk(n_hot).indices.tolist())
    top = x.topk(n_hot, dim=-1).indices.tolist()
    both = sum(set(r) == hot for r in top) / T  # boosted rows; others only by chance 1 / C(16, 2)
    assert both == pytest.approx(fraction + (1 - fraction) / math.comb(E, n_hot), abs=0.015)
    top1 = sum(r[0] in hot for r in top) / T
    assert top1 == pytest.approx(fraction + (1 - fraction) * n_hot / E, abs=0.015)


def test_hot_without_hot_tokens_is_uniform():
    assert torch.equal(make_logits("hot", 100, 8, seed=2, hot_fraction=0.0), make_logits("uniform", 100, 8, seed=2))
    x = make_logits("hot", 1000, 4, seed=2, hot_fraction=1.0, hot_experts=9)  # capped at E: every expert hot
    assert torch.equal(x, make_logits("uniform", 1000, 4, seed=2) + 10.0)


def test_unknown_kind():
    assert set(KINDS) == {"uniform", "zipf", "hot", "from_file"}
    with pytest.raises(ValueError, match="accepted"):
        make_logits("gauss", 4, 4, seed=0)


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".npy"])
def test_from_file_replays(tmp_path, suffix):
    trace = torch.randn(5, 4)
    p = tmp_path / f"trace{suffix}"
    if suffix == ".npy":
        np.save(p, trace.double().numpy())
    else:
        torch.save(trace, p)
    assert torch.equal(load_trace(p).float(), trace)
    x = make_logits("from_file", 12, 4, seed=0, path=str(p))
    assert x.dtype == torch.float32 and x.shape == (12, 4)
    assert torch.equal(x, trace[torch.arange(12) % 5])  # rows repeat to fill the tokens
    assert torch.equal(make_logits("from_file", 3, 4, seed=9, path=str(p)), trace[:3])  # seed plays no part
    assert torch.equal(make_logits("from_file", 5, 4, seed=0, path=p, dtype=torch.bfloat16), trace.to(torch.bfloat16))


def test_from_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a file"):
        make_logits("from_file", 4, 4, seed=0, path=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="is not a file"):
        make_logits("from_file", 4, 4, seed=0, path=str(tmp_path))
    with pytest.raises(ValueError, match="logits.path"):
        make_logits("from_file", 4, 4, seed=0, path=None)
    bad = tmp_path / "trace.txt"
    bad.write_text("1 2 3")
    with pytest.raises(ValueError, match="suffix"):
        make_logits("from_file", 4, 4, seed=0, path=str(bad))
    for name, t in [("1d.pt", torch.randn(8)), ("3d.pt", torch.randn(2, 3, 4)), ("empty.pt", torch.zeros(0, 4))]:
        torch.save(t, tmp_path / name)
        with pytest.raises(ValueError, match=r"expected a \[T, E\] tensor"):
            make_logits("from_file", 4, 4, seed=0, path=str(tmp_path / name))
    torch.save({"logits": torch.randn(4, 4)}, tmp_path / "dict.pt")
    with pytest.raises(ValueError, match=r"expected a \[T, E\] tensor"):
        make_logits("from_file", 4, 4, seed=0, path=str(tmp_path / "dict.pt"))
    np.save(tmp_path / "e6.npy", np.zeros((3, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="E=6 experts but experts=4"):
        make_logits("from_file", 4, 4, seed=0, path=str(tmp_path / "e6.npy"))


def test_zipf_first_choice_popularity_follows_rank_power_law():
    """Each token's first choice is drawn with probability proportional to rank**-alpha."""
    T, E, alpha = 100_000, 16, 1.2
    x = make_logits("zipf", T, E, seed=5, alpha=alpha)
    freq = torch.bincount(x.argmax(1), minlength=E).double().sort(descending=True).values / T
    want = torch.arange(1, E + 1, dtype=torch.float64) ** -alpha
    want /= want.sum()
    assert torch.allclose(freq[:6], want[:6], rtol=0.05), (freq[:6], want[:6])
