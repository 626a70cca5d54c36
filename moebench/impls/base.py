"""The interface every implementation (torch, compile, quack, cute) exposes.

A stage an implementation lacks, or a case (device, dtype, shape) it cannot handle,
raises :class:`Unsupported` with the reason; the harness turns it into an
``unsupported`` row. Implementations never fall back to another implementation.
"""

from __future__ import annotations

import torch

from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata

STAGES = ("route", "metadata", "pack", "combine")


class Unsupported(Exception):
    """This implementation cannot run this case; the message is the reason."""


class Impl:
    """Base class: every stage is missing until a subclass provides it.

    Stage methods may write into ``out`` (the harness passes a poisoned buffer for the
    checked run) or return a tensor of their own; the harness checks what is returned.
    """

    name = "base"
    #: resolves equal scores toward the lower expert index exactly like the reference
    exact_ties = True
    #: devices the implementation runs on
    devices = ("cpu", "cuda")

    def __init__(self, name: str | None = None, **options):
        if name is not None:
            self.name = name
        self.options = options

    # -- capability --------------------------------------------------------------------
    def check_device(self, device: torch.device) -> None:
        if device.type not in self.devices:
            raise Unsupported(f"impl={self.name} runs on {'/'.join(self.devices)} only (device={device.type})")

    def missing(self, stage: str) -> Unsupported:
        return Unsupported(f"impl={self.name} has no {stage} stage")

    # -- stages ------------------------------------------------------------------------
    def route(self, logits: torch.Tensor, k: int, router: RouterSpec, bias: torch.Tensor | None = None,
              out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """logits [T, E] -> (ids [T, S] int32, weights [T, S] fp32)."""
        raise self.missing("route")

    def metadata(self, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: CapacitySpec,
                 num_rows: int | None = None) -> RoutingMetadata:
        raise self.missing("metadata")

    def pack(self, x: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        raise self.missing("pack")

    def combine(self, y: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None,
                weighted: bool = True) -> torch.Tensor:
        raise self.missing("combine")

    def stage(self, name: str):
        return getattr(self, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
