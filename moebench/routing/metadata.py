"""Capacity and the routing-metadata representation: which (token, slot) assignments an
expert keeps, and where every kept assignment goes in the packed, expert-contiguous layout
that pack, combine and every kernel share.

Nothing here synchronises with the host in the dropless and capacity cases, so the whole
metadata build can be captured in a CUDA graph. Capacity ranking resolves ties toward the
lower token index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from moebench.errors import ConfigError, shown


@dataclass
class RoutingMetadata:
    """Where every (token, slot) assignment goes, in the form every kernel consumes.

    Packed layout: rows ``offsets[e] : offsets[e] + counts[e]`` hold expert ``e``'s tokens,
    in token order. Rows that hold no token (the tail past the last kept row under a
    capacity, or the padding of ``pad_to_capacity``) have ``gather_idx == -1`` and are
    written as zeros by pack. With ``align`` each expert's block starts at a multiple of
    ``align`` rows (a GEMM tile): the rows after its tokens up to the next multiple are padding
    (-1, zeros); the buffer is sized for the most padding there can be, and the rows past
    ``offsets[E]`` belong to no block (``gather_idx == BEYOND``, -2): pack need not write them,
    combine and the expert GEMMs never read them.

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
      align        expert blocks start at multiples of this many rows (1: packed tight)
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
    align: int = 1

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
        return self.capacity is not None or self.padded or self.align > 1

    @property
    def block_rows(self) -> int:
        """Rows of the expert blocks, ``offsets[E]`` when aligned (a host sync), else every row:
        the rows pack writes (the rest are ``BEYOND``)."""
        return int(self.offsets[-1]) if self.align > 1 else self.num_rows

    def packed_weights(self) -> torch.Tensor:
        """Gate weights in packed order [R] (0 for empty rows)."""
        out = torch.zeros(self.num_rows + 1, dtype=torch.float32, device=self.weights.device)
        idx = self.scatter_idx.flatten().long()
        idx = torch.where(idx >= 0, idx, self.num_rows)
        out.scatter_(0, idx, self.weights.flatten())
        return out[: self.num_rows]



@torch.compiler.assume_constant_result
def ceil_capacity(factor: float, tokens: int, topk: int, experts: int) -> int:
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
    #: each expert's block starts at a multiple of ``align`` rows (1: tight)
    align: int = 1

    DROP_POLICIES = ("position", "probs")

    @property
    def dropless(self) -> bool:
        return self.factor is None

    def capacity(self, tokens: int, topk: int, experts: int) -> int | None:
        """ceil(cf * T * k / E), at least ``min_capacity``; None when dropless."""
        if self.factor is None:
            return None
        return max(ceil_capacity(self.factor, tokens, topk, experts), self.min_capacity)

    def aligned(self, rows: int) -> int:
        """``rows`` rounded up to a multiple of ``align``."""
        return -(-rows // self.align) * self.align

    def packed_rows(self, tokens: int, slots: int, experts: int, num_rows: int | None = None) -> int:
        """Rows of the packed buffer: dropless ``num_rows`` (default every slot, T * S);
        under a capacity ``E * capacity`` when padded, else at most that many kept rows. With
        ``align``, the most the aligned blocks can take (each block rounds up by < ``align``)."""
        capacity = self.capacity(tokens, slots, experts)
        spare = experts * (self.align - 1)
        if capacity is None:
            return (tokens * slots if num_rows is None else num_rows) + spare
        if self.pad_to_capacity:
            return experts * self.aligned(capacity)
        return min(tokens * slots + spare, experts * self.aligned(capacity))


@dataclass
class CapacityConfig:
    """The schema of ``conf/capacity``: ``cf`` null is dropless; otherwise each expert keeps at
    most ``max(ceil(cf * T * k / E), min_capacity)`` assignments."""

    cf: float | None = None
    min_capacity: int = 1
    drop_policy: str = "position"
    pad_to_capacity: bool = False
    renormalize_after_drop: bool = False
    align: int = 1  # expert blocks start at multiples of this many rows (a GEMM tile: 16, 64, 128)

    def __post_init__(self):
        cf = self.cf
        if cf is not None and (isinstance(cf, bool) or cf <= 0):
            raise ConfigError(f"capacity.cf={shown(cf)} is not accepted; a number > 0, or null for dropless")
        if self.min_capacity < 1:
            raise ConfigError(f"capacity.min_capacity={self.min_capacity!r} is not accepted; an integer >= 1")
        if self.drop_policy not in CapacitySpec.DROP_POLICIES:
            raise ConfigError(f"capacity.drop_policy={self.drop_policy!r} is not accepted; accepted: "
                              f"{', '.join(CapacitySpec.DROP_POLICIES)}")
        if self.pad_to_capacity and cf is None:
            raise ConfigError("capacity.pad_to_capacity=true needs a capacity factor (capacity.cf=<number>)")
        if isinstance(self.align, bool) or self.align < 1:
            raise ConfigError(f"capacity.align={self.align!r} is not accepted; an integer >= 1 (1: no padding; "
                              "16, 64, 128: a GEMM tile)")

    def spec(self) -> CapacitySpec:
        return CapacitySpec(None if self.cf is None else float(self.cf), self.min_capacity, self.drop_policy,
                            self.pad_to_capacity, self.renormalize_after_drop, self.align)


#: gather_idx of an aligned buffer's rows past the last block (see RoutingMetadata)
BEYOND = -2


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
        offsets = torch.arange(E + 1, device=dev, dtype=torch.int64) * cap.aligned(capacity)
    else:
        offsets = torch.zeros(E + 1, device=dev, dtype=torch.int64)
        blocks = counts_all[:E] if cap.align == 1 else (counts_all[:E] + cap.align - 1) // cap.align * cap.align
        offsets[1:] = torch.cumsum(blocks, 0)
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
    if cap.align > 1:  # the rows past the last (aligned) block: nobody's, left unwritten by pack
        gather = torch.where(torch.arange(R, device=dev) >= offsets[E], BEYOND, gather)

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
        align=cap.align,
    )




# -- rank-local metadata (expert parallelism) ---------------------------------------------------

def expert_map(experts: int, local, device=None) -> torch.Tensor:
    """[E] int32: each global expert's index among the experts a rank holds, -1 for another
    rank's. ``local``: a ``range`` (a contiguous block) or the global ids in local order."""
    ids = torch.as_tensor(list(local), dtype=torch.int64, device=device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= experts or ids.unique().numel() != ids.numel()):
        raise ValueError(f"local experts {list(local)} are not distinct ids in [0, {experts})")
    m = torch.full((experts,), -1, dtype=torch.int32, device=device)
    m[ids] = torch.arange(ids.numel(), dtype=torch.int32, device=device)
    return m


def local_metadata(ids: torch.Tensor, weights: torch.Tensor, experts: int, local,
                   capacity: CapacitySpec = CapacitySpec(), num_rows: int | None = None,
                   build=build_metadata) -> RoutingMetadata:
    """The metadata of one rank's experts: slots that name another rank's expert are empty, the
    local experts are numbered ``0 .. len(local) - 1`` in ``local``'s order, and the packed rows
    hold only theirs. ``build``: the metadata builder (an implementation's ``metadata`` stage)."""
    m = expert_map(experts, local, ids.device)
    lid = torch.where(ids >= 0, m[ids.clamp(min=0).long()], -1).to(torch.int32)
    return build(lid, weights, len(local), capacity, num_rows)
