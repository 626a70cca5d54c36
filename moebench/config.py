"""From a composed Hydra config to a validated job description.

Every bad value is a :class:`ConfigError` whose message is one line naming the value and
what is accepted; it is raised before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moebench.impls.base import STAGES
from moebench.logits import KINDS as LOGITS_KINDS
from moebench.routing import CapacitySpec, RouterSpec
from moebench.timing import MODES, TimingSpec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
DEVICES = ("auto", "cuda", "cpu")

#: stages each bench measures, in order; ``total`` times the chain of the others
BENCHES = {
    "topk": ("route",),
    "pack": ("pack",),
    "combine": ("combine",),
    "routing": ("route", "metadata", "pack", "combine", "total"),
    # logits to full routing metadata: route, metadata on the reference ids, and the chain of both
    "router": ("route", "metadata", "route_metadata"),
    "capacity": ("metadata", "pack", "combine", "total"),
    # --- expert parallelism (moebench/ep.py): rows per rank; raw_a2a = the same job's ceiling ---
    "ep_dispatch": ("dispatch", "combine", "total", "raw_a2a"),
    # --- one MoE layer with per-expert SwiGLU (moebench/moe_layer.py); dense_gemm = the same job's ceiling ---
    "moe_layer": ("gate", "route", "metadata", "pack", "gemm1", "activation", "gemm2", "combine", "experts",
                  "total", "dense_gemm"),
}


class ConfigError(ValueError):
    """A bad configuration value; the message is one line."""


def options(group: str) -> list[str]:
    """The options of a config group (the YAML files under conf/<group>)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def shape_preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "shape" / f"{name}.yaml"))


@dataclass
class JobSpec:
    bench: str
    stages: tuple[str, ...]
    impl: str
    stage_impls: dict[str, str]
    shape: str
    tokens: int
    hidden: int
    experts: int
    topk: int
    dtype_name: str
    seed: int
    device: torch.device
    router: RouterSpec
    logits: dict
    capacity: CapacitySpec
    timing: TimingSpec
    weighted: bool = True
    impl_configs: dict[str, dict] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def capacity_name(self) -> str:
        return "dropless" if self.capacity.dropless else f"cf={self.capacity.factor:g}"


def _int(cfg, key: str, minimum: int = 1) -> int:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key}={v!r} is not accepted; {key} must be an integer >= {minimum}")
    return v


def _choice(value, key: str, accepted) -> str:
    if value not in accepted:
        raise ConfigError(f"{key}={value!r} is not accepted; accepted: {', '.join(map(str, accepted))}")
    return value


def resolve_device(name: str) -> torch.device:
    _choice(name, "device", DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible here; accepted on this machine: auto, cpu")
    return torch.device(name)


def _impl_config(name: str, key: str) -> dict:
    _choice(name, key, options("impl"))
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "impl" / f"{name}.yaml"))


def resolve(cfg: DictConfig) -> JobSpec:
    """Validate a composed config and fill what ``shape=auto`` leaves to the machine."""
    device = resolve_device(cfg.get("device", "auto"))
    bench = _choice(cfg.bench.name, "bench", tuple(BENCHES))
    shape = cfg.get("shape_name") or "auto"
    dims = {k: cfg.get(k) for k in ("tokens", "hidden", "experts", "topk")}
    if shape == "auto":
        shape = "seed" if device.type == "cuda" else "tiny"
        preset = shape_preset(shape)
        dims = {k: (preset[k] if v is None else v) for k, v in dims.items()}
    merged = OmegaConf.create(dims)
    tokens, hidden, experts = _int(merged, "tokens"), _int(merged, "hidden"), _int(merged, "experts")
    topk = _int(merged, "topk")
    if topk > experts:
        raise ConfigError(f"topk={topk} is not accepted with experts={experts}; topk must be <= experts")
    dtype_name = DTYPE_ALIASES.get(str(cfg.dtype), str(cfg.dtype))
    _choice(dtype_name, "dtype", tuple(DTYPES))
    seed = _int(cfg, "seed", minimum=0)

    r = OmegaConf.to_container(cfg.router)
    _choice(r.get("name"), "router", RouterSpec.NAMES)
    known = set(RouterSpec.__dataclass_fields__)
    unknown = sorted(set(r) - known)
    if unknown:
        raise ConfigError(f"router.{unknown[0]} is not a router option; accepted: {', '.join(sorted(known))}")
    router = RouterSpec(**r)
    _choice(router.normalize, "router.normalize", ("softmax", "sum"))
    _choice(router.score, "router.score", ("sigmoid", "softmax"))
    _choice(router.group_score, "router.group_score", ("top2_sum", "max"))
    if router.name == "top1" and topk != 1:
        raise ConfigError(f"router=top1 routes each token to one expert; topk={topk} is not accepted (use topk=1)")
    if router.name == "group_limited":
        if router.n_group < 1 or experts % router.n_group:
            raise ConfigError(f"router.n_group={router.n_group} does not divide experts={experts}; "
                              f"accepted: a divisor of {experts}")
        if not 1 <= router.topk_group <= router.n_group:
            raise ConfigError(f"router.topk_group={router.topk_group} is not accepted; 1..n_group={router.n_group}")
        if topk > router.topk_group * experts // router.n_group:
            raise ConfigError(f"topk={topk} exceeds the experts of topk_group={router.topk_group} groups "
                              f"({router.topk_group * experts // router.n_group})")

    lg = OmegaConf.to_container(cfg.logits)
    _choice(lg.get("kind"), "logits", LOGITS_KINDS)
    if lg["kind"] == "from_file" and not lg.get("path"):
        raise ConfigError("logits=from_file needs logits.path=<a .pt or .npy [T, E] tensor>")

    c = cfg.capacity
    cf = c.get("cf")
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf <= 0):
        raise ConfigError(f"capacity.cf={cf!r} is not accepted; a number > 0, or null for dropless")
    _choice(c.drop_policy, "capacity.drop_policy", CapacitySpec.DROP_POLICIES)
    if c.pad_to_capacity and cf is None:
        raise ConfigError("capacity.pad_to_capacity=true needs a capacity factor (capacity.cf=<number>)")
    capacity = CapacitySpec(None if cf is None else float(cf), int(c.min_capacity), c.drop_policy,
                            bool(c.pad_to_capacity), bool(c.renormalize_after_drop))
    if router.name == "expert_choice" and not capacity.dropless:
        raise ConfigError("router=expert_choice sets its own capacity (router.capacity_factor); "
                          f"capacity.cf={cf} is not accepted with it (use capacity=dropless)")
    if bench == "capacity" and capacity.dropless:
        raise ConfigError("bench=capacity needs a capacity factor; capacity.cf=null is not accepted (e.g. capacity.cf=1.25)")

    t = cfg.timing
    _choice(t.mode, "timing.mode", MODES)
    timing = TimingSpec(t.mode, _int(t, "warmup", 0), _int(t, "repeats", 1))

    impl = cfg.impl.name
    stages = BENCHES[bench]
    stage_impls, impl_configs = {}, {impl: OmegaConf.to_container(cfg.impl)}
    for s in STAGES:
        name = cfg.get(f"impl_{s}") or impl
        if name not in impl_configs:
            impl_configs[name] = _impl_config(name, f"impl_{s}")
        stage_impls[s] = name
    job = JobSpec(bench=bench, stages=stages, impl=impl, stage_impls=stage_impls, shape=shape, tokens=tokens,
                  hidden=hidden, experts=experts, topk=topk, dtype_name=dtype_name, seed=seed, device=device,
                  router=router, logits=lg, capacity=capacity, timing=timing,
                  weighted=bool(cfg.bench.get("weighted", True)), impl_configs=impl_configs)
    # --- bench=ep_dispatch (moebench/ep.py): world_size, bench.* keys, experts % world_size ---
    if bench == "ep_dispatch":
        from moebench.ep import validate as _validate_ep
        _validate_ep(cfg, job)
    # --- end ep_dispatch ---
    # --- bench=moe_layer (moebench/moe_layer.py): intermediate, bench.gemm and the other bench.* keys ---
    if bench == "moe_layer":
        from moebench.moe_layer import validate as _validate_moe_layer
        _validate_moe_layer(cfg, job)
    # --- end moe_layer ---
    return job
