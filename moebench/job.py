"""A job: what one run measures, resolved from a composed config and checked before anything runs.

:func:`resolve_job` turns the composed Hydra config into a :class:`JobSpec`. Every bad value
is a :class:`ConfigError` whose message is one line naming the key, the value and what is
accepted: keys the schemas do not know (Hydra lets ``+key=value`` add any), values the
schemas' ``__post_init__`` checks refuse, and combinations (``topk > experts``, a router's
shape rules). The bench adds its own checks on top (``moebench.benches``); nothing here
allocates a device buffer or writes a file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from moebench.errors import ConfigError
from moebench.impls import CONFIGS as IMPL_CONFIGS
from moebench.impls.base import STAGES, accepted
from moebench.logits import SCHEMAS as LOGITS_SCHEMAS
from moebench.routing import CapacityConfig, CapacitySpec, RouterSpec
from moebench.timing import TimingSpec

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
DEVICES = ("auto", "cuda", "cpu")


def options(group: str) -> list[str]:
    """The options of a config group (the YAML files under conf/<group>)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def shape_preset(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "shape" / f"{name}.yaml"))


@dataclass
class JobSpec:
    """One job, resolved: the problem, the implementations of each stage, how to time it, and
    the bench's own typed config (``bench_config``)."""

    bench: str
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
    intermediate: int | None = None
    world_size: int | None = None
    bench_config: Any = None
    #: the stages the bench measures, in order (set by the bench)
    stages: tuple[str, ...] = ()

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def capacity_name(self) -> str:
        return "dropless" if self.capacity.dropless else f"cf={self.capacity.factor:g}"


# -- schema checks -----------------------------------------------------------------------

def _object_type(node) -> type | None:
    t = node._metadata.object_type if isinstance(node, DictConfig) else None
    return t if t is not None and dataclasses.is_dataclass(t) else None


def _option_name(path: str, node: DictConfig) -> str:
    """``bench=pack`` / ``router=top1`` / ``impl=cute``: the group option a node came from."""
    for key in ("name", "kind"):
        if key in node and isinstance(node[key], str):
            return f" of {path}={node[key]}"
    return ""


def check_keys(cfg: DictConfig, path: str = "") -> None:
    """Every key of every schema-typed node is a field of its schema: ``+key=value`` (which
    Hydra lets add anything) and keys left over from another option are one-line errors."""
    t = _object_type(cfg)
    if t is not None:
        known = [f.name for f in dataclasses.fields(t)]
        for key in cfg.keys():
            if key not in known:
                where = f"{path}.{key}" if path else str(key)
                value = OmegaConf.select(cfg, str(key), throw_on_missing=False)
                what = f"a moebench option{_option_name(path, cfg)}" if path else "a moebench option"
                raise ConfigError(f"{where}={value!r} is not {what}; accepted: {', '.join(known)}")
    for key in cfg.keys():
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            check_keys(child, f"{path}.{key}" if path else str(key))


def typed(node: DictConfig, schema: type | None = None):
    """The node as an instance of its schema (``__post_init__`` checks run here)."""
    t = schema or _object_type(node)
    if t is None:
        return OmegaConf.to_container(node, resolve=True)
    if _object_type(node) is not t:
        node = OmegaConf.merge(OmegaConf.structured(t), node)
    return OmegaConf.to_object(node)


def impl_config(name: str, key: str) -> dict:
    """The config of ``conf/impl/<name>.yaml`` checked against its schema (``impl_<stage>=<name>``)."""
    accepted(key, name, options("impl"))
    raw = OmegaConf.load(CONF_DIR / "impl" / f"{name}.yaml")
    raw.pop("defaults", None)
    typed(raw, IMPL_CONFIGS.get(name))
    return OmegaConf.to_container(raw, resolve=True)


def _int(value, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} is not accepted; {key} must be an integer >= {minimum}")
    return value


def resolve_device(name: str) -> torch.device:
    accepted("device", name, DEVICES)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible here; accepted on this machine: auto, cpu")
    return torch.device(name)


def _router(cfg: DictConfig, experts: int, topk: int) -> RouterSpec:
    r = OmegaConf.to_container(cfg.router, resolve=True)
    accepted("router", r.get("name"), RouterSpec.NAMES)
    unknown = sorted(set(r) - {f.name for f in dataclasses.fields(RouterSpec)})
    if unknown:
        raise ConfigError(f"router.{unknown[0]} is not a router option; accepted: "
                          f"{', '.join(f.name for f in dataclasses.fields(RouterSpec))}")
    spec = RouterSpec(**r)
    spec.router.check(experts, topk)
    return spec


def resolve_job(cfg: DictConfig) -> JobSpec:
    """Validate a composed config and fill what ``shape=auto`` leaves to the machine."""
    check_keys(cfg)
    device = resolve_device(cfg.get("device", "auto"))
    bench = cfg.bench.name
    shape = cfg.get("shape_name") or "auto"
    dims = {k: cfg.get(k) for k in ("tokens", "hidden", "experts", "topk", "intermediate")}
    if shape == "auto":
        shape = "seed" if device.type == "cuda" else "tiny"
        preset = shape_preset(shape)
        dims = {k: (preset.get(k) if v is None else v) for k, v in dims.items()}
    tokens, hidden, experts = (_int(dims[k], k) for k in ("tokens", "hidden", "experts"))
    topk = _int(dims["topk"], "topk")
    if topk > experts:
        raise ConfigError(f"topk={topk} is not accepted with experts={experts}; topk must be <= experts")
    inter = dims["intermediate"]
    if inter is not None:
        _int(inter, "intermediate")
    dtype_name = DTYPE_ALIASES.get(str(cfg.dtype), str(cfg.dtype))
    accepted("dtype", dtype_name, tuple(DTYPES))
    seed = _int(cfg.seed, "seed", minimum=0)
    router = _router(cfg, experts, topk)

    lg = cfg.logits
    accepted("logits", lg.get("kind"), tuple(LOGITS_SCHEMAS))
    typed(lg, LOGITS_SCHEMAS[lg.kind])
    capacity = typed(cfg.capacity, CapacityConfig).spec()
    if router.name == "expert_choice" and not capacity.dropless:
        raise ConfigError("router=expert_choice sets its own capacity (router.capacity_factor); "
                          f"capacity.cf={capacity.factor:g} is not accepted with it (use capacity=dropless)")
    timing = typed(cfg.timing, TimingSpec)
    if not isinstance(timing, TimingSpec):  # a config composed without the schema
        timing = TimingSpec(**timing)

    impl = cfg.impl.name
    typed(cfg.impl, None if _object_type(cfg.impl) else IMPL_CONFIGS.get(impl))
    stage_impls, impl_configs = {}, {impl: OmegaConf.to_container(cfg.impl, resolve=True)}
    for s in STAGES:
        name = cfg.get(f"impl_{s}") or impl
        if name not in impl_configs:
            impl_configs[name] = impl_config(name, f"impl_{s}")
        stage_impls[s] = name
    world_size = cfg.get("world_size")
    if world_size is not None:
        _int(world_size, "world_size")
    return JobSpec(bench=bench, impl=impl, stage_impls=stage_impls, shape=shape, tokens=tokens, hidden=hidden,
                   experts=experts, topk=topk, dtype_name=dtype_name, seed=seed, device=device, router=router,
                   logits=OmegaConf.to_container(lg, resolve=True), capacity=capacity, timing=timing,
                   weighted=bool(cfg.bench.get("weighted", True)), impl_configs=impl_configs,
                   intermediate=inter, world_size=world_size)
