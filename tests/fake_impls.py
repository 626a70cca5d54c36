"""Deliberately wrong implementations, to prove the harness catches them."""

import torch

from moebench import routing
from moebench.impls.torch_impl import TorchImpl


class SkipsLastRow(TorchImpl):
    """Packs every row but the last: the poisoned output must expose it."""

    name = "skips_last_row"

    def pack(self, x, meta, out=None):
        ref = routing.pack(x, meta)
        out[:-1] = ref[:-1]
        return out


class SwapsExperts(TorchImpl):
    """Routes every token to the reference's experts in reverse slot order."""

    name = "swaps_experts"

    def route(self, logits, k, router, bias=None, out=None):
        ids, w = routing.route(logits, k, router, bias)
        return torch.flip(ids, [1]), torch.flip(w, [1])
