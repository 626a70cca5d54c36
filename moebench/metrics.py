"""Balance and drop metrics of a routing (columns of every routing-aware row)."""

from __future__ import annotations

import torch

from moebench.routing import RoutingMetadata


def routing_metrics(meta: RoutingMetadata, ids: torch.Tensor, logits: torch.Tensor | None = None) -> dict:
    """Load statistics over the routed (pre-capacity) per-expert counts, drop and padding
    rates after capacity, and the mean entropy (nats) of softmax(logits) per token.

    ``ids`` are the router's expert ids [T, S] (-1 = unused slot).
    """
    load = meta.routed_counts.double().cpu()
    mean = load.mean().item()
    assigned = (ids >= 0).cpu()
    kept_slots = (meta.scatter_idx >= 0).cpu()
    routed = int(assigned.sum().item())
    kept = int(kept_slots.sum().item())
    had_any = assigned.any(1)
    token_dropped = had_any & ~kept_slots.any(1)
    out = {
        "load_mean": mean,
        "load_max_over_mean": (load.max().item() / mean) if mean > 0 else float("nan"),
        "load_cv": (load.std(unbiased=False).item() / mean) if mean > 0 else float("nan"),
        "expert_counts": [int(v) for v in meta.routed_counts.tolist()],
        "kept_assignments": kept,
        "avg_drop_rate": 1.0 - kept / routed if routed else 0.0,
        "token_drop_rate": token_dropped.sum().item() / max(1, int(had_any.sum().item())),
        # rows of the expert blocks (what pack writes, what the expert GEMMs compute) that hold
        # no token: a capacity's slack, pad_to_capacity, capacity.align's rounding
        "padding_waste": 1.0 - kept / meta.block_rows if meta.block_rows else 0.0,
        "gate_entropy": float("nan"),
    }
    if logits is not None:
        p = torch.softmax(logits.float(), dim=-1)
        out["gate_entropy"] = float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean().item())
    return out
