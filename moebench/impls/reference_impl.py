"""impl=reference: the oracle itself (``moebench.routing``), eager PyTorch: a stable full sort
for the top-k and the metadata, a per-slot fp32 loop for combine. Every row is checked against
it; as a timed column it shows what the reference costs, not what torch can do (``impl=torch``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moebench import routing
from moebench.impls.base import Impl, ImplConfig


@dataclass
class ReferenceConfig(ImplConfig):
    _target_: str = "moebench.impls.reference_impl.ReferenceImpl"
    name: str = "reference"


class ReferenceImpl(Impl):
    name = "reference"

    def route(self, logits, k, router, bias=None, out=None):
        return routing.route(logits, k, router, bias)

    def select(self, logits, k, router, bias=None, out=None):
        vals, ids = routing.stable_topk(logits, 1 if router.name == "top1" else k)
        return ids.to(torch.int32), vals

    def metadata(self, ids, weights, num_experts, capacity, num_rows=None):
        return routing.build_metadata(ids, weights, num_experts, capacity, num_rows)

    def pack(self, x, meta, out=None):
        return routing.pack(x, meta, out)

    def combine(self, y, meta, out=None, weighted=True):
        return routing.combine(y, meta, out, weighted)
