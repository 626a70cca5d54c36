"""impl=torch: the reference itself, eager PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

from moebench import routing
from moebench.impls.base import Impl, ImplConfig


@dataclass
class TorchConfig(ImplConfig):
    _target_: str = "moebench.impls.torch_impl.TorchImpl"
    name: str = "torch"


class TorchImpl(Impl):
    name = "torch"

    def route(self, logits, k, router, bias=None, out=None):
        return routing.route(logits, k, router, bias)

    def metadata(self, ids, weights, num_experts, capacity, num_rows=None):
        return routing.build_metadata(ids, weights, num_experts, capacity, num_rows)

    def pack(self, x, meta, out=None):
        return routing.pack(x, meta, out)

    def combine(self, y, meta, out=None, weighted=True):
        return routing.combine(y, meta, out, weighted)
