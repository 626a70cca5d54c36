"""The interface every implementation (torch, compile, quack, cute) exposes, and the
schema of its configuration (``conf/impl/*.yaml``).

A stage an implementation lacks, or a case (device, dtype, shape) it cannot handle,
raises :class:`Unsupported` with the reason; the bench turns it into an ``unsupported``
row. Implementations never fall back to another implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING

from moebench.errors import ConfigError, Unsupported
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata

__all__ = ["STAGES", "Impl", "ImplConfig", "Unsupported", "accepted"]

STAGES = ("route", "metadata", "pack", "combine")


def accepted(key: str, value, options) -> None:
    """A one-line ConfigError unless ``value`` is one of ``options``."""
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted: {', '.join(map(str, options))}")


@dataclass
class ImplConfig:
    """The schema of an implementation's config: the class that implements the stages
    (``_target_``, instantiated with the other fields as keyword arguments) and its name.
    Implementations with options subclass it; ``__post_init__`` checks their values (it runs
    when the job is resolved, before anything is measured)."""

    _target_: str = MISSING
    name: str = MISSING


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
    #: does it run a whole MoE layer of its own (:meth:`layer`), the ``total`` row of ``bench=moe_layer``?
    fused_layer = False
    #: the ``stage_impl`` of that row
    layer_label = ""

    def __init__(self, name: str | None = None, **options):
        if name is not None:
            self.name = name
        self.options = options

    # -- capability --------------------------------------------------------------------
    def exact_ties_for(self, router: RouterSpec) -> bool:
        """Does this implementation resolve equal scores like the reference for ``router``?"""
        return self.exact_ties

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

    def select(self, logits: torch.Tensor, k: int, router: RouterSpec, bias: torch.Tensor | None = None,
               out: tuple[torch.Tensor, torch.Tensor] | None = None):
        """logits [T, E] -> (ids [T, k] int32, values [T, k]): the k largest logits, no weights
        (for routers whose selection is a top-k of the logits, ``Router.selects_logits``)."""
        raise self.missing("select")

    def metadata(self, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: CapacitySpec,
                 num_rows: int | None = None) -> RoutingMetadata:
        raise self.missing("metadata")

    def route_metadata(self, logits: torch.Tensor, k: int, router: RouterSpec, bias: torch.Tensor | None = None,
                       num_experts: int | None = None, capacity: CapacitySpec | None = None,
                       num_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, RoutingMetadata]:
        """logits [T, E] -> (ids, weights, metadata): the route, then the metadata of its ids
        (``num_experts`` defaults to E, ``capacity`` to dropless). An implementation that does
        both in fewer launches overrides it; the results are those of the two stages."""
        ids, w = self.route(logits, k, router, bias)
        E = num_experts if num_experts is not None else logits.shape[1]
        return ids, w, self.metadata(ids, w, E, capacity if capacity is not None else CapacitySpec(), num_rows)

    def pack(self, x: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        raise self.missing("pack")

    def combine(self, y: torch.Tensor, meta: RoutingMetadata, out: torch.Tensor | None = None,
                weighted: bool = True) -> torch.Tensor:
        raise self.missing("combine")

    def pack_fp8(self, x: torch.Tensor, meta: RoutingMetadata, quant: str,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack and quantize (``routing.pack_fp8``): (q [R, H] float8_e4m3fn, scales [R, H / 128]
        fp32) for ``quant`` in ``routing.QUANTS`` (not ``none``); rows past the last aligned
        block (``gather_idx == BEYOND``) need not be written."""
        raise self.missing(f"pack (quant={quant})")

    def layer(self, x: torch.Tensor, router_w: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, k: int,
              router: RouterSpec, training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The implementation's own whole MoE layer (``fused_layer``): x [T, H], the router's
        weight [E, H], the experts' W1 [E, 2I, H] (gate rows, then up rows) and W2 [E, H, I]
        -> (out [T, H], the logits [T, E] it routed on); differentiable when ``training``."""
        raise self.missing("fused layer")

    # -- backward (training) -------------------------------------------------------------
    def route_backward(self, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       d_weights: torch.Tensor, router: RouterSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
        """d_logits [T, E] (the logits' dtype) from d_weights [T, S] through the router's weights
        of the experts ``ids`` (the selection, and a selection bias, have no gradient)."""
        raise self.missing("route backward")

    def pack_backward(self, d_packed: torch.Tensor, meta: RoutingMetadata) -> torch.Tensor:
        """d_x [T, H] = sum over a token's kept slots of d_packed[scatter_idx[t, j]]."""
        raise self.missing("pack backward")

    def combine_backward(self, d_out: torch.Tensor, y: torch.Tensor, meta: RoutingMetadata,
                         weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(d_y [R, H], d_w [T, S] fp32): d_y[scatter_idx[t, j]] = w[t, j] * d_out[t] (zero rows
        where no kept slot points), d_w[t, j] = <d_out[t], y[scatter_idx[t, j]]> (0 when dropped)."""
        raise self.missing("combine backward")

    def stage(self, name: str):
        return getattr(self, name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
