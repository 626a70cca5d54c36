"""The routing stages (route, metadata, route_metadata, pack, combine, and a chain of them,
``total``), each in one place: the implementations that run it, the inputs it reads, its strict
bytes and the call it times with its check. The topk, pack, combine, routing, capacity and
router benches are lists of these stages (:class:`StagesBench`); moe_layer measures its routing
rows with them too.

Strict bytes follow the seed's conventions for dropless routing: pack ``(1 + k)·H·b`` per
token, combine ``(k + 1)·H·b``, pack + combine ``(2 + 2k)·H·b``; top-k = logits read + ids and
fp32 weights written; with a capacity, pack reads the tokens with a kept slot once and writes
every packed row (zero rows too), and combine reads the kept rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from hydra.utils import instantiate

from moebench import routing
from moebench.benches.base import Bench, Call, Case
from moebench.check import (TOLERANCE, assert_close, assert_equal, check_metadata, check_route, check_select, poison,
                            poison_free_blocks)
from moebench.errors import Unsupported
from moebench.impls.base import Impl
from moebench.job import JobSpec
from moebench.logits import make_logits
from moebench.metrics import routing_metrics
from moebench.timing import Rotation, rotations


@dataclass
class Inputs:
    """One job's seeded inputs and the reference results every stage is checked against."""

    logits: torch.Tensor
    bias: torch.Tensor | None
    ids: torch.Tensor
    weights: torch.Tensor
    meta: routing.RoutingMetadata
    num_rows: int
    x: torch.Tensor
    y: torch.Tensor
    ref_packed: torch.Tensor
    ref_combined: torch.Tensor
    ref_total: torch.Tensor


def make_inputs(job: JobSpec) -> Inputs:
    T, E, k, H, dev, dt = job.tokens, job.experts, job.topk, job.hidden, job.device, job.dtype
    lg = {key: v for key, v in job.logits.items() if key != "kind"}
    logits = make_logits(job.logits["kind"], T, E, seed=job.seed, dtype=dt, device=dev, **lg)
    bias = job.router.expert_bias(E, dev, job.seed)
    ids, w = routing.route(logits, k, job.router, bias)
    num_rows = job.router.num_rows(T, k, E)
    meta = routing.build_metadata(ids, w, E, job.capacity, num_rows)
    g = torch.Generator(device=dev).manual_seed(job.seed + 1)
    x = torch.randn(T, H, generator=g, device=dev, dtype=torch.float32).to(dt)
    y = torch.randn(meta.num_rows, H, generator=g, device=dev, dtype=torch.float32).to(dt)
    packed = routing.pack(x, meta)
    return Inputs(logits, bias, ids, w, meta, num_rows, x, y, packed,
                  routing.combine(y, meta, weighted=job.weighted),
                  routing.combine(packed, meta, weighted=job.weighted))


def plant_extremes(x: torch.Tensor) -> torch.Tensor:
    """``x`` with its first rows (as many as there are) replaced by the rows a quantizer gets
    wrong first: all zeros, the dtype's largest values, its subnormals, a large block beside
    tiny values (which land among FP8's subnormals), a block of one outlier and one of zeros."""
    T, H = x.shape
    fi = torch.finfo(x.dtype)
    g = torch.Generator(device=x.device).manual_seed(T * 31 + H)
    sign = torch.randint(0, 2, (H,), generator=g, device=x.device).float() * 2 - 1
    u = torch.rand(H, generator=g, device=x.device)
    rows = [torch.zeros(H, device=x.device),
            sign * fi.max * (0.5 + 0.5 * u),
            sign * fi.smallest_normal * u,  # subnormals (and zeros)
            torch.where(torch.arange(H, device=x.device) % 7 == 0, sign * 3.0, sign * u * 1e-3),
            torch.where(torch.arange(H, device=x.device) < H // 2, 0.0, sign * u).index_fill(0, torch.tensor([H - 1],
                        device=x.device), 1e4 if x.dtype == torch.float16 else 1e30)]
    x = x.clone()
    for i, r in enumerate(rows[:T]):
        x[i] = r.to(x.dtype)
    return x


# -- timing=rotated: the same call on copies of the inputs it reads ----------------------

def copy_like(t: torch.Tensor) -> torch.Tensor:
    """A copy with ``t``'s shape, strides and dtype (``clone`` makes a strided view contiguous,
    and a compiled stage would then see other strides than the checked call: a recompile)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _clone(v):
    if isinstance(v, torch.Tensor):
        return copy_like(v)
    return dataclasses.replace(v, **{f.name: copy_like(getattr(v, f.name)) for f in dataclasses.fields(v)
                                     if isinstance(getattr(v, f.name), torch.Tensor)})


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return sum(_nbytes(getattr(v, f.name)) for f in dataclasses.fields(v) if isinstance(getattr(v, f.name), torch.Tensor))


def rotated_calls(fn, inp: Inputs, fields) -> Rotation:
    """``fn`` on ``rotations()`` copies of the ``inp`` fields it reads (same strides and dtypes):
    call ``i`` swaps copy ``i`` into ``inp`` while it runs (the stage callables read ``inp`` at
    call time, so a graph captured over these calls reads a different buffer in each)."""
    fields = [f for f in fields if getattr(inp, f) is not None]
    nbytes = sum(_nbytes(getattr(inp, f)) for f in fields)
    n = rotations(nbytes)
    copies = [{f: _clone(getattr(inp, f)) for f in fields} for _ in range(n)]

    def on(copy):
        def call():
            saved = {f: getattr(inp, f) for f in fields}
            for f, v in copy.items():
                setattr(inp, f, v)
            try:
                return fn()
            finally:
                for f, v in saved.items():
                    setattr(inp, f, v)
        return call

    return Rotation([on(c) for c in copies], nbytes)


def _meta_tensors(meta: routing.RoutingMetadata) -> list[torch.Tensor]:
    return [meta.counts, meta.offsets, meta.gather_idx, meta.scatter_idx, meta.weights, meta.routed_counts]


# -- the stages --------------------------------------------------------------------------

def grad_input(job: JobSpec, shape: tuple, dtype: torch.dtype, salt: int) -> torch.Tensor:
    """A seeded upstream gradient (N(0, 1), drawn in fp32 and rounded to ``dtype``)."""
    g = torch.Generator(device=job.device).manual_seed(job.seed + 100 + salt)
    return torch.randn(shape, generator=g, device=job.device, dtype=torch.float32).to(dtype)


class Stage:
    """One routing stage. ``parts``: the per-stage implementations (``impl_<part>``) that run
    it; ``reads``: the Inputs fields its call reads. ``backward_call`` / ``backward_bytes``: its
    backward (the gradient of its inputs from a seeded gradient of its outputs, checked against
    torch autograd of the reference in fp32), where it has one."""

    name: ClassVar[str] = ""
    parts: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    #: why a stage has no backward
    no_backward: ClassVar[str] = "no gradient flows through it"

    def backward_bytes(self, job: JobSpec, inp: Inputs) -> int:
        raise NotImplementedError

    def backward_call(self, job: JobSpec, impls: dict[str, Impl], inp: Inputs) -> Call:
        raise Unsupported(f"the {self.name} stage has no backward: {self.no_backward}")

    def label(self, job: JobSpec) -> str:
        if len(self.parts) == 1:
            return job.stage_impls[self.parts[0]]
        return ",".join(f"{p}={job.stage_impls[p]}" for p in self.parts)

    def strict_bytes(self, job: JobSpec, inp: Inputs) -> int:
        raise NotImplementedError

    def call(self, job: JobSpec, impls: dict[str, Impl], inp: Inputs) -> Call:
        raise NotImplementedError


def _byte_width(job: JobSpec) -> int:
    return torch.finfo(job.dtype).bits // 8


class Route(Stage):
    name, parts, reads = "route", ("route",), ("logits", "bias")

    def strict_bytes(self, job, inp):
        return job.tokens * job.experts * _byte_width(job) + job.tokens * inp.ids.shape[1] * (4 + 4)

    def call(self, job, impls, inp):
        im = impls["route"]
        dev, T, S = job.device, job.tokens, inp.ids.shape[1]
        out = (torch.empty(T, S, dtype=torch.int32, device=dev), torch.empty(T, S, dtype=torch.float32, device=dev))
        exact = im.exact_ties_for(job.router)

        def check(got):
            sel = None if exact else routing.selection_scores(inp.logits, job.router, inp.bias)
            if not exact and sel is None:
                raise Unsupported(f"impl={im.name} does not resolve ties like the reference for router={job.router.name}")
            tol = getattr(im, "route_tolerance", None)
            check_route(got, (inp.ids, inp.weights), selection=sel, exact_ties=exact,
                        weights_of=lambda ids: routing.reference_weights(inp.logits, ids, job.router, inp.bias),
                        **(tol(job.dtype, logits=inp.logits, router=job.router, k=job.topk) if tol else {}))

        return Call(lambda: im.route(inp.logits, job.topk, job.router, inp.bias, out=out), check,
                    lambda: [poison(t) for t in out])

    def backward_bytes(self, job, inp):  # logits read, d_logits written; ids, weights, d_weights read
        return 2 * job.tokens * job.experts * _byte_width(job) + job.tokens * inp.ids.shape[1] * (4 + 4 + 4)

    def backward_call(self, job, impls, inp):
        im, T, S = impls["route"], job.tokens, inp.ids.shape[1]
        dw = grad_input(job, (T, S), torch.float32, 1)
        ref = routing.route_backward(inp.logits.float(), inp.ids, dw, job.router, inp.bias)
        return Call(lambda: im.route_backward(inp.logits, inp.ids, inp.weights, dw, job.router, inp.bias),
                    lambda got: assert_close(got, ref, "d_logits", job.dtype), lambda: poison_free_blocks([inp.logits]))


class Select(Stage):
    """The selection alone: the ids and values of the k largest logits, no weights -- what a
    top-k kernel does by itself, for routers whose selection is a top-k of the logits."""

    name, parts, reads = "select", ("route",), ("logits",)
    no_backward = "the selection (integer ids) has no gradient; the route stage's backward carries the weights'"

    def strict_bytes(self, job, inp):  # logits read; int32 ids and values in the logits' dtype written
        b = _byte_width(job)
        return job.tokens * job.experts * b + job.tokens * inp.ids.shape[1] * (4 + b)

    def call(self, job, impls, inp):
        im, r = impls["route"], job.router
        if not r.router.selects_logits(inp.bias is not None):
            raise Unsupported(f"router={r.name}{' with a bias' if inp.bias is not None else ''} does not select a "
                              "top-k of the logits: no select stage (its route row has the selection)")
        k = 1 if r.name == "top1" else job.topk
        dev, T = job.device, job.tokens
        out = (torch.empty(T, k, dtype=torch.int32, device=dev), torch.empty(T, k, dtype=job.dtype, device=dev))
        ref_ids = routing.stable_topk(inp.logits.float(), k)[1]
        exact = im.exact_ties_for(r)
        tol = getattr(im, "select_tolerance", None)

        def check(got):
            check_select(got, ref_ids, inp.logits, exact_ties=exact, **(tol(job.dtype, inp.logits) if tol else {}))

        return Call(lambda: im.select(inp.logits, job.topk, r, inp.bias, out=out), check,
                    lambda: [poison(t) for t in out])


class Metadata(Stage):
    name, parts, reads = "metadata", ("metadata",), ("ids", "weights")
    no_backward = "integer indices; the kept weights pass their gradient straight through (the chain's backward)"

    def strict_bytes(self, job, inp):
        TS, R = job.tokens * inp.ids.shape[1], inp.meta.num_rows
        return TS * (4 + 4) + R * 4 + TS * (4 + 4) + (2 * job.experts + 1) * 4

    def call(self, job, impls, inp):
        im = impls["metadata"]
        return Call(lambda: im.metadata(inp.ids, inp.weights, job.experts, job.capacity, inp.num_rows),
                    lambda got: check_metadata(got, inp.meta), lambda: poison_free_blocks(_meta_tensors(inp.meta)))


class RouteMetadata(Stage):
    """Logits to full routing metadata: the route's ids and weights straight into the metadata build."""

    name, parts, reads = "route_metadata", ("route", "metadata"), ("logits", "bias")
    no_backward = "its gradient is the route stage's (the metadata is integer indices)"

    def strict_bytes(self, job, inp):  # logits read; scatter, gate weights, gather, counts, offsets written
        TS = job.tokens * inp.ids.shape[1]
        return (job.tokens * job.experts * _byte_width(job) + TS * (4 + 4) + inp.meta.num_rows * 4
                + (2 * job.experts + 1) * 4)

    def call(self, job, impls, inp):
        r_im, m_im = impls["route"], impls["metadata"]
        E, k = job.experts, job.topk

        def fn():
            return route_then_metadata(r_im, m_im, inp.logits, k, job.router, inp.bias, E, job.capacity,
                                       inp.num_rows)[2]

        def check(got):
            ref = inp.meta
            if not r_im.exact_ties_for(job.router):  # another expert among equal scores: the reference on its ids
                ids, w = r_im.route(inp.logits, k, job.router, inp.bias)
                ref = routing.build_metadata(ids.contiguous().to(torch.int32), w.contiguous().float(), E,
                                             job.capacity, inp.num_rows)
            check_metadata(got, ref)

        return Call(fn, check, lambda: poison_free_blocks(_meta_tensors(inp.meta)))


def route_then_metadata(r_im: Impl, m_im: Impl, logits, k, router, bias, E, capacity, num_rows):
    """(ids, weights, metadata) from the logits: one call of ``route_metadata`` when one
    implementation runs both stages (it may fuse them), else its route then the other's metadata."""
    if r_im is m_im:
        return r_im.route_metadata(logits, k, router, bias, E, capacity, num_rows)
    ids, w = r_im.route(logits, k, router, bias)
    return ids, w, m_im.metadata(ids, w, E, capacity, num_rows)


def _tokens_read(meta: routing.RoutingMetadata) -> int:
    """Tokens with a kept slot (each read once by a pack)."""
    return int((meta.scatter_idx >= 0).any(1).sum())


class Pack(Stage):
    """Rows ``[0, block_rows)`` are checked (and counted): past the last aligned block
    (``capacity.align``) rows belong to no expert and need not be written."""

    name, parts, reads = "pack", ("pack",), ("x", "meta")

    def strict_bytes(self, job, inp):  # tokens with a kept slot read once, every block row written (zeros too)
        return (_tokens_read(inp.meta) + inp.meta.block_rows) * job.hidden * _byte_width(job)

    def call(self, job, impls, inp):
        im, n = impls["pack"], inp.meta.block_rows
        out = torch.empty(inp.meta.num_rows, job.hidden, dtype=job.dtype, device=job.device)
        return Call(lambda: im.pack(inp.x, inp.meta, out=out),
                    lambda got: assert_equal(got[:n], inp.ref_packed[:n], "packed rows"), lambda: poison(out))

    def backward_bytes(self, job, inp):  # the rows that hold a token read once, d_x written
        return (int((inp.meta.scatter_idx >= 0).sum()) + job.tokens) * job.hidden * _byte_width(job)

    def backward_call(self, job, impls, inp):
        im = impls["pack"]
        d_packed = grad_input(job, (inp.meta.num_rows, job.hidden), job.dtype, 2)
        ref = routing.pack_backward(d_packed.float(), inp.meta)
        return Call(lambda: im.pack_backward(d_packed, inp.meta), lambda got: assert_close(got, ref, "d_x", job.dtype),
                    lambda: poison_free_blocks([inp.x]))


class PackQuant(Stage):
    """Pack with quantization (``bench.quant``, ``routing.pack_fp8``): FP8 e4m3 rows and one
    fp32 scale per 128 channels, bit-exact against the reference (values and scales). Strict
    bytes: the tokens read once, every block row's FP8 values and scales written."""

    name, parts, reads = "pack", ("pack",), ("x", "meta")

    def __init__(self, quant: str):
        self.quant = quant

    def strict_bytes(self, job, inp):
        H = job.hidden
        return _tokens_read(inp.meta) * H * _byte_width(job) + inp.meta.block_rows * (H + 4 * (H // routing.FP8_BLOCK))

    def call(self, job, impls, inp):
        im, meta, H, dev, n = impls["pack"], inp.meta, job.hidden, job.device, inp.meta.block_rows
        if H % routing.FP8_BLOCK:
            raise Unsupported(f"bench.quant={self.quant}: H={H} is not a multiple of {routing.FP8_BLOCK}")
        if job.dtype not in (torch.bfloat16, torch.float16):
            raise Unsupported(f"bench.quant={self.quant} quantizes bfloat16/float16 tokens, not {job.dtype}")
        out = (torch.empty(meta.num_rows, H, dtype=torch.float8_e4m3fn, device=dev),
               torch.empty(meta.num_rows, H // routing.FP8_BLOCK, dtype=torch.float32, device=dev))
        ref_q, ref_s = routing.pack_fp8(inp.x, meta, self.quant)

        def check(got):
            q, sc = got
            assert_equal(q[:n].view(torch.uint8), ref_q[:n].view(torch.uint8), f"{self.quant} packed rows (bits)")
            assert_equal(sc[:n].view(torch.int32), ref_s[:n].view(torch.int32), f"{self.quant} scales (bits)")

        def reset():
            out[0].view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
            poison(out[1])

        return Call(lambda: im.pack_fp8(inp.x, meta, self.quant, out=out), check, reset)


class Combine(Stage):
    name, parts, reads = "combine", ("combine",), ("y", "meta")

    def strict_bytes(self, job, inp):
        kept = int((inp.meta.scatter_idx >= 0).sum())
        return (kept + job.tokens) * job.hidden * _byte_width(job)

    def call(self, job, impls, inp):
        im = impls["combine"]
        out = torch.empty(job.tokens, job.hidden, dtype=job.dtype, device=job.device)
        return Call(lambda: im.combine(inp.y, inp.meta, out=out, weighted=job.weighted),
                    lambda got: assert_close(got, inp.ref_combined, "combined rows", job.dtype), lambda: poison(out))

    def backward_bytes(self, job, inp):  # d_out and the kept rows of y read, every block row of d_y written; w, d_w
        kept = int((inp.meta.scatter_idx >= 0).sum())
        return ((job.tokens + kept + inp.meta.block_rows) * job.hidden * _byte_width(job)
                + job.tokens * inp.meta.num_slots * (4 + 4 + 4))

    def backward_call(self, job, impls, inp):
        im, H = impls["combine"], job.hidden
        d_out = grad_input(job, (job.tokens, H), job.dtype, 3)
        ref_dy, ref_dw = routing.combine_backward(d_out.float(), inp.y.float(), inp.meta, job.weighted)
        rtol, atol = TOLERANCE[job.dtype]

        n = inp.meta.block_rows  # rows past the last aligned block belong to no expert: no gradient read

        def check(got):
            dy, dw = got
            assert_close(dy[:n], ref_dy[:n], "d_y", job.dtype)
            # d_w is a dot product over H: its rounding grows with sqrt(H)
            assert_close(dw.float(), ref_dw, "d_w", rtol=rtol, atol=atol * H ** 0.5)

        return Call(lambda: im.combine_backward(d_out, inp.y, inp.meta, weighted=job.weighted), check,
                    lambda: poison_free_blocks([inp.y, inp.meta.weights]))


class Total(Stage):
    """The chain of ``parts`` (route, if given, then metadata, pack, identity experts, combine)
    timed as one call."""

    name = "total"
    reads = ("logits", "bias", "ids", "weights", "x")

    def __init__(self, parts: tuple[str, ...]):
        self.parts = parts

    def strict_bytes(self, job, inp):
        return PACK.strict_bytes(job, inp) + COMBINE.strict_bytes(job, inp)

    def call(self, job, impls, inp):
        dev, T, H, E, k = job.device, job.tokens, job.hidden, job.experts, job.topk
        packed = torch.empty(inp.meta.num_rows, H, dtype=job.dtype, device=dev)
        out = torch.empty(T, H, dtype=job.dtype, device=dev)
        routed = "route" in self.parts

        def fn():
            if routed:
                meta = route_then_metadata(impls["route"], impls["metadata"], inp.logits, k, job.router, inp.bias,
                                           E, job.capacity, inp.num_rows)[2]
            else:
                meta = impls["metadata"].metadata(inp.ids, inp.weights, E, job.capacity, inp.num_rows)
            p = impls["pack"].pack(inp.x, meta, out=packed)
            return impls["combine"].combine(p, meta, out=out, weighted=job.weighted)

        def check(got):
            ref = inp.ref_total
            if routed and not impls["route"].exact_ties_for(job.router):
                # a route that may pick another expert among equal scores (checked on its own in
                # the route row): compare the chain with the reference chain on its ids
                ids, w = impls["route"].route(inp.logits, k, job.router, inp.bias)
                meta = routing.build_metadata(ids.contiguous(), w.contiguous(), E, job.capacity, inp.num_rows)
                ref = routing.combine(routing.pack(inp.x, meta), meta, weighted=job.weighted)
            assert_close(got, ref, "end-to-end output", job.dtype)

        return Call(fn, check, lambda: (poison(packed), poison(out)))

    def backward_bytes(self, job, inp):
        b = COMBINE.backward_bytes(job, inp) + PACK.backward_bytes(job, inp)
        return b + (ROUTE.backward_bytes(job, inp) if "route" in self.parts else 0)

    def backward_call(self, job, impls, inp):
        """The chain's backward from a gradient of its output: combine's (d_y, d_w), pack's d_x
        from d_y, and (routed) the route's d_logits from d_w -- the kept weights pass their
        gradient straight through the metadata, a dropped slot's is zero."""
        if job.capacity.renormalize_after_drop and not job.capacity.dropless:
            raise Unsupported("capacity.renormalize_after_drop=true: the chain's backward through the renormalised "
                              "kept weights is not built")
        routed = "route" in self.parts
        meta, T, H = inp.meta, job.tokens, job.hidden
        d_out = grad_input(job, (T, H), job.dtype, 4)
        # the reference: autograd of the reference chain in fp32, on the reference's routing
        x32 = inp.x.float().requires_grad_(True)
        src = (inp.logits if routed else inp.weights).float().requires_grad_(True)
        with torch.enable_grad():
            w = routing.reference_weights(src, inp.ids, job.router, inp.bias) if routed else src
            kept_w = dataclasses.replace(meta, weights=torch.where(meta.scatter_idx >= 0, w, 0.0))
            ref_x, ref_src = torch.autograd.grad(routing.combine(routing.pack(x32, meta), kept_w, weighted=job.weighted),
                                                 (x32, src), d_out.float(), allow_unused=True)
        if ref_src is None:
            ref_src = torch.zeros_like(src)

        def fn():
            d_y, d_w = impls["combine"].combine_backward(d_out, inp.ref_packed, meta, weighted=job.weighted)
            d_x = impls["pack"].pack_backward(d_y, meta)
            if routed:
                d_w = impls["route"].route_backward(inp.logits, inp.ids, inp.weights, d_w, job.router, inp.bias)
            return d_x, d_w

        def check(got):
            assert_close(got[0], ref_x, "d_x", job.dtype)
            what = "d_logits" if routed else "d_weights"
            assert_close(got[1].float(), ref_src, what, job.dtype, **({} if routed else
                         {"atol": TOLERANCE[job.dtype][1] * H ** 0.5}))

        return Call(fn, check, lambda: poison_free_blocks([inp.x, inp.ref_packed]))


ROUTE, SELECT, METADATA, ROUTE_METADATA, PACK, COMBINE = Route(), Select(), Metadata(), RouteMetadata(), Pack(), Combine()


def instantiate_impls(job: JobSpec) -> dict[str, Impl]:
    """One instance per implementation the job names (``impl`` and every ``impl_<stage>``)."""
    return {name: instantiate(conf) for name, conf in job.impl_configs.items()}


def _fwdbwd(fwd: Call, bwd: Call) -> Call:
    """The forward call then the backward call (the backward on the reference forward's outputs,
    so each half is checked against a fixed reference)."""
    def check(got):
        fwd.check(got[0])
        bwd.check(got[1])

    def reset():
        fwd.reset()
        bwd.reset()

    return Call(lambda: (fwd.fn(), bwd.fn()), check, reset)


def stage_case(stage: Stage, job: JobSpec, impls: dict[str, Impl], inp: Inputs, direction: str = "fwd") -> Case:
    """The Case of one routing stage in one direction: its implementations checked for the
    device, its call (forward, backward, or the two in one), the same call on input copies for
    ``timing=rotated``, its strict bytes."""
    by_part = {p: impls[job.stage_impls[p]] for p in stage.parts}

    def build():
        for im in by_part.values():
            im.check_device(job.device)
        if direction == "fwd":
            call = stage.call(job, by_part, inp)
        elif direction == "bwd":
            call = stage.backward_call(job, by_part, inp)
        else:
            call = _fwdbwd(stage.call(job, by_part, inp), stage.backward_call(job, by_part, inp))
        call.copies = lambda: rotated_calls(call.fn, inp, stage.reads)
        return call

    def strict_bytes():
        fwd = stage.strict_bytes(job, inp) if direction != "bwd" else 0
        return fwd + (stage.backward_bytes(job, inp) if direction != "fwd" else 0)

    return Case(stage.name, stage.label(job), build, strict_bytes, columns={"direction": direction})


class StagesBench(Bench):
    """A bench whose rows are routing stages (``chain``), on one job's seeded inputs."""

    chain: ClassVar[tuple[Stage, ...]] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.stages = tuple(s.name for s in cls.chain)

    def setup(self, timer):
        super().setup(timer)
        self.impls = instantiate_impls(self.job)
        self.inp = make_inputs(self.job)

    def columns(self):
        return {**routing_metrics(self.inp.meta, self.inp.ids, self.inp.logits),
                "capacity_per_expert": self.inp.meta.capacity}

    def cases(self):
        d = self.config.direction if self.config is not None else "fwd"
        return [stage_case(s, self.job, self.impls, self.inp, d) for s in self.chain]
