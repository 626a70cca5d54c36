"""The expert-parallel problem every rank solves: its seeded inputs (``tokens`` per rank),
its local experts, and the single-process reference ``combine(expert(pack(x)))``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from moebench import routing
from moebench.job import DTYPES, JobSpec
from moebench.logits import make_logits
from moebench.routing import CapacitySpec, RouterSpec, RoutingMetadata

EXPERTS = ("identity", "scale")


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
    #: the metadata stage's implementation (layout=expert: the rank-local metadata of the received rows)
    metadata_impl: dict = field(default_factory=lambda: {"_target_": "moebench.impls.torch_impl.TorchImpl",
                                                         "name": "torch"})
    #: how the received rows reach the experts (``parallel.LAYOUTS``)
    layout: str = "expert"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @classmethod
    def from_job(cls, job: JobSpec, expert: str = "identity", layout: str = "expert") -> EPProblem:
        return cls(job.tokens, job.hidden, job.experts, job.topk, job.dtype_name, job.seed, dict(job.logits),
                   job.router, job.capacity, job.weighted, expert,
                   pack_impl=job.impl_configs[job.stage_impls["pack"]],
                   combine_impl=job.impl_configs[job.stage_impls["combine"]],
                   metadata_impl=job.impl_configs[job.stage_impls["metadata"]], layout=layout)

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
    # the rows a rank sends are packed tight: capacity.align applies to its local experts' blocks
    tight = dataclasses.replace(p.capacity, align=1)
    meta = routing.build_metadata(ids, w, E, tight, p.router.num_rows(T, p.topk, E))
    g = torch.Generator(device=device).manual_seed(p.seed + 1 + 7919 * rank)
    x = torch.randn(T, p.hidden, generator=g, device=device, dtype=torch.float32).to(p.dtype)
    return RankInputs(logits, ids, w, meta, x)


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


