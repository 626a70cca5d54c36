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

    def pack_fp8(self, x, meta, quant, out=None):
        return routing.pack_fp8(x, meta, quant)

    # backward: torch autograd of the reference forward (on the inputs as given)
    def route_backward(self, logits, ids, weights, d_weights, router, bias=None):
        return routing.route_backward(logits, ids, d_weights, router, bias)

    def pack_backward(self, d_packed, meta):
        return routing.pack_backward(d_packed, meta)

    def combine_backward(self, d_out, y, meta, weighted=True):
        return routing.combine_backward(d_out, y, meta, weighted)
