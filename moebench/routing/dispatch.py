"""Pack (tokens to expert-contiguous rows) and combine (weighted un-permute back to token
order, fp32 accumulation): the reference of every implementation's pack and combine."""

from __future__ import annotations

import torch

from moebench.routing.metadata import RoutingMetadata

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
