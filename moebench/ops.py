"""The routing stages as differentiable ``torch.library`` custom ops, for models.

::

    from moebench import ops

    ids, weights = ops.route(logits, k=8, router="softmax_topk")      # [T, k] int32, fp32
    packed, routing = ops.dispatch(x, ids, weights, num_experts=E)     # expert-contiguous rows
    y = experts(packed, routing.offsets)                               # your grouped GEMMs
    out = ops.combine(y, routing)                                      # weighted un-permute

On CUDA the ops run the CuTeDSL kernels of ``impl=cute`` (forward and backward); on the CPU
the torch reference (``moebench.routing``) behind the same API. Each op has a registered
autograd (route: d_logits through the router's weights; dispatch: the packed rows' gradients
summed per token, the kept weights' passed through; combine: d_y and d_weights) and a fake
(meta) implementation, so a block built on them runs under ``torch.compile(fullgraph=True)``
and in CUDA graphs with no host sync. A case the CUDA kernels cannot run raises with the
reason (never a silent switch to another implementation).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from moebench import routing
from moebench.errors import Unsupported
from moebench.impls import torch_impl
from moebench.impls.cute_impl import CuteImpl
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata

_cute = CuteImpl()


#: RouterSpec's fields and their types, in order: the router travels to the ops as one string
_FIELDS = [(f.name, f.type) for f in dataclasses.fields(RouterSpec)]
_TYPES = {"bool": lambda v: v == "True", "float": float, "int": int, "str": str}


def _encode(spec: RouterSpec) -> str:
    return "|".join(str(getattr(spec, name)) for name, _ in _FIELDS)


def _spec(router: str) -> RouterSpec:
    return RouterSpec(**{name: _TYPES[str(t)](v) for (name, t), v in zip(_FIELDS, router.split("|"))})


def _capacity(capacity_factor: float) -> CapacitySpec:
    return CapacitySpec() if capacity_factor <= 0 else CapacitySpec(capacity_factor)


def _meta(scatter: torch.Tensor, weights: torch.Tensor, gather: torch.Tensor, num_experts: int = 0,
          capacity: int | None = None) -> RoutingMetadata:
    """The metadata the kernels read (counts and offsets are not read by pack / combine)."""
    z = scatter.new_zeros(0)
    return RoutingMetadata(num_experts=num_experts, counts=z, offsets=z, gather_idx=gather, scatter_idx=scatter,
                           weights=weights, routed_counts=z, capacity=capacity,
                           padded=False)


def _cuda(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


def _run(fn, *args):
    try:
        return fn(*args)
    except Unsupported as e:
        raise RuntimeError(f"moebench.ops: {e}") from None


# -- route --------------------------------------------------------------------------------

@torch.library.custom_op("moebench::route", mutates_args=())
def _route(logits: torch.Tensor, bias: torch.Tensor | None, k: int, router: str) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _spec(router)
    if _cuda(logits):
        return _run(_cute.route, logits, k, spec, bias)  # fresh outputs (no out= buffers)
    ids, w = routing.route(logits, k, spec, bias)
    return ids.contiguous(), w.contiguous()


@_route.register_fake
def _(logits, bias, k, router):
    S = _spec(router).num_slots(k, logits.shape[1])
    T = logits.shape[0]
    return logits.new_empty(T, S, dtype=torch.int32), logits.new_empty(T, S, dtype=torch.float32)


@torch.library.custom_op("moebench::route_backward", mutates_args=())
def _route_backward(logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, d_weights: torch.Tensor,
                    bias: torch.Tensor | None, router: str) -> torch.Tensor:
    spec = _spec(router)
    if _cuda(logits):
        return _run(_cute.route_backward, logits, ids, weights, d_weights.float().contiguous(), spec, bias)
    return torch_impl.route_backward(logits, ids, weights, d_weights, spec)


@_route_backward.register_fake
def _(logits, ids, weights, d_weights, bias, router):
    return torch.empty_like(logits)


def _route_setup(ctx, inputs, output):
    logits, bias, _, router = inputs
    ctx.save_for_backward(logits, output[0], output[1], bias)
    ctx.router = router


def _route_bwd(ctx, d_ids, d_weights):
    logits, ids, weights, bias = ctx.saved_tensors
    return _route_backward(logits, ids, weights, d_weights, bias, ctx.router), None, None, None


_route.register_autograd(_route_bwd, setup_context=_route_setup)


# -- metadata ----------------------------------------------------------------------------------

@torch.library.custom_op("moebench::metadata", mutates_args=())
def _metadata(ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
              capacity_factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cap = _capacity(capacity_factor)
    meta = (_run(_cute.metadata, ids, weights, num_experts, cap) if _cuda(ids)
            else routing.build_metadata(ids, weights, num_experts, cap))
    kept_w = meta.weights
    if kept_w.data_ptr() == weights.data_ptr():  # dropless: the kernel hands the weights back (a custom op may not alias)
        kept_w = kept_w.clone()
    return meta.counts, meta.offsets, meta.gather_idx, meta.scatter_idx, kept_w


@_metadata.register_fake
def _(ids, weights, num_experts, capacity_factor):
    T, S = ids.shape
    R = _capacity(capacity_factor).packed_rows(T, S, num_experts)
    i32 = torch.int32
    return (ids.new_empty(num_experts, dtype=i32), ids.new_empty(num_experts + 1, dtype=i32),
            ids.new_empty(R, dtype=i32), ids.new_empty(T, S, dtype=i32), weights.new_empty(T, S, dtype=torch.float32))


def _metadata_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3])


def _metadata_bwd(ctx, d_counts, d_offsets, d_gather, d_scatter, d_kept_weights):
    """The kept weights are the weights where a slot is kept: their gradient passes through."""
    (scatter,) = ctx.saved_tensors
    return None, torch.where(scatter >= 0, d_kept_weights, 0.0), None, None


_metadata.register_autograd(_metadata_bwd, setup_context=_metadata_setup)


# -- pack and combine -----------------------------------------------------------------------------

@torch.library.custom_op("moebench::pack", mutates_args=())
def _pack(x: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor, capacity: int) -> torch.Tensor:
    meta = _meta(scatter, scatter.new_zeros(scatter.shape, dtype=torch.float32), gather,
                 capacity=capacity if capacity > 0 else None)
    if _cuda(x):
        return _run(_cute.pack, x, meta)
    return routing.pack(x, meta)


@_pack.register_fake
def _(x, gather, scatter, capacity):
    return x.new_empty(gather.shape[0], x.shape[1])


@torch.library.custom_op("moebench::combine", mutates_args=())
def _combine(y: torch.Tensor, scatter: torch.Tensor, weights: torch.Tensor, weighted: bool, capacity: int) -> torch.Tensor:
    meta = _meta(scatter, weights, scatter.new_zeros(y.shape[0]), capacity=capacity if capacity > 0 else None)
    if _cuda(y):
        return _run(_cute.combine, y, meta, None, weighted)
    return routing.combine(y, meta, weighted=weighted)


@_combine.register_fake
def _(y, scatter, weights, weighted, capacity):
    return y.new_empty(scatter.shape[0], y.shape[1])


@torch.library.custom_op("moebench::combine_backward", mutates_args=())
def _combine_backward(d_out: torch.Tensor, y: torch.Tensor, scatter: torch.Tensor, weights: torch.Tensor,
                      gather: torch.Tensor, weighted: bool, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    meta = _meta(scatter, weights, gather, capacity=capacity if capacity > 0 else None)
    if _cuda(y):
        return _run(_cute.combine_backward, d_out.contiguous(), y, meta, weighted)
    d_y, d_w = torch_impl.combine_backward(d_out, y, meta, weighted)
    return d_y.contiguous(), d_w.contiguous()


@_combine_backward.register_fake
def _(d_out, y, scatter, weights, gather, weighted, capacity):
    return torch.empty_like(y), weights.new_empty(scatter.shape, dtype=torch.float32)


# pack backward = an unweighted combine of the packed rows' gradients
def _pack_setup(ctx, inputs, output):
    x, gather, scatter, capacity = inputs
    ctx.save_for_backward(scatter)
    ctx.capacity = capacity


def _pack_bwd(ctx, d_packed):
    (scatter,) = ctx.saved_tensors
    ones = scatter.new_ones(scatter.shape, dtype=torch.float32)
    return _combine(d_packed.contiguous(), scatter, ones, False, ctx.capacity), None, None, None


_pack.register_autograd(_pack_bwd, setup_context=_pack_setup)


def _combine_setup(ctx, inputs, output):
    y, scatter, weights, weighted, capacity = inputs
    ctx.save_for_backward(y, scatter, weights)
    ctx.weighted, ctx.capacity = weighted, capacity


def _combine_bwd(ctx, d_out):
    y, scatter, weights = ctx.saved_tensors
    gather = _gather_of(scatter, y.shape[0])
    d_y, d_w = _combine_backward(d_out, y, scatter, weights, gather, ctx.weighted, ctx.capacity)
    return d_y, None, (d_w if ctx.weighted else None), None, None


def _gather_of(scatter: torch.Tensor, rows: int) -> torch.Tensor:
    """Which rows some kept slot points at (-1 for the rest): all the backward needs of gather_idx."""
    tok = torch.arange(scatter.shape[0], dtype=torch.int32, device=scatter.device)[:, None].expand_as(scatter)
    g = torch.full((rows + 1,), -1, dtype=torch.int32, device=scatter.device)
    g.scatter_(0, torch.where(scatter >= 0, scatter, rows).flatten().long(), tok.flatten())
    return g[:rows]


_combine.register_autograd(_combine_bwd, setup_context=_combine_setup)


# -- the public API ---------------------------------------------------------------------------------

@dataclass
class Routing:
    """Where every (token, slot) went: per-expert ``counts`` and ``offsets`` (expert e's rows
    are ``offsets[e]:offsets[e + 1]``), ``gather_idx`` [R] (the token of each packed row, -1
    for an empty one), ``scatter_idx`` [T, S] (the row of each slot, -1 when dropped) and the
    kept ``weights`` [T, S] (differentiable: their gradient reaches the route's weights)."""

    counts: torch.Tensor
    offsets: torch.Tensor
    gather_idx: torch.Tensor
    scatter_idx: torch.Tensor
    weights: torch.Tensor
    capacity: int = 0


def route(logits: torch.Tensor, k: int, router: str | RouterSpec = "softmax_topk",
          bias: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gating: (ids [T, S] int32, weights [T, S] fp32). ``router``: a name of
    ``moebench.routing.ROUTERS`` with its ``options`` (e.g. ``renormalize=True``), or a RouterSpec."""
    spec = router if isinstance(router, RouterSpec) else RouterSpec(name=router, **options)
    if spec.name not in routing.ROUTERS:
        raise ValueError(f"router={spec.name!r} is not accepted; accepted: {', '.join(routing.ROUTERS)}")
    spec.router.check(logits.shape[1], k)
    return _route(logits, bias, k, _encode(spec))


def dispatch(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
             capacity_factor: float | None = None) -> tuple[torch.Tensor, Routing]:
    """Tokens to expert-contiguous rows: (packed [R, H], the Routing). Dropless, or with a
    capacity ``ceil(capacity_factor * T * k / E)`` per expert (first come, first kept)."""
    cf = -1.0 if capacity_factor is None else float(capacity_factor)
    counts, offsets, gather, scatter, kept = _metadata(ids, weights, num_experts, cf)
    cap = _capacity(cf).capacity(*ids.shape, num_experts) or 0
    return _pack(x, gather, scatter, cap), Routing(counts, offsets, gather, scatter, kept, cap)


def combine(y: torch.Tensor, routed: Routing, weighted: bool = True) -> torch.Tensor:
    """Packed rows back to token order: out[t] = sum_j w[t, j] * y[scatter_idx[t, j]]."""
    return _combine(y, routed.scatter_idx, routed.weights, weighted, routed.capacity)
