"""Routing semantics: the torch reference every implementation is checked against.

Everything an implementation must compute is defined here, once:

* routers   (``routers``)  -- logits [T, E] -> expert ids [T, S] and gate weights [T, S];
  one class per router holds its semantics
* capacity and metadata (``metadata``) -- which (token, slot) assignments an expert keeps,
  and the one representation pack, combine and every kernel share
* pack and combine (``dispatch``) -- tokens to expert-contiguous rows, and the weighted
  un-permute back to token order (fp32 accumulation)

An expert id of -1 means "no expert in this slot"; it is never packed.
"""

from moebench.routing.dispatch import (FP8_BLOCK, QUANTS, combine, combine_backward, pack, pack_backward, pack_fp8,
                                       quantize_fp8)
from moebench.routing.metadata import (BEYOND, CapacityConfig, CapacitySpec, RoutingMetadata, build_metadata,
                                       ceil_capacity, expert_map, keep_mask, local_metadata)
from moebench.routing.routers import (ROUTERS, Router, RouterSpec, expert_choice_capacity, reference_weights,
                                      route, route_backward, selection_scores, stable_topk, topk_softmax_weights)
from moebench.routing.routers import _normalize  # noqa: F401  (quack's weight epilogue)

__all__ = ["BEYOND", "FP8_BLOCK", "QUANTS", "ROUTERS", "CapacityConfig", "CapacitySpec", "Router", "RouterSpec",
           "RoutingMetadata", "build_metadata", "ceil_capacity", "combine", "combine_backward",
           "expert_choice_capacity", "expert_map", "keep_mask", "local_metadata", "pack", "pack_backward", "pack_fp8", "quantize_fp8",
           "reference_weights", "route", "route_backward", "selection_scores", "stable_topk", "topk_softmax_weights"]
