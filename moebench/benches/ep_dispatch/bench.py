"""``bench=ep_dispatch``: expert parallelism over ``world_size`` ranks.

Experts are split evenly across ranks (rank ``d`` owns experts ``[d·E/W, (d+1)·E/W)``).
Every rank holds ``tokens`` tokens of its own (``tokens`` is *per rank*) and runs:

1. reference routing (``moebench.routing``) on its tokens -- once, outside the timed region;
2. **dispatch**: exchange of the per-expert row counts (``all_to_all_single`` of an int64
   ``[E]`` tensor), pack (tokens to expert-contiguous rows, contiguous per destination rank),
   one host read of the split sizes, and ``all_to_all_single`` of the packed rows;
   then (``bench.local_layout=expert``, the default) the received rows -- grouped by source
   rank -- regrouped by local expert: rank-local metadata (``routing.local_metadata``, the
   job's metadata implementation; blocks aligned with ``capacity.align``) and a pack, the
   layout a grouped GEMM reads (``source``: the rows as received);
3. local experts: ``identity`` (default: the received buffer is the output) or ``scale``
   (each row times a per-expert factor -- a misrouted row shows up);
4. **combine**: (``expert``: the rows back in received order, an unweighted one-slot combine)
   the reverse ``all_to_all_single`` back into the rank's packed layout, then the weighted
   combine (fp32 accumulation);

plus **raw_a2a**, a raw ``all_to_all_single`` of the largest rank's byte count split evenly:
the same job's ceiling (``pct_of_raw``). The result equals the single-process reference (bit for
bit with the reference's own pack and combine; within the combine tolerance of the job's dtype
with another implementation's). Every rank measures its four cases with :func:`moebench.benches.base.measure` and a
:class:`moebench.timing.Timer` whose barrier starts every repeat on all ranks together; each
check is collective (a mismatch on one rank is a ``mismatch`` row on every rank, so all ranks
skip the same timings). Rank 0 gathers the rows; the job loop writes the one table.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from hydra.utils import get_class, instantiate

from moebench.benches.base import Bench, BenchConfig, Call, Case, measure
from moebench.benches.ep_dispatch.parallel import LAYOUTS, ExpertParallel, process_group, spawn
from moebench.benches.ep_dispatch.problem import (
    EXPERTS,
    EPProblem,
    rank_inputs,
    reference_forward,
)
from moebench.check import assert_close, assert_equal, poison
from moebench.errors import ConfigError, Mismatch
from moebench.impls.base import Impl
from moebench.metrics import routing_metrics
from moebench.timing import Timer, TimingSpec

log = logging.getLogger("moebench")

STAGES = ("dispatch", "combine", "total", "raw_a2a")
#: the shipped implementations with pack and combine stages (routing and metadata stay the torch reference)
EP_IMPLS = ("torch", "compile", "cute")


@dataclass
class EPDispatchConfig(BenchConfig):
    """The schema of ``conf/bench/ep_dispatch.yaml`` (``world_size`` is a top-level key)."""

    name: str = "ep_dispatch"
    expert: str = "identity"
    #: expert (the received rows grouped by local expert through rank-local metadata, blocks
    #: aligned with capacity.align: what a grouped GEMM reads) | source (as received)
    local_layout: str = "expert"
    timeout_s: int = 600  # process-group timeout (a hung collective fails the job's rows after this)

    def __post_init__(self):
        super().__post_init__()
        if self.direction != "fwd":
            raise ConfigError(f"bench.direction={self.direction} is not accepted with bench=ep_dispatch; accepted: fwd")
        if self.expert not in EXPERTS:
            raise ConfigError(f"bench.expert={self.expert!r} is not accepted; accepted: {', '.join(EXPERTS)}")
        if self.local_layout not in LAYOUTS:
            raise ConfigError(f"bench.local_layout={self.local_layout!r} is not accepted; accepted: {', '.join(LAYOUTS)}")
        if self.timeout_s < 1:
            raise ConfigError(f"bench.timeout_s={self.timeout_s!r} is not accepted; an integer >= 1 (seconds)")


def check_devices(device: torch.device, world_size: int, visible: int | None = None) -> None:
    """One rank per GPU: a ConfigError when ``world_size`` exceeds the visible GPUs."""
    if device.type != "cuda":
        return
    visible = torch.cuda.device_count() if visible is None else visible
    if world_size > visible:
        raise ConfigError(f"world_size={world_size} needs {world_size} GPUs (one rank per GPU) but {visible} "
                          f"{'is' if visible == 1 else 'are'} visible; accepted here: world_size <= {visible} "
                          "(or device=cpu for gloo ranks; under Slurm set hydra.launcher.gpus_per_node)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(device: torch.device) -> None:
    _sync(device)
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
    _sync(device)


def _agree(rank: int, world_size: int, check) -> None:
    """A collective check: every rank runs ``check``; any rank's mismatch is every rank's."""
    msg = ""
    try:
        check()
    except Mismatch as e:
        msg = f"rank {rank}: {e}"
    msgs = [None] * world_size
    dist.all_gather_object(msgs, msg)
    bad = next((m for m in msgs if m), "")
    if bad:
        raise Mismatch(bad)


def rank_rows(rank: int, W: int, device: torch.device, p: EPProblem, warmup: int, repeats: int,
              backend: str) -> list[dict]:
    """This rank's row of every stage."""
    inp = rank_inputs(p, rank, W, device)
    pack_impl, combine_impl, meta_impl = instantiate(p.pack_impl), instantiate(p.combine_impl), instantiate(p.metadata_impl)
    ep = ExpertParallel(W, rank, p.experts, p.weighted, pack=pack_impl.pack, combine=combine_impl.combine,
                        metadata=meta_impl.metadata, layout=p.layout, align=p.capacity.align)
    b = torch.finfo(p.dtype).bits // 8
    H = p.hidden
    out = torch.empty(p.tokens, H, dtype=p.dtype, device=device)
    timer = Timer(TimingSpec("events", warmup, repeats), device, barrier=lambda: _barrier(device))
    want = {e: reference_forward(inp.x, inp.meta, e, p.weighted) for e in {p.expert, "scale"}}

    def forward_is_right(got, expert=p.expert):
        # the reference's combine and the job's may round differently: the combine tolerance
        assert_close(got, want[expert], f"EP output (expert={expert})", p.dtype)

    def check_total(got):
        got = got.clone()
        # identity hides misrouted rows: run the scale expert too (on every rank: it is collective)
        scaled = ep.forward(inp.x, inp.meta, "scale", out=out).clone() if p.expert != "scale" else None
        forward_is_right(got)
        if scaled is not None:
            forward_is_right(scaled, "scale")

    _, plan = ep.dispatch(inp.x, inp.meta)  # what moves where (the rows are checked in each case)
    moved = [None] * W
    dist.all_gather_object(moved, plan.n_send)
    n_raw = max(W, math.ceil(max(moved) / W) * W)  # the largest rank's send volume, split evenly
    even = [n_raw // W] * W  # explicit split sizes: the same (variable-size) call as the dispatch
    # rows for rank d hold rank * W + d (exact in every dtype): what each rank receives is known
    raw_in = (rank * W + torch.arange(W, device=device).repeat_interleave(n_raw // W)).to(p.dtype)[:, None].expand(
        n_raw, H).contiguous()
    raw_out = torch.empty_like(raw_in)
    raw_want = (torch.arange(W, device=device) * W + rank).repeat_interleave(n_raw // W).to(p.dtype)[:, None].expand(
        n_raw, H)

    def reset():
        ep.poison()
        poison(out)

    def combine_call():
        """The combine of rows this job's dispatch delivered into poisoned buffers: checked end to
        end, so a wrong pack or dispatch shows in this row too."""
        reset()
        recv, plan = ep.dispatch(inp.x, inp.meta)
        y = ep.experts(recv, plan, p.expert).clone()
        return Call(lambda: ep.combine(y, plan, inp.meta, out=out), forward_is_right, lambda: poison(out))

    calls = {
        "dispatch": Call(lambda: ep.dispatch(inp.x, inp.meta),
                         lambda got: forward_is_right(ep.combine(ep.experts(got[0], got[1], p.expert), got[1],
                                                                 inp.meta, out=out).clone()), reset),
        "combine": combine_call,
        "total": Call(lambda: ep.forward(inp.x, inp.meta, p.expert, out=out), check_total, reset),
        "raw_a2a": Call(lambda: dist.all_to_all_single(raw_out, raw_in, even, even),
                        lambda _: assert_equal(raw_out, raw_want, "raw all-to-all rows"), lambda: poison(raw_out)),
    }
    rows_io = {"dispatch": (plan.n_send, plan.n_recv), "combine": (plan.n_recv, plan.n_send),
               "total": (plan.n_send + plan.n_recv, plan.n_recv + plan.n_send), "raw_a2a": (n_raw, n_raw)}
    common = {**routing_metrics(inp.meta, inp.ids, inp.logits), "rank": rank, "capacity_per_expert": inp.meta.capacity}
    rows = []
    def collective(make):
        def build():
            c = make() if callable(make) else make
            return Call(c.fn, lambda got: _agree(rank, W, lambda: c.check(got)), c.reset)
        return build

    for stage in STAGES:
        sent, recvd = rows_io[stage]
        row = measure(Case(stage, p.stage_impl(stage, backend), collective(calls[stage])), timer, p.tokens)
        row.update(common, rows_sent=sent, rows_received=recvd, bytes_sent=sent * H * b, bytes_received=recvd * H * b)
        if row["status"] == "ok":
            algbw = max(row["bytes_sent"], row["bytes_received"]) / (row["time_us_median"] * 1e-6) / 1e9
            row.update(algbw_GBps=algbw, busbw_GBps=algbw * (W - 1) / W)
        if stage == "raw_a2a":
            row["tokens_per_s"] = None
        rows.append(row)
    return rows


def finish(rows: list[dict]) -> list[dict]:
    """Job-level columns over all ranks' rows: the slowest rank per repeat, the receive
    imbalance, and each rank's time as a share of its raw all-to-all (``pct_of_raw``)."""
    recv = [r["rows_received"] for r in rows if r["stage"] == "dispatch"]
    mean = sum(recv) / len(recv)
    imbalance = max(recv) / mean if mean > 0 else float("nan")
    raw = {r["rank"]: r.get("time_us_median") for r in rows if r["stage"] == "raw_a2a"}
    for stage in STAGES:
        ss = [r.get("time_us_samples") for r in rows if r["stage"] == stage]
        slowest = statistics.median(max(v) for v in zip(*ss)) if all(ss) else None
        for r in rows:
            if r["stage"] != stage:
                continue
            r["time_us_slowest_rank"] = slowest
            r["recv_imbalance"] = imbalance
            raw_us = raw.get(r["rank"])
            if r["status"] == "ok" and raw_us:
                r["pct_of_raw"] = 100.0 * raw_us * (2 if stage == "total" else 1) / r["time_us_median"]
    return sorted(rows, key=lambda r: (STAGES.index(r["stage"]), r["rank"]))


def _job_entry(rank, world_size, port, device_type, timeout_s, p: EPProblem, warmup: int, repeats: int,
               path: str) -> None:
    with process_group(rank, world_size, port, device_type, timeout_s) as device:
        backend = "nccl" if device.type == "cuda" else "gloo"
        rows = rank_rows(rank, world_size, device, p, warmup, repeats, backend)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        if rank == 0:
            torch.save([r for rank_rows_ in gathered for r in rank_rows_], path)


def _error_message(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    last = lines[-1] if lines else ""
    text = f"{head}: {last}" if last and last != head else head
    return f"error: {text}"[:500]


class EPDispatchBench(Bench):
    name = "ep_dispatch"
    Config = EPDispatchConfig
    stages = STAGES
    multi_rank = True
    uses_copy = False
    summary_columns = ("stage", "rank", "status", "time_us_median", "time_us_slowest_rank", "bytes_sent",
                       "bytes_received", "algbw_GBps", "busbw_GBps", "pct_of_raw", "recv_imbalance", "message")

    @classmethod
    def validate(cls, job):
        W = job.world_size
        if W is None:
            raise ConfigError("bench=ep_dispatch needs world_size=<ranks>")
        if job.experts % W:
            divisors = [d for d in range(1, job.experts + 1) if job.experts % d == 0]
            raise ConfigError(f"experts={job.experts} is not divisible by world_size={W}; expert parallelism "
                              f"splits experts evenly across ranks: accepted world_size: {', '.join(map(str, divisors))}")
        needs = ("pack", "combine", "metadata") if job.bench_config.local_layout == "expert" else ("pack", "combine")
        for stage in needs:
            name = job.stage_impls[stage]
            if getattr(get_class(job.impl_configs[name]["_target_"]), stage) is getattr(Impl, stage):
                raise ConfigError(f"impl_{stage}={name} is not accepted with bench=ep_dispatch: it has no {stage} "
                                  f"stage (accepted: {', '.join(EP_IMPLS)})")
        if job.timing.mode != "events":
            raise ConfigError(f"timing={job.timing.mode} is not accepted with bench=ep_dispatch (the dispatch reads "
                              "its split sizes on the host); accepted: events")
        check_devices(job.device, W)

    def backend(self) -> str:
        return "nccl" if self.job.device.type == "cuda" else "gloo"

    def describe(self):
        j = self.job
        return (f"bench=ep_dispatch world_size={j.world_size} backend={self.backend()} T={j.tokens}/rank H={j.hidden} "
                f"E={j.experts} ({j.experts // j.world_size}/rank) k={j.topk} dtype={j.dtype_name} "
                f"expert={self.config.expert} local_layout={self.config.local_layout}")

    def headline(self) -> str:
        nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_"))
        extra = f"\nranks' environment: {nccl}" if nccl and self.backend() == "nccl" else ""
        return f"ep_dispatch {self.job.world_size} ranks ({self.backend()}){extra}"

    def columns(self):
        return {"world_size": self.job.world_size, "backend": self.backend()}

    def run(self, timer, progress=None):
        """Spawn the ranks; a rank that fails gives ``error`` rows (the job's table is written all the same)."""
        job = self.job
        p = EPProblem.from_job(job, self.config.expert, self.config.local_layout)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="moebench-ep-") as d:
            path = str(Path(d) / "rows.pt")
            try:
                spawn(_job_entry, job.world_size, (job.device.type, self.config.timeout_s, p, job.timing.warmup,
                                                   job.timing.repeats, path))
                rows = torch.load(path, weights_only=False)
            except Exception as e:  # noqa: BLE001 -- a failed rank is an error row, not a lost job
                msg = _error_message(e)
                log.error("ep_dispatch failed: %s", msg)
                return [{"stage": st, "stage_impl": p.stage_impl(st, self.backend()), "status": "error",
                         "message": msg} for st in STAGES]
        log.info("ep_dispatch: %d ranks done in %.1fs", job.world_size, time.perf_counter() - t0)
        return finish(rows)
