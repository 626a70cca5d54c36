"""``bench=ep_dispatch``: expert parallelism over ``world_size`` ranks.

Experts are split evenly across ranks (rank ``d`` owns experts ``[d·E/W, (d+1)·E/W)``).
Every rank holds ``tokens`` tokens of its own (``tokens`` is *per rank*) and runs:

1. reference routing (``moebench.routing.route`` + ``build_metadata``) on its tokens -- done
   once, outside the timed region;
2. **dispatch**: exchange of the per-expert row counts (``all_to_all_single`` of an int64
   ``[E]`` tensor, ``E/W`` entries to each rank), pack (tokens to expert-contiguous rows,
   which are then contiguous per destination rank), one host read of the split sizes, and
   ``all_to_all_single`` of the packed rows with those variable split sizes;
3. local experts: ``identity`` (default: no work, the received buffer is the output) or
   ``scale`` (each row multiplied by a per-expert factor -- a misrouted row shows up);
4. **combine**: the reverse ``all_to_all_single`` (split sizes swapped) back into the rank's
   packed layout, then the reference weighted combine (fp32 accumulation).

The result equals the single-process reference ``combine(expert(pack(x)))`` bit for bit:
the same rows reach the same packed positions, and combine runs the same operations.

Ranks are processes started with ``torch.multiprocessing`` (spawn), rendezvous on a free TCP
port of 127.0.0.1, NCCL with one rank per GPU on CUDA, gloo on the CPU. They inherit the
parent's environment (``NCCL_*`` included). Rank 0 gathers every rank's rows and writes the
job's one table with ``moebench.results.write``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from moebench import results, routing
from moebench.check import Mismatch, assert_equal
from moebench.config import DTYPES, ConfigError, JobSpec, resolve
from moebench.logits import load_trace, make_logits
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata
from moebench.timing import Timing

log = logging.getLogger("moebench")

BENCH = "ep_dispatch"
#: rows of every rank, in order; ``raw_a2a`` is the ceiling measured in the same job
STAGES = ("dispatch", "combine", "total", "raw_a2a")
EXPERTS = ("identity", "scale")
DEFAULT_WORLD_SIZE = 2


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EPSettings:
    world_size: int = DEFAULT_WORLD_SIZE
    expert: str = "identity"
    timeout_s: int = 600

    def backend(self, device: torch.device) -> str:
        return "nccl" if device.type == "cuda" else "gloo"


def settings_of(cfg: DictConfig) -> EPSettings:
    """The expert-parallel keys of a composed config, validated (ConfigError one-liners)."""
    w = cfg.get("world_size", DEFAULT_WORLD_SIZE)
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ConfigError(f"world_size={w!r} is not accepted; world_size must be an integer >= 1")
    expert = cfg.bench.get("expert", "identity")
    if expert not in EXPERTS:
        raise ConfigError(f"bench.expert={expert!r} is not accepted; accepted: {', '.join(EXPERTS)}")
    timeout = cfg.bench.get("timeout_s", 600)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        raise ConfigError(f"bench.timeout_s={timeout!r} is not accepted; an integer >= 1 (seconds)")
    return EPSettings(w, expert, timeout)


#: the shipped implementations with pack and combine stages (routing and metadata stay the torch reference)
EP_IMPLS = ("torch", "compile", "cute")


def validate(cfg: DictConfig, job: JobSpec) -> EPSettings:
    """Called by ``config.resolve`` for ``bench=ep_dispatch``: what the job itself can check
    (the GPU count is checked when the job runs, see :func:`check_devices`)."""
    s = settings_of(cfg)
    if job.experts % s.world_size:
        divisors = [d for d in range(1, job.experts + 1) if job.experts % d == 0]
        raise ConfigError(f"experts={job.experts} is not divisible by world_size={s.world_size}; expert parallelism "
                          f"splits experts evenly across ranks: accepted world_size: {', '.join(map(str, divisors))}")
    from hydra.utils import instantiate

    from moebench.impls.base import Impl

    for stage in ("pack", "combine"):
        name = job.stage_impls[stage]
        if getattr(type(instantiate(job.impl_configs[name])), stage) is getattr(Impl, stage):
            raise ConfigError(f"impl_{stage}={name} is not accepted with bench=ep_dispatch: it has no {stage} stage "
                              f"(accepted: {', '.join(EP_IMPLS)})")
    if job.timing.mode != "events":
        raise ConfigError(f"timing={job.timing.mode} is not accepted with bench=ep_dispatch (the dispatch reads "
                          "its split sizes on the host); accepted: events")
    return s


def check_devices(device: torch.device, world_size: int, visible: int | None = None) -> None:
    """One rank per GPU: a ConfigError when ``world_size`` exceeds the visible GPUs."""
    if device.type != "cuda":
        return
    visible = torch.cuda.device_count() if visible is None else visible
    if world_size > visible:
        raise ConfigError(f"world_size={world_size} needs {world_size} GPUs (one rank per GPU) but {visible} "
                          f"{'is' if visible == 1 else 'are'} visible; accepted here: world_size <= {visible} "
                          "(or device=cpu for gloo ranks; under Slurm set hydra.launcher.gpus_per_node)")


# --------------------------------------------------------------------------------------
# The problem every rank solves, and its inputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EPProblem:
    """One expert-parallel routing problem. ``tokens`` is per rank."""

    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype_name: str = "bfloat16"
    seed: int = 17
    logits: dict = field(default_factory=lambda: {"kind": "uniform"})
    router: RouterSpec = RouterSpec()
    capacity: CapacitySpec = CapacitySpec()
    weighted: bool = True
    expert: str = "identity"
    #: experts no token picks (their logits are set to -1e4): an expert, or a rank, with no rows
    dead_experts: tuple[int, ...] = ()
    #: implementation configs (``conf/impl/*.yaml``) of the pack and combine around the all-to-alls
    pack_impl: dict = field(default_factory=lambda: {"_target_": "moebench.impls.torch_impl.TorchImpl", "name": "torch"})
    combine_impl: dict = field(default_factory=lambda: {"_target_": "moebench.impls.torch_impl.TorchImpl", "name": "torch"})

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @classmethod
    def from_job(cls, job: JobSpec, expert: str = "identity") -> "EPProblem":
        return cls(job.tokens, job.hidden, job.experts, job.topk, job.dtype_name, job.seed, dict(job.logits),
                   job.router, job.capacity, job.weighted, expert,
                   pack_impl=job.impl_configs[job.stage_impls["pack"]],
                   combine_impl=job.impl_configs[job.stage_impls["combine"]])

    def stage_impl(self, stage: str, backend: str) -> str:
        """What ran a stage: the pack / combine implementation and the collective backend."""
        p, c = self.pack_impl["name"], self.combine_impl["name"]
        return {"dispatch": f"{p}+{backend}", "combine": f"{c}+{backend}", "raw_a2a": backend}.get(
            stage, f"pack={p},combine={c}+{backend}")


@dataclass
class RankInputs:
    logits: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    meta: RoutingMetadata
    x: torch.Tensor


def rank_inputs(p: EPProblem, rank: int, world_size: int, device="cpu") -> RankInputs:
    """Rank ``rank``'s seeded inputs. The logits of all ranks are one draw of
    ``world_size·tokens`` rows (so a zipf/hot distribution favours the same experts on every
    rank), sliced per rank; activations are drawn per rank."""
    device = torch.device(device)
    T, E = p.tokens, p.experts
    params = {k: v for k, v in p.logits.items() if k != "kind"}
    allg = make_logits(p.logits["kind"], world_size * T, E, seed=p.seed, dtype=p.dtype, device="cpu", **params)
    logits = allg[rank * T:(rank + 1) * T].clone()
    if p.dead_experts:
        logits[:, list(p.dead_experts)] = -1e4
    logits = logits.to(device)
    bias = p.router.expert_bias(E, device, p.seed)
    ids, w = routing.route(logits, p.topk, p.router, bias)
    meta = routing.build_metadata(ids, w, E, p.capacity, p.router.num_rows(T, p.topk, E))
    g = torch.Generator(device=device).manual_seed(p.seed + 1 + 7919 * rank)
    x = torch.randn(T, p.hidden, generator=g, device=device, dtype=torch.float32).to(p.dtype)
    return RankInputs(logits, ids, w, meta, x)


# --------------------------------------------------------------------------------------
# Local experts and the single-process reference
# --------------------------------------------------------------------------------------


def expert_factor(experts: int, device) -> torch.Tensor:
    """The ``scale`` expert's per-expert factor (fp32, distinct for every expert)."""
    return 0.5 + (torch.arange(experts, device=device, dtype=torch.float32) + 1) / experts


def apply_experts(rows: torch.Tensor, expert_ids: torch.Tensor, kind: str, experts: int) -> torch.Tensor:
    """Rows [N, H] through their experts (``expert_ids`` [N], int64)."""
    if kind == "identity":
        return rows
    if kind == "scale":
        f = expert_factor(experts, rows.device)[expert_ids]
        return (rows.float() * f[:, None]).to(rows.dtype)
    raise ValueError(f"expert={kind!r}; accepted: {', '.join(EXPERTS)}")


def packed_expert_ids(meta: RoutingMetadata) -> torch.Tensor:
    """Expert of each packed row ``[0, offsets[E])`` (padding rows belong to their expert)."""
    rows_e = (meta.offsets[1:] - meta.offsets[:-1]).long()
    return torch.repeat_interleave(torch.arange(meta.num_experts, device=rows_e.device), rows_e)


def reference_forward(x: torch.Tensor, meta: RoutingMetadata, expert: str = "identity",
                      weighted: bool = True) -> torch.Tensor:
    """Single process: ``combine(expert(pack(x)))``."""
    packed = routing.pack(x, meta)
    n = int(meta.offsets[-1])
    y = packed.clone()
    y[:n] = apply_experts(packed[:n], packed_expert_ids(meta), expert, meta.num_experts)
    return routing.combine(y, meta, weighted=weighted)


# --------------------------------------------------------------------------------------
# Dispatch and combine across ranks
# --------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one dispatch moved (rows; the combine moves the same rows back)."""

    send_split: list[int]        # rows to each rank
    recv_split: list[int]        # rows from each rank
    recv_counts: torch.Tensor    # [W, E/W]: rows from rank s for local expert j
    n_send: int
    n_recv: int


class ExpertParallel:
    """Dispatch / local experts / combine of one rank, in an initialised process group."""

    def __init__(self, world_size: int, rank: int, experts: int, weighted: bool = True, group=None,
                 pack=routing.pack, combine=routing.combine):
        if experts % world_size:
            raise ValueError(f"experts={experts} not divisible by world_size={world_size}")
        self.W, self.rank, self.E, self.El = world_size, rank, experts, experts // world_size
        self.weighted, self.group = weighted, group
        self._pack, self._combine = pack, combine
        self._buf: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        b = self._buf.get(name)
        if b is None or b.shape[0] != rows or b.shape[1:] != like.shape[1:] or b.dtype != like.dtype:
            b = self._buf[name] = like.new_empty((rows, *like.shape[1:]))
        return b

    def dispatch(self, x: torch.Tensor, meta: RoutingMetadata) -> tuple[torch.Tensor, Plan]:
        """Counts all-to-all, pack, split sizes to the host, token all-to-all."""
        W = self.W
        send_counts = (meta.offsets[1:] - meta.offsets[:-1]).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        packed = self._pack(x, meta, out=self._buffer("packed", meta.num_rows, x))
        splits = torch.cat([send_counts.view(W, self.El).sum(1), recv_counts.view(W, self.El).sum(1)]).tolist()
        send_split, recv_split = splits[:W], splits[W:]
        n_send, n_recv = sum(send_split), sum(recv_split)
        recv = self._buffer("recv", n_recv, x)
        dist.all_to_all_single(recv, packed[:n_send], recv_split, send_split, group=self.group)
        return recv, Plan(send_split, recv_split, recv_counts.view(W, self.El), n_send, n_recv)

    def local_expert_ids(self, plan: Plan) -> torch.Tensor:
        """Global expert id of every received row (grouped by source rank, then expert)."""
        c = plan.recv_counts
        local = torch.arange(self.El, device=c.device).repeat(self.W) + self.rank * self.El
        return torch.repeat_interleave(local, c.flatten(), output_size=plan.n_recv)

    def experts(self, recv: torch.Tensor, plan: Plan, kind: str = "identity") -> torch.Tensor:
        if kind == "identity":
            return recv
        return apply_experts(recv, self.local_expert_ids(plan), kind, self.E)

    def combine(self, y: torch.Tensor, plan: Plan, meta: RoutingMetadata, out: torch.Tensor | None = None):
        """Reverse all-to-all into the packed layout, then the weighted combine."""
        back = self._buffer("back", meta.num_rows, y)
        if plan.n_send < meta.num_rows:
            back[plan.n_send:].zero_()
        dist.all_to_all_single(back[:plan.n_send], y, plan.send_split, plan.recv_split, group=self.group)
        return self._combine(back, meta, out=out, weighted=self.weighted)

    def forward(self, x: torch.Tensor, meta: RoutingMetadata, kind: str = "identity", out=None) -> torch.Tensor:
        recv, plan = self.dispatch(x, meta)
        return self.combine(self.experts(recv, plan, kind), plan, meta, out=out)


# --------------------------------------------------------------------------------------
# Starting ranks
# --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(rank: int, world_size: int, port: int, device_type: str, timeout_s: int = 600):
    """Initialise the default group (NCCL on cuda:<rank>, gloo on the CPU); yields the device."""
    timeout = _dt.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timeout)
    try:
        yield device
    finally:
        dist.destroy_process_group()


def _spawn(entry, world_size: int, args: tuple, tries: int = 3) -> None:
    """``torch.multiprocessing`` spawn of ``entry(rank, world_size, port, *args)``; the children
    inherit this process's environment. Retried on a lost port race."""
    import torch.multiprocessing as mp

    for attempt in range(tries):
        port = free_port()
        try:
            mp.start_processes(entry, args=(world_size, port, *args), nprocs=world_size, join=True,
                               start_method="spawn")
            return
        except mp.ProcessRaisedException as e:
            if attempt + 1 < tries and "address already in use" in str(e).lower():
                continue
            raise


def _launch_entry(rank, world_size, port, device_type, timeout_s, fn, args, outdir):
    with process_group(rank, world_size, port, device_type, timeout_s) as device:
        out = fn(rank, world_size, device, *args)
    torch.save(out, Path(outdir) / f"rank{rank}.pt")


def launch(fn, world_size: int, device_type: str = "cpu", args: tuple = (), timeout_s: int = 300) -> list:
    """Run the module-level ``fn(rank, world_size, device, *args)`` on ``world_size`` ranks in a
    process group; returns each rank's (picklable, torch.save-able) result, by rank."""
    with tempfile.TemporaryDirectory(prefix="moebench-ep-") as d:
        _spawn(_launch_entry, world_size, (device_type, timeout_s, fn, args, d))
        return [torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_problems(rank: int, world_size: int, device, problems: list[EPProblem]) -> dict:
    """For tests: each problem through :class:`ExpertParallel`; this rank's output and its
    single-process reference computed on the same device (both moved to the CPU), what it
    moved, and the rank's backend and ``NCCL_*`` environment."""
    cases = []
    for p in problems:
        inp = rank_inputs(p, rank, world_size, device)
        ep = ExpertParallel(world_size, rank, p.experts, p.weighted)
        recv, plan = ep.dispatch(inp.x, inp.meta)
        y = ep.combine(ep.experts(recv, plan, p.expert), plan, inp.meta)
        cases.append({"out": y.cpu(), "ref": reference_forward(inp.x, inp.meta, p.expert, p.weighted).cpu(),
                      "n_send": plan.n_send, "n_recv": plan.n_recv, "send_split": plan.send_split,
                      "recv_split": plan.recv_split, "recv_counts": plan.recv_counts.cpu(),
                      "recv_expert_ids": ep.local_expert_ids(plan).cpu()})
    return {"backend": dist.get_backend(), "device": str(device), "cases": cases,
            "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}


# --------------------------------------------------------------------------------------
# The job: timing on every rank, one table
# --------------------------------------------------------------------------------------


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


def time_collective(fn, device: torch.device, warmup: int, repeats: int, flush=None) -> list[float]:
    """Samples (us) of ``fn`` on this rank, every repeat started after a barrier: CUDA events
    on a GPU (L2 flushed before the barrier), the wall clock on the CPU."""
    for _ in range(warmup):
        _barrier(device)
        fn()
    samples = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for i in range(repeats):
            if flush is not None:
                flush.zero_()
            _barrier(device)
            starts[i].record()
            fn()
            ends[i].record()
        _sync(device)
        samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            _barrier(device)
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return samples


def _stats(samples: list[float]) -> dict:
    t = Timing.from_samples("", samples)
    return {"time_us_median": t.median_us, "time_us_p10": t.p10_us, "time_us_p90": t.p90_us,
            "time_us_mean": t.mean_us, "time_us_std": t.std_us, "repeats": t.repeats}


def _rank_rows(rank: int, W: int, device: torch.device, p: EPProblem, warmup: int, repeats: int,
               backend: str) -> list[dict]:
    from moebench.env import environment
    from moebench.metrics import routing_metrics
    from moebench.timing import L2_FLUSH_BYTES

    from hydra.utils import instantiate

    inp = rank_inputs(p, rank, W, device)
    pack_impl, combine_impl = instantiate(p.pack_impl), instantiate(p.combine_impl)
    ep = ExpertParallel(W, rank, p.experts, p.weighted, pack=pack_impl.pack, combine=combine_impl.combine)
    b = torch.finfo(p.dtype).bits // 8
    H = p.hidden
    out = torch.empty(p.tokens, H, dtype=p.dtype, device=device)

    # the checked first call (communicators are created here), then the scale expert as well
    _barrier(device)
    t0 = time.perf_counter()
    got = ep.forward(inp.x, inp.meta, p.expert, out=out)
    _sync(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    msg = ""
    try:
        assert_equal(got, reference_forward(inp.x, inp.meta, p.expert, p.weighted), f"EP output (expert={p.expert})")
        if p.expert != "scale":
            got = ep.forward(inp.x, inp.meta, "scale", out=out)
            assert_equal(got, reference_forward(inp.x, inp.meta, "scale", p.weighted), "EP output (expert=scale)")
    except Mismatch as e:
        msg = f"mismatch: rank {rank}: {e}"
    msgs = [None] * W
    dist.all_gather_object(msgs, msg)
    bad = next((m for m in msgs if m), "")

    recv, plan = ep.dispatch(inp.x, inp.meta)
    y = ep.experts(recv, plan, p.expert)
    moved = [None] * W
    dist.all_gather_object(moved, plan.n_send)
    n_raw = max(W, math.ceil(max(moved) / W) * W)  # the largest rank's send volume, split evenly
    raw_in = inp.x.new_zeros(n_raw, H)
    raw_out = torch.empty_like(raw_in)
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def timed(fn):
        return time_collective(fn, device, warmup, repeats, flush)

    even = [n_raw // W] * W  # explicit split sizes: the same (variable-size) call as the dispatch
    samples = {"raw_a2a": timed(lambda: dist.all_to_all_single(raw_out, raw_in, even, even))}
    if not bad:
        samples["dispatch"] = timed(lambda: ep.dispatch(inp.x, inp.meta))
        samples["combine"] = timed(lambda: ep.combine(y, plan, inp.meta, out=out))
        samples["total"] = timed(lambda: ep.forward(inp.x, inp.meta, p.expert, out=out))

    rows_io = {"dispatch": (plan.n_send, plan.n_recv), "combine": (plan.n_recv, plan.n_send),
               "total": (plan.n_send + plan.n_recv, plan.n_recv + plan.n_send), "raw_a2a": (n_raw, n_raw)}
    common = {**routing_metrics(inp.meta, inp.ids, inp.logits), **environment(device), "rank": rank,
              "capacity_per_expert": inp.meta.capacity}
    raw_us = statistics.median(samples["raw_a2a"])
    rows = []
    for stage in STAGES:
        sent, recvd = rows_io[stage]
        row = {**common, "stage": stage, "stage_impl": p.stage_impl(stage, backend),
               "rows_sent": sent, "rows_received": recvd, "bytes_sent": sent * H * b, "bytes_received": recvd * H * b}
        if stage not in samples:
            rows.append({**row, "status": "mismatch", "message": bad, "_samples": None})
            continue
        st = _stats(samples[stage])
        sec = st["time_us_median"] * 1e-6
        algbw = max(row["bytes_sent"], row["bytes_received"]) / sec / 1e9
        raw_ref = {"dispatch": raw_us, "combine": raw_us, "total": 2 * raw_us, "raw_a2a": raw_us}[stage]
        rows.append({**row, **st, "status": "ok", "message": "", "_samples": samples[stage],
                     "first_call_ms": first_ms if stage != "raw_a2a" else None,
                     "algbw_GBps": algbw, "busbw_GBps": algbw * (W - 1) / W,
                     "pct_of_raw": 100.0 * raw_ref / st["time_us_median"],
                     "tokens_per_s": p.tokens / sec if stage != "raw_a2a" else None})
    return rows


def _finish(per_rank: list[list[dict]], common: dict) -> list[dict]:
    """Rank 0: job-level columns (slowest rank, imbalance) and the common columns."""
    rows = [r for rank_rows in per_rank for r in rank_rows]
    recv = [r["rows_received"] for r in rows if r["stage"] == "dispatch"]
    mean = sum(recv) / len(recv)
    imbalance = max(recv) / mean if mean > 0 else float("nan")
    for stage in STAGES:
        ss = [r["_samples"] for r in rows if r["stage"] == stage]
        slowest = (statistics.median(max(v) for v in zip(*ss)) if all(s is not None for s in ss) else None)
        for r in rows:
            if r["stage"] == stage:
                r["time_us_slowest_rank"] = slowest
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if k != "_samples"}
        out.append({**common, **r, "recv_imbalance": imbalance})
    return sorted(out, key=lambda r: (STAGES.index(r["stage"]), r["rank"]))


def _job_entry(rank, world_size, port, device_type, timeout_s, p: EPProblem, warmup: int, repeats: int,
               common: dict, config_columns: dict, path: str) -> None:
    with process_group(rank, world_size, port, device_type, timeout_s) as device:
        backend = "nccl" if device.type == "cuda" else "gloo"
        rows = _rank_rows(rank, world_size, device, p, warmup, repeats, backend)
        gathered = [None] * world_size if rank == 0 else None
        dist.gather_object(rows, gathered, dst=0)
        if rank == 0:
            results.write(_finish(gathered, common), path, config_columns)


SUMMARY = ["stage", "rank", "status", "time_us_median", "time_us_slowest_rank", "bytes_sent", "bytes_received",
           "algbw_GBps", "busbw_GBps", "pct_of_raw", "recv_imbalance", "message"]


def summary(df) -> str:
    import pandas as pd

    v = df[[c for c in SUMMARY if c in df.columns]].copy()
    v["message"] = v["message"].fillna("").str.slice(0, 60)
    for c, f in (("time_us_median", "{:.1f}"), ("time_us_slowest_rank", "{:.1f}"), ("algbw_GBps", "{:.2f}"),
                 ("busbw_GBps", "{:.2f}"), ("pct_of_raw", "{:.1f}"), ("recv_imbalance", "{:.3f}")):
        v[c] = v[c].map(lambda x, f=f: "" if pd.isna(x) else f.format(x))
    for c in ("bytes_sent", "bytes_received"):
        v[c] = v[c].map(lambda x: "" if pd.isna(x) else f"{x / 1e6:.2f}")
    v["rank"] = v["rank"].map(lambda x: "" if pd.isna(x) else str(int(x)))
    v = v.rename(columns={"time_us_median": "us", "time_us_slowest_rank": "us_slowest", "bytes_sent": "MB_sent",
                          "bytes_received": "MB_recv", "algbw_GBps": "algbw", "busbw_GBps": "busbw",
                          "pct_of_raw": "%raw", "recv_imbalance": "imbal"})
    return v.to_string(index=False)


def _error_message(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    head = lines[0] if lines else type(e).__name__
    last = lines[-1] if lines else ""
    text = f"{head}: {last}" if last and last != head else head
    return f"error: {text}"[:500]


def run_job(cfg: DictConfig, output_dir: str | Path, *, sweep_dir: str = "", job_num: int = 0,
            overrides: str = ""):
    """``bench=ep_dispatch``: validate, spawn the ranks, load and print the table rank 0 wrote.
    A rank that fails gives ``error`` rows (the job's table is written all the same)."""
    from moebench.app import job_columns

    job = resolve(cfg)
    s = settings_of(cfg)
    check_devices(job.device, s.world_size)
    if job.logits["kind"] == "from_file":
        load_trace(job.logits["path"])  # a missing file is one line here, not a rank's traceback
    container = OmegaConf.to_container(cfg, resolve=True)
    container.pop("hydra", None)
    backend = s.backend(job.device)
    common = {
        **job_columns(job), "world_size": s.world_size, "backend": backend,
        "timing_mode": "events" if job.device.type == "cuda" else "wall",
        "output_dir": str(Path(output_dir).resolve()), "sweep_dir": sweep_dir, "job_num": job_num,
        "overrides": overrides, "config": json.dumps(container, sort_keys=True, default=str),
    }
    config_columns = results.flatten_config(container)
    path = Path(output_dir) / results.FILENAME
    p = EPProblem.from_job(job, s.expert)
    log.info("bench=%s world_size=%d backend=%s T=%d/rank H=%d E=%d (%d/rank) k=%d dtype=%s expert=%s",
             BENCH, s.world_size, backend, job.tokens, job.hidden, job.experts, job.experts // s.world_size,
             job.topk, job.dtype_name, s.expert)
    t0 = time.perf_counter()
    try:
        _spawn(_job_entry, s.world_size, (job.device.type, s.timeout_s, p, job.timing.warmup, job.timing.repeats,
                                          common, config_columns, str(path)))
    except Exception as e:  # noqa: BLE001 -- a failed rank is an error row, not a lost job
        msg = _error_message(e)
        log.error("ep_dispatch failed: %s", msg)
        rows = [{**common, "stage": st, "stage_impl": p.stage_impl(st, backend), "status": "error", "message": msg}
                for st in STAGES]
        results.write(rows, path, config_columns)
    df = results.load(path)
    log.info("ep_dispatch: %d ranks done in %.1fs", s.world_size, time.perf_counter() - t0)
    gpu = df["gpu_name"].dropna().iloc[0] if df["gpu_name"].notna().any() else ""
    nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_"))
    print(f"\n{BENCH} on {s.world_size} x {gpu or 'cpu'} ({backend}, timing {common['timing_mode']}) -> {path}"
          + (f"\nranks' environment: {nccl}" if nccl and backend == "nccl" else ""))
    print(summary(df))
    return df
