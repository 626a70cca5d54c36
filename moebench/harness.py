"""The measurement harness: fresh seeded inputs, one checked run against the reference
(outputs poisoned first), then timing. A mismatch is a ``mismatch`` row and is never timed;
a case an implementation cannot handle is an ``unsupported`` row with the reason."""

from __future__ import annotations

import dataclasses
import logging
import time
import traceback
from dataclasses import dataclass

import torch
from hydra.utils import instantiate

from moebench import routing
from moebench.check import (Mismatch, assert_close, assert_equal, check_metadata, check_route, poison,
                            poison_free_blocks)
from moebench.config import JobSpec
from moebench.impls.base import Impl, Unsupported
from moebench.logits import make_logits
from moebench.timing import Timer, first_call_ms, rotations

log = logging.getLogger(__name__)


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


def strict_bytes(job: JobSpec, inp: Inputs, stage: str) -> int:
    """Bytes a stage must move at the least (seed conventions for dropless routing:
    pack (1 + k)·H·b per token, combine (k + 1)·H·b, pack+combine (2 + 2k)·H·b;
    top-k = logits read + ids and fp32 weights written)."""
    T, E, H = job.tokens, job.experts, job.hidden
    b = torch.finfo(job.dtype).bits // 8
    S, R = inp.ids.shape[1], inp.meta.num_rows
    kept_slots = inp.meta.scatter_idx >= 0
    kept = int(kept_slots.sum())
    if stage == "route":
        return T * E * b + T * S * (4 + 4)
    if stage == "metadata":
        return T * S * (4 + 4) + R * 4 + T * S * (4 + 4) + (2 * E + 1) * 4
    if stage == "route_metadata":  # logits read; scatter, gate weights, gather, counts, offsets written
        return T * E * b + T * S * (4 + 4) + R * 4 + (2 * E + 1) * 4
    if stage == "pack":  # tokens with a kept slot read once, every packed row written (zeros too)
        return (int(kept_slots.any(1).sum()) + R) * H * b
    if stage == "combine":
        return (kept + T) * H * b
    if stage == "total":
        return strict_bytes(job, inp, "pack") + strict_bytes(job, inp, "combine")
    raise ValueError(stage)


def check_then_time(case, timer: Timer, device: torch.device, tokens: int, stage: str) -> dict:
    """The measurement of one stage: ``case()`` gives (fn, check, reset[, rotated]); reset
    poisons the outputs, one call is checked (its wall time with compilation is
    ``first_call_ms``), and only a checked stage is timed (``rotated``: the callables on input
    copies that ``timing=rotated`` cycles through). Returns the outcome columns: ``status``,
    ``message``, and ``first_call_ms`` / ``time_us_*`` / ``repeats`` / ``tokens_per_s`` when
    they exist."""
    row = {}
    try:
        fn, check, reset, *rest = case()
        reset()
        got = [None]

        def first():
            got[0] = fn()

        row["first_call_ms"] = first_call_ms(first, device)
        check(got[0])
        got[0] = None
        t = timer.time(fn, rotated=rest[0] if rest else None)
    except Unsupported as e:
        return {**row, "status": "unsupported", "message": f"unsupported: {e}"}
    except Mismatch as e:
        return {**row, "status": "mismatch", "message": f"mismatch: {e}"}
    except Exception as e:  # noqa: BLE001 -- one failing case must not end the job
        log.debug("stage %s failed:\n%s", stage, traceback.format_exc())
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {**row, "status": "error", "message": f"error: {type(e).__name__}: {first_line}"[:500]}
    return {**row, "status": "ok", "message": "",
            "time_us_median": t.median_us, "time_us_p10": t.p10_us, "time_us_p90": t.p90_us,
            "time_us_mean": t.mean_us, "time_us_std": t.std_us, "repeats": t.repeats,
            "tokens_per_s": tokens / (t.median_us * 1e-6)}


#: the Inputs fields each stage reads (copied for timing=rotated)
STAGE_INPUTS = {
    "route": ("logits", "bias"),
    "metadata": ("ids", "weights"),
    "route_metadata": ("logits", "bias"),
    "pack": ("x", "meta"),
    "combine": ("y", "meta"),
    "total": ("logits", "bias", "ids", "weights", "x"),
}


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    return dataclasses.replace(v, **{f.name: getattr(v, f.name).clone() for f in dataclasses.fields(v)
                                     if isinstance(getattr(v, f.name), torch.Tensor)})


def _nbytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return sum(_nbytes(getattr(v, f.name)) for f in dataclasses.fields(v) if isinstance(getattr(v, f.name), torch.Tensor))


def rotated_calls(fn, inp: Inputs, fields) -> list:
    """``fn`` on ``rotations()`` copies of the ``inp`` fields it reads: call ``i`` swaps copy
    ``i`` into ``inp`` while it runs (the stage callables read ``inp`` at call time, so a
    graph captured over these calls reads a different buffer in each)."""
    fields = [f for f in fields if getattr(inp, f) is not None]
    n = rotations(sum(_nbytes(getattr(inp, f)) for f in fields))
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

    return [on(c) for c in copies]


def _meta_tensors(meta: routing.RoutingMetadata) -> list[torch.Tensor]:
    return [meta.counts, meta.offsets, meta.gather_idx, meta.scatter_idx, meta.weights, meta.routed_counts]


class Harness:
    """Runs one job's stages for its implementations and returns one row per stage."""

    def __init__(self, job: JobSpec, timer: Timer):
        self.job = job
        self.timer = timer
        self.impls: dict[str, Impl] = {}
        for name, conf in job.impl_configs.items():
            self.impls[name] = instantiate(conf)

    def impl_for(self, stage: str) -> Impl:
        return self.impls[self.job.stage_impls[stage]]

    # -- one callable per stage, and its check --------------------------------------------
    def _case(self, stage: str, inp: Inputs):
        job, dev = self.job, self.job.device
        T, E, k, H = job.tokens, job.experts, job.topk, job.hidden
        if stage == "route":
            im = self.impl_for("route")
            im.check_device(dev)
            S = inp.ids.shape[1]
            out = (torch.empty(T, S, dtype=torch.int32, device=dev), torch.empty(T, S, dtype=torch.float32, device=dev))

            def fn():
                return im.route(inp.logits, k, job.router, inp.bias, out=out)

            def check(got):
                sel = None if im.exact_ties else routing.selection_scores(inp.logits, job.router, inp.bias)
                if not im.exact_ties and sel is None:
                    raise Unsupported(f"impl={im.name} does not resolve ties like the reference for router={job.router.name}")
                tol = getattr(im, "route_tolerance", None)
                check_route(got, (inp.ids, inp.weights), selection=sel, exact_ties=im.exact_ties,
                            **(tol(job.dtype, logits=inp.logits, router=job.router) if tol else {}))

            return [im], fn, check, lambda: [poison(t) for t in out]
        if stage == "metadata":
            im = self.impl_for("metadata")
            im.check_device(dev)

            def fn():
                return im.metadata(inp.ids, inp.weights, E, job.capacity, inp.num_rows)

            return [im], fn, lambda got: check_metadata(got, inp.meta), lambda: poison_free_blocks(_meta_tensors(inp.meta))
        if stage == "route_metadata":
            r_im, m_im = self.impl_for("route"), self.impl_for("metadata")
            for im in (r_im, m_im):
                im.check_device(dev)

            def fn():
                ids, w = r_im.route(inp.logits, k, job.router, inp.bias)
                return m_im.metadata(ids, w, E, job.capacity, inp.num_rows)

            def check(got):
                ref = inp.meta
                if not r_im.exact_ties:  # another expert among equal scores: the reference on its ids
                    ids, w = r_im.route(inp.logits, k, job.router, inp.bias)
                    ref = routing.build_metadata(ids.contiguous().to(torch.int32), w.contiguous().float(), E,
                                                 job.capacity, inp.num_rows)
                check_metadata(got, ref)

            return [r_im, m_im], fn, check, lambda: poison_free_blocks(_meta_tensors(inp.meta))
        if stage == "pack":
            im = self.impl_for("pack")
            im.check_device(dev)
            out = torch.empty(inp.meta.num_rows, H, dtype=job.dtype, device=dev)

            def fn():
                return im.pack(inp.x, inp.meta, out=out)

            return [im], fn, lambda got: assert_equal(got, inp.ref_packed, "packed rows"), lambda: poison(out)
        if stage == "combine":
            im = self.impl_for("combine")
            im.check_device(dev)
            out = torch.empty(T, H, dtype=job.dtype, device=dev)

            def fn():
                return im.combine(inp.y, inp.meta, out=out, weighted=job.weighted)

            return ([im], fn, lambda got: assert_close(got, inp.ref_combined, "combined rows", job.dtype),
                    lambda: poison(out))
        if stage == "total":
            chain = [s for s in job.stages if s != "total"]
            ims = {s: self.impl_for(s) for s in chain}
            for im in ims.values():
                im.check_device(dev)
            packed = torch.empty(inp.meta.num_rows, H, dtype=job.dtype, device=dev)
            out = torch.empty(T, H, dtype=job.dtype, device=dev)

            def fn():
                ids, w = inp.ids, inp.weights
                if "route" in ims:
                    ids, w = ims["route"].route(inp.logits, k, job.router, inp.bias)
                meta = ims["metadata"].metadata(ids, w, E, job.capacity, inp.num_rows)
                p = ims["pack"].pack(inp.x, meta, out=packed)
                return ims["combine"].combine(p, meta, out=out, weighted=job.weighted)

            def check(got):
                ref = inp.ref_total
                if "route" in ims and not ims["route"].exact_ties:
                    # a route that may pick another expert among equal scores (checked on its
                    # own in the route row): compare the chain with the reference chain on its ids
                    ids, w = ims["route"].route(inp.logits, k, job.router, inp.bias)
                    meta = routing.build_metadata(ids.contiguous(), w.contiguous(), E, job.capacity, inp.num_rows)
                    ref = routing.combine(routing.pack(inp.x, meta), meta, weighted=job.weighted)
                assert_close(got, ref, "end-to-end output", job.dtype)

            return list(ims.values()), fn, check, lambda: (poison(packed), poison(out))
        raise ValueError(stage)

    def run_stage(self, stage: str, inp: Inputs) -> dict:
        """Check once, then time. Returns the stage's outcome columns."""
        job = self.job
        if stage == "total":
            names = [f"{s}={job.stage_impls[s]}" for s in job.stages if s != "total"]
            row = {"stage_impl": ",".join(names)}
        elif stage == "route_metadata":
            names = [f"{s}={job.stage_impls[s]}" for s in ("route", "metadata")]
            row = {"stage_impl": ",".join(names)}
        else:
            row = {"stage_impl": job.stage_impls[stage]}
        def case():
            _, fn, check, reset = self._case(stage, inp)
            return fn, check, reset, lambda: rotated_calls(fn, inp, STAGE_INPUTS[stage])

        row.update(check_then_time(case, self.timer, job.device, job.tokens, stage))
        if row["status"] != "ok":
            return row
        nbytes = strict_bytes(job, inp, stage)
        sec = row["time_us_median"] * 1e-6
        return {**row, "bytes_strict": nbytes, "bytes_per_token_strict": nbytes / job.tokens,
                "bw_GBps_strict": nbytes / sec / 1e9, "bw_GiBps_strict": nbytes / sec / 2**30}

    def run(self, inp: Inputs, progress=None) -> list[dict]:
        rows = []
        for i, stage in enumerate(self.job.stages, 1):
            t0 = time.perf_counter()
            row = {"stage": stage, **self.run_stage(stage, inp)}
            rows.append(row)
            if progress:
                progress(i, len(self.job.stages), row, time.perf_counter() - t0)
        return rows
