"""Dispatch and combine across ranks (``ExpertParallel``), and starting ranks: processes
started with ``torch.multiprocessing`` (spawn), rendezvous on a free TCP port of 127.0.0.1,
NCCL with one rank per GPU on CUDA, gloo on the CPU. They inherit the parent's environment
(``NCCL_*`` included)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moebench import routing
from moebench.benches.ep_dispatch.problem import (EPProblem, apply_experts, packed_expert_ids, rank_inputs,
                                                  reference_forward)
from moebench.check import poison
from moebench.routing import RoutingMetadata


@dataclass
class Plan:
    """What one dispatch moved (rows; the combine moves the same rows back)."""

    send_split: list[int]        # rows to each rank
    recv_split: list[int]        # rows from each rank
    recv_counts: torch.Tensor    # [W, E/W]: rows from rank s for local expert j
    n_send: int
    n_recv: int
    #: layout=expert: the rank-local metadata that grouped the received rows by local expert
    local: RoutingMetadata | None = None


#: how a rank hands its received rows to its experts: ``expert`` -- grouped by local expert
#: (rank-local metadata, each expert's rows contiguous, blocks aligned with ``capacity.align``:
#: what a grouped GEMM reads); ``source`` -- as received (by source rank, then expert)
LAYOUTS = ("expert", "source")


class ExpertParallel:
    """Dispatch / local experts / combine of one rank, in an initialised process group.

    ``pack`` / ``combine`` / ``metadata``: the implementation's stages around the all-to-alls.
    With ``layout="expert"`` the received rows (grouped by source rank) are regrouped by local
    expert through :func:`routing.local_metadata` (built by ``metadata``, packed by ``pack``),
    and the combine's first step puts them back in received order (an unweighted combine of
    one slot per row) before the reverse all-to-all."""

    def __init__(self, world_size: int, rank: int, experts: int, weighted: bool = True, group=None,
                 pack=routing.pack, combine=routing.combine, metadata=routing.build_metadata,
                 layout: str = "expert", align: int = 1):
        if experts % world_size:
            raise ValueError(f"experts={experts} not divisible by world_size={world_size}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; accepted: {', '.join(LAYOUTS)}")
        self.W, self.rank, self.E, self.El = world_size, rank, experts, experts // world_size
        self.weighted, self.group = weighted, group
        self._pack, self._combine, self._metadata = pack, combine, metadata
        self.layout, self.align = layout, align
        self.local = range(rank * self.El, (rank + 1) * self.El)
        self._buf: dict[str, torch.Tensor] = {}

    def _buffer(self, name: str, rows: int, like: torch.Tensor) -> torch.Tensor:
        b = self._buf.get(name)
        if b is None or b.shape[0] != rows or b.shape[1:] != like.shape[1:] or b.dtype != like.dtype:
            b = self._buf[name] = like.new_empty((rows, *like.shape[1:]))
        return b

    def poison(self) -> None:
        """Fill the buffers it reuses (packed, received, returned rows) with values no correct
        dispatch or combine leaves behind, so a row one of them fails to write shows."""
        for b in self._buf.values():
            poison(b)

    def dispatch(self, x: torch.Tensor, meta: RoutingMetadata) -> tuple[torch.Tensor, Plan]:
        """Counts all-to-all, pack, split sizes to the host, token all-to-all; with
        ``layout="expert"`` the received rows grouped by local expert."""
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
        plan = Plan(send_split, recv_split, recv_counts.view(W, self.El), n_send, n_recv)
        if self.layout == "source":
            return recv, plan
        ids = self.local_expert_ids(plan).to(torch.int32)[:, None]
        plan.local = routing.local_metadata(ids, torch.ones(ids.shape, device=ids.device), self.E, self.local,
                                            routing.CapacitySpec(align=self.align), build=self._metadata)
        return self._pack(recv, plan.local, out=self._buffer("grouped", plan.local.num_rows, x)), plan

    def local_expert_ids(self, plan: Plan) -> torch.Tensor:
        """Global expert id of every received row (grouped by source rank, then expert)."""
        c = plan.recv_counts
        local = torch.arange(self.El, device=c.device).repeat(self.W) + self.rank * self.El
        return torch.repeat_interleave(local, c.flatten(), output_size=plan.n_recv)

    def experts(self, recv: torch.Tensor, plan: Plan, kind: str = "identity") -> torch.Tensor:
        if kind == "identity":
            return recv
        if plan.local is None:
            return apply_experts(recv, self.local_expert_ids(plan), kind, self.E)
        n = int(plan.local.offsets[-1])  # the blocks' rows (padding included); the rest is nobody's
        out = recv.clone()
        out[:n] = apply_experts(recv[:n], packed_expert_ids(plan.local) + self.rank * self.El, kind, self.E)
        return out

    def combine(self, y: torch.Tensor, plan: Plan, meta: RoutingMetadata, out: torch.Tensor | None = None):
        """(layout=expert: the rows back in received order,) the reverse all-to-all into the
        packed layout, then the weighted combine."""
        if plan.local is not None:
            y = self._combine(y, plan.local, out=self._buffer("ungrouped", plan.n_recv, y), weighted=False)
        back = self._buffer("back", meta.num_rows, y)
        if plan.n_send < meta.num_rows:
            back[plan.n_send:].zero_()
        dist.all_to_all_single(back[:plan.n_send], y, plan.send_split, plan.recv_split, group=self.group)
        return self._combine(back, meta, out=out, weighted=self.weighted)

    def forward(self, x: torch.Tensor, meta: RoutingMetadata, kind: str = "identity", out=None) -> torch.Tensor:
        recv, plan = self.dispatch(x, meta)
        return self.combine(self.experts(recv, plan, kind), plan, meta, out=out)


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


def spawn(entry, world_size: int, args: tuple, tries: int = 3) -> None:
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
        spawn(_launch_entry, world_size, (device_type, timeout_s, fn, args, d))
        return [torch.load(Path(d) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def run_problems(rank: int, world_size: int, device, problems: list[EPProblem]) -> dict:
    """For tests: each problem through :class:`ExpertParallel`; this rank's output and its
    single-process reference computed on the same device (both moved to the CPU), what it
    moved, and the rank's backend and ``NCCL_*`` environment."""
    cases = []
    for p in problems:
        inp = rank_inputs(p, rank, world_size, device)
        ep = ExpertParallel(world_size, rank, p.experts, p.weighted, layout=p.layout, align=p.capacity.align)
        recv, plan = ep.dispatch(inp.x, inp.meta)
        y = ep.combine(ep.experts(recv, plan, p.expert), plan, inp.meta)
        cases.append({"out": y.cpu(), "ref": reference_forward(inp.x, inp.meta, p.expert, p.weighted).cpu(),
                      "n_send": plan.n_send, "n_recv": plan.n_recv, "send_split": plan.send_split,
                      "recv_split": plan.recv_split, "recv_counts": plan.recv_counts.cpu(),
                      "recv_expert_ids": ep.local_expert_ids(plan).cpu(),
                      "local_offsets": None if plan.local is None else plan.local.offsets.cpu(),
                      "local_gather": None if plan.local is None else plan.local.gather_idx.cpu()})
    return {"backend": dist.get_backend(), "device": str(device), "cases": cases,
            "env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}


