"""Routing semantics: the torch reference every implementation is checked against.

Everything an implementation must compute is defined here, once:

* routers   -- logits [T, E] -> expert ids [T, S] and gate weights [T, S]
* capacity  -- which (token, slot) assignments an expert keeps
* metadata  -- the one representation pack, combine and every kernel share
* pack      -- tokens to expert-contiguous rows
* combine   -- weighted un-permute back to token order (fp32 accumulation)

Conventions
-----------
* ``S`` is the number of slots per token: ``topk`` for every router except
  ``expert_choice``, where it is ``E`` (slot ``j`` is expert ``j``; unused slots hold -1).
* An expert id of -1 means "no expert in this slot"; it is never packed.
* Ties break toward the lower expert index (selection), and toward the lower token
  index (capacity ranking, expert choice), deterministically.
* Nothing here synchronises with the host in the dropless and capacity cases, so the
  whole metadata build can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

# --------------------------------------------------------------------------------------
# The routing-metadata representation
# --------------------------------------------------------------------------------------


@dataclass
class RoutingMetadata:
    """Where every (token, slot) assignment goes, in the form every kernel consumes.

    Packed layout: rows ``offsets[e] : offsets[e] + counts[e]`` hold expert ``e``'s tokens,
    in token order. Rows that hold no token (the tail past the last kept row under a
    capacity, or the padding of ``pad_to_capacity``) have ``gather_idx == -1`` and are
    written as zeros by pack.

    Fields (all on the device of the routing, int32 indices):
      counts       [E]       kept assignments per expert
      offsets      [E + 1]   first packed row of each expert; ``offsets[E]`` is the end of
                             the last expert's block (``E * capacity`` when padded)
      gather_idx   [R]       source token of each packed row, -1 for an empty row
      scatter_idx  [T, S]    packed row of each (token, slot), -1 when dropped or unused
      weights      [T, S]    fp32 gate weights in token order; 0 where scatter_idx is -1
                             (renormalised over kept slots when asked)
      routed_counts [E]      assignments per expert before capacity (the load)
      capacity     per-expert capacity, or None when dropless
    """

    num_experts: int
    counts: torch.Tensor
    offsets: torch.Tensor
    gather_idx: torch.Tensor
    scatter_idx: torch.Tensor
    weights: torch.Tensor
    routed_counts: torch.Tensor
    capacity: int | None = None
    padded: bool = False

    @property
    def num_tokens(self) -> int:
        return self.scatter_idx.shape[0]

    @property
    def num_slots(self) -> int:
        return self.scatter_idx.shape[1]

    @property
    def num_rows(self) -> int:
        return self.gather_idx.shape[0]

    @property
    def may_have_empty_rows(self) -> bool:
        """Static: can some packed row hold no token (so pack must zero it)?"""
        return self.capacity is not None or self.padded

    def packed_weights(self) -> torch.Tensor:
        """Gate weights in packed order [R] (0 for empty rows)."""
        out = torch.zeros(self.num_rows + 1, dtype=torch.float32, device=self.weights.device)
        idx = self.scatter_idx.flatten().long()
        idx = torch.where(idx >= 0, idx, self.num_rows)
        out.scatter_(0, idx, self.weights.flatten())
        return out[: self.num_rows]


@torch.compiler.assume_constant_result
def _ceil_capacity(factor: float, tokens: int, topk: int, experts: int) -> int:
    """ceil(factor * tokens * topk / experts), exact for ``factor`` as written: float rounding
    would make 1.1 * 50 * 1 / 5 = 11.000000000000002 and the capacity 12 instead of 11."""
    return math.ceil(Fraction(repr(float(factor))) * tokens * topk / experts)


@dataclass(frozen=True)
class CapacitySpec:
    """Capacity policy. ``factor=None`` means dropless."""

    factor: float | None = None
    min_capacity: int = 1
    drop_policy: str = "position"  # position | probs
    pad_to_capacity: bool = False
    renormalize_after_drop: bool = False

    DROP_POLICIES = ("position", "probs")

    @property
    def dropless(self) -> bool:
        return self.factor is None

    def capacity(self, tokens: int, topk: int, experts: int) -> int | None:
        """ceil(cf * T * k / E), at least ``min_capacity``; None when dropless."""
        if self.factor is None:
            return None
        return max(_ceil_capacity(self.factor, tokens, topk, experts), self.min_capacity)

    def packed_rows(self, tokens: int, slots: int, experts: int, num_rows: int | None = None) -> int:
        """Rows of the packed buffer: dropless ``num_rows`` (default every slot, T * S);
        under a capacity ``E * capacity`` when padded, else at most that many kept rows."""
        capacity = self.capacity(tokens, slots, experts)
        if capacity is None:
            return tokens * slots if num_rows is None else num_rows
        return experts * capacity if self.pad_to_capacity else min(tokens * slots, experts * capacity)


# --------------------------------------------------------------------------------------
# Routers
# --------------------------------------------------------------------------------------


def stable_topk(scores: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k in descending order; equal scores resolve toward the lower index."""
    vals, idx = torch.sort(scores, dim=dim, descending=True, stable=True)
    return vals.narrow(dim, 0, k), idx.narrow(dim, 0, k)


def _normalize(w: torch.Tensor) -> torch.Tensor:
    return w / w.sum(-1, keepdim=True).clamp_min(1e-20)


def route_softmax_topk(logits, k, renormalize=False):
    probs = torch.softmax(logits.float(), dim=-1)
    w, ids = stable_topk(probs, k)
    return ids, (_normalize(w) if renormalize else w)


def topk_softmax_weights(vals: torch.Tensor, temperature: float = 1.0, normalize: str = "softmax") -> torch.Tensor:
    """Weights of ``topk_softmax`` from the selected fp32 logits [T, k]."""
    v = vals / temperature if temperature != 1.0 else vals  # v / 1.0 is v: skip the kernel
    if normalize == "softmax":
        return torch.softmax(v, dim=-1)
    if normalize == "sum":
        # divide by the (signed) sum of the k: logits can be negative, so clamp only a sum >= 0
        s = v.sum(-1, keepdim=True)
        return v / torch.where(s < 0, s, s.clamp_min(1e-20))
    raise ValueError(f"topk_softmax normalize={normalize!r}; accepted: softmax, sum")


def route_topk_softmax(logits, k, temperature=1.0, normalize="softmax"):
    vals, ids = stable_topk(logits.float(), k)
    return ids, topk_softmax_weights(vals, temperature, normalize)


def route_topk_hard(logits, k):
    _, ids = stable_topk(logits.float(), k)
    return ids, torch.ones(ids.shape, dtype=torch.float32, device=logits.device)


def route_sigmoid_bias(logits, k, bias=None, scaling=1.0, normalize=True, n_group=None, topk_group=None,
                       score="sigmoid", group_score="top2_sum"):
    """DeepSeek-V3 gate; with ``n_group`` set, node-limited (group-limited) selection.

    Selection uses ``scores + bias``; the weights are the *unbiased* scores of the selected
    experts, normalised over the k (if ``normalize``) and multiplied by ``scaling``.
    A group's score is the sum of its top-2 biased scores (``top2_sum``, V3) or its max (V2).
    """
    x = logits.float()
    scores = torch.sigmoid(x) if score == "sigmoid" else torch.softmax(x, dim=-1)
    choice = scores if bias is None else scores + bias.float()
    if n_group is not None and n_group > 1:
        T, E = choice.shape
        grouped = choice.view(T, n_group, E // n_group)
        if group_score == "top2_sum":
            gscore = stable_topk(grouped, min(2, E // n_group))[0].sum(-1)
        else:
            gscore = grouped.max(-1).values
        _, gidx = stable_topk(gscore, topk_group)
        gmask = torch.zeros(T, n_group, dtype=torch.bool, device=x.device).scatter_(1, gidx, True)
        emask = gmask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(~emask, float("-inf"))
    _, ids = stable_topk(choice, k)
    w = scores.gather(1, ids)
    if normalize:
        w = _normalize(w)
    return ids, w * scaling


def route_hash(logits, k):
    """Fixed token -> expert hash (Hash Layers): no learned gate, unit weights / k.

    We have no token ids, so the hash is of the token position; slot j takes the next
    expert after slot 0's, so the k experts of a token are distinct (k <= E).
    """
    T, E = logits.shape
    t = torch.arange(T, device=logits.device, dtype=torch.int64)
    h = (t * 2654435761) % (2**32)
    first = (h ^ (h >> 16)) % E
    ids = (first[:, None] + torch.arange(k, device=logits.device)[None, :]) % E
    return ids, torch.full((T, k), 1.0 / k, dtype=torch.float32, device=logits.device)


def expert_choice_capacity(tokens: int, k: int, experts: int, capacity_factor: float) -> int:
    """Tokens each expert takes under expert choice: C = ceil(cf * T * k / E), in [1, T]."""
    return min(tokens, max(1, _ceil_capacity(capacity_factor, tokens, k, experts)))


def route_expert_choice(logits, k, capacity_factor=1.0):
    """Expert choice: each expert takes its top-C tokens by softmax score, C = ceil(cf*T*k/E).

    Tokens get a variable number of experts: slots are [T, E], slot j is expert j (-1 if
    expert j did not choose the token). Equal scores resolve toward the lower token index.
    """
    T, E = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    C = expert_choice_capacity(T, k, E, capacity_factor)
    _, tok = stable_topk(probs.t(), C)  # [E, C]
    chosen = torch.zeros(E, T, dtype=torch.bool, device=logits.device).scatter_(1, tok, True).t()
    eids = torch.arange(E, device=logits.device).expand(T, E)
    ids = torch.where(chosen, eids, -1)
    w = torch.where(chosen, probs, 0.0)
    return ids, w


@dataclass(frozen=True)
class RouterSpec:
    """A router and its options, as in ``conf/router/*.yaml``."""

    name: str = "softmax_topk"
    renormalize: bool = False
    temperature: float = 1.0
    normalize: str = "softmax"
    bias_std: float = 0.0
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    score: str = "sigmoid"
    group_score: str = "top2_sum"
    capacity_factor: float = 1.0

    NAMES = ("softmax_topk", "topk_softmax", "sigmoid_bias", "group_limited", "top1", "topk_hard",
             "hash", "expert_choice")

    def num_slots(self, topk: int, experts: int) -> int:
        return experts if self.name == "expert_choice" else topk

    def num_rows(self, tokens: int, topk: int, experts: int) -> int:
        """Packed rows of a dropless routing: every valid assignment has one."""
        if self.name == "expert_choice":
            return experts * expert_choice_capacity(tokens, topk, experts, self.capacity_factor)
        return tokens * topk

    def expert_bias(self, experts: int, device, seed: int = 0) -> torch.Tensor | None:
        """The per-expert selection bias (sigmoid_bias / group_limited), seeded."""
        if self.bias_std == 0.0:
            return None
        g = torch.Generator().manual_seed(seed + 7919)
        return (torch.randn(experts, generator=g) * self.bias_std).to(device)


def route(logits: torch.Tensor, k: int, spec: RouterSpec, bias: torch.Tensor | None = None):
    """Reference router: logits [T, E] -> (ids [T, S] int32, weights [T, S] fp32)."""
    n = spec.name
    if n == "softmax_topk":
        ids, w = route_softmax_topk(logits, k, spec.renormalize)
    elif n == "top1":
        ids, w = route_softmax_topk(logits, 1, False)
    elif n == "topk_softmax":
        ids, w = route_topk_softmax(logits, k, spec.temperature, spec.normalize)
    elif n == "topk_hard":
        ids, w = route_topk_hard(logits, k)
    elif n in ("sigmoid_bias", "group_limited"):
        grouped = n == "group_limited"
        ids, w = route_sigmoid_bias(logits, k, bias, spec.scaling, True,
                                    spec.n_group if grouped else None, spec.topk_group,
                                    spec.score, spec.group_score)
    elif n == "hash":
        ids, w = route_hash(logits, k)
    elif n == "expert_choice":
        ids, w = route_expert_choice(logits, k, spec.capacity_factor)
    else:
        raise ValueError(f"router={n!r}; accepted: {', '.join(RouterSpec.NAMES)}")
    return ids.to(torch.int32), w.float()


def selection_scores(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None = None):
    """The [T, E] scores a top-k router selects on (fp32), or None where selection is not a
    per-token top-k (hash, expert_choice, group_limited's group stage)."""
    x = logits.float()
    if spec.name in ("softmax_topk", "top1"):
        return torch.softmax(x, dim=-1)
    if spec.name in ("topk_softmax", "topk_hard"):
        return x
    if spec.name == "sigmoid_bias":
        s = torch.softmax(x, dim=-1) if spec.score == "softmax" else torch.sigmoid(x)
        return s if bias is None else s + bias.float()
    return None


# --------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


def _bincount(keys: torch.Tensor, size: int) -> torch.Tensor:
    """``torch.bincount(keys, minlength=size)`` for keys in [0, size), without the host sync
    (``keys.max().item()``) torch.bincount does on CUDA."""
    return torch.zeros(size, dtype=torch.int64, device=keys.device).scatter_add_(0, keys, torch.ones_like(keys))


def keep_mask(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int,
              drop_policy: str) -> torch.Tensor:
    """Which assignments an expert with room for ``capacity`` keeps.

    ``position``: first come in token order. ``probs``: the highest gate weights, equal
    weights resolved toward the lower token index.
    """
    T, S = ids.shape
    E = num_experts
    n = T * S
    flat_e = torch.where(ids >= 0, ids, E).flatten().long()
    if drop_policy == "position":
        order = torch.argsort(flat_e, stable=True)
    elif drop_policy == "probs":
        w = torch.where(ids >= 0, weights, float("-inf")).flatten()
        by_weight = torch.argsort(w, descending=True, stable=True)
        order = by_weight[torch.argsort(flat_e[by_weight], stable=True)]
    else:
        raise ValueError(f"drop_policy={drop_policy!r}; accepted: position, probs")
    sorted_e = flat_e[order]
    starts = _exclusive_cumsum(_bincount(flat_e, E + 1))
    rank = torch.arange(n, device=ids.device) - starts[sorted_e]
    keep_sorted = (rank < capacity) & (sorted_e < E)
    keep = torch.empty(n, dtype=torch.bool, device=ids.device)
    keep[order] = keep_sorted
    return keep.view(T, S)


def build_metadata(ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
                   cap: CapacitySpec = CapacitySpec(), num_rows: int | None = None) -> RoutingMetadata:
    """Reference metadata build (no host synchronisation).

    ``num_rows`` bounds the dropless packed size (default T * S, every slot valid).
    """
    T, S = ids.shape
    E = num_experts
    n = T * S
    dev = ids.device
    valid = ids >= 0
    flat_valid_e = torch.where(valid, ids, E).flatten().long()
    routed_counts = _bincount(flat_valid_e, E + 1)[:E].to(torch.int32)

    capacity = cap.capacity(T, S, E)
    R = cap.packed_rows(T, S, E, num_rows)
    kept = valid if capacity is None else keep_mask(ids, weights, E, capacity, cap.drop_policy)

    key = torch.where(kept, ids, E).flatten().long()
    order = torch.argsort(key, stable=True)
    counts_all = _bincount(key, E + 1)
    counts = counts_all[:E].to(torch.int32)
    if capacity is not None and cap.pad_to_capacity:
        offsets = torch.arange(E + 1, device=dev, dtype=torch.int64) * capacity
    else:
        offsets = torch.zeros(E + 1, device=dev, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts_all[:E], 0)
    sorted_key = key[order]
    starts = _exclusive_cumsum(counts_all)
    row = offsets[sorted_key.clamp(max=E)] + (torch.arange(n, device=dev) - starts[sorted_key])
    is_kept = sorted_key < E
    row = torch.where(is_kept, row, -1)

    scatter = torch.empty(n, dtype=torch.int64, device=dev)
    scatter[order] = row
    gather = torch.full((R + 1,), -1, dtype=torch.int64, device=dev)
    gather.scatter_(0, torch.where(is_kept, row, R), order // S)
    gather = gather[:R]

    w = torch.where(kept, weights.float(), 0.0)
    if cap.renormalize_after_drop and capacity is not None:
        w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
    return RoutingMetadata(
        num_experts=E,
        counts=counts,
        offsets=offsets.to(torch.int32),
        gather_idx=gather.to(torch.int32),
        scatter_idx=scatter.view(T, S).to(torch.int32),
        weights=w,
        routed_counts=routed_counts,
        capacity=capacity,
        padded=cap.pad_to_capacity and capacity is not None,
    )


# --------------------------------------------------------------------------------------
# Pack and combine
# --------------------------------------------------------------------------------------


def pack(x: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> packed [R, H]: row r is x[gather_idx[r]], zeros where gather_idx is -1."""
    idx = meta.gather_idx.long()
    if out is None:
        out = x.new_empty(meta.num_rows, x.shape[1])
    torch.index_select(x, 0, idx.clamp(min=0), out=out)
    if meta.may_have_empty_rows:
        out.masked_fill_((idx < 0).unsqueeze(1), 0)
    return out


def combine(y: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None,
            weighted: bool = True) -> torch.Tensor:
    """packed [R, H] -> out [T, H]: out[t] = sum_j w[t, j] * y[scatter_idx[t, j]] over kept
    slots (w = 1 when not ``weighted``), accumulated in fp32, written in y's dtype."""
    T, S = meta.scatter_idx.shape
    idx = meta.scatter_idx.long()
    kept = idx >= 0
    w = meta.weights if weighted else kept.float()
    acc = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
    # a dropped / unused slot reads row 0: zero it, or an inf/NaN there would leak in as 0 * inf
    # (static test: slots can be dropped under a capacity, or be -1 when rows < T * S)
    may_drop = meta.capacity is not None or meta.num_rows < T * S
    for j in range(S):
        rows = y.index_select(0, idx[:, j].clamp(min=0)).float()
        if may_drop:
            rows.masked_fill_(~kept[:, j, None], 0.0)
        acc.addcmul_(rows, torch.where(kept[:, j], w[:, j], 0.0).unsqueeze(1))
    if out is None:
        return acc.to(y.dtype)
    return out.copy_(acc)
