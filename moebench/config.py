"""The Hydra side of moebench: the schemas of every config group in Hydra's ConfigStore, the
options of each group, composing a config with one-line errors, and :func:`resolve` (the job
and its bench's own checks).

Schemas (registered on import): the top-level :class:`MoebenchConfig`; per option of
``bench`` (each bench's ``Config``), ``impl`` (``moebench.impls.CONFIGS``), ``router`` (each
router's options, ``Router.schema``) and ``logits`` (``moebench.logits.SCHEMAS``), named
``_schema_<option>`` and named first in that option's YAML defaults list; ``capacity`` and
``timing`` are typed fields of the top-level schema. Hydra and OmegaConf then reject wrong types
while composing; :func:`moebench.job.check_keys` rejects the unknown keys that ``+key=value`` adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from moebench.benches import BENCHES
from moebench.errors import ConfigError
from moebench.impls import CONFIGS as IMPL_CONFIGS
from moebench.impls.base import ImplConfig, accepted
from moebench.job import CONF_DIR, DTYPES, JobSpec, options, resolve_job, shape_preset, typed
from moebench.logits import SCHEMAS as LOGITS_SCHEMAS
from moebench.routing import ROUTERS, CapacityConfig
from moebench.timing import TimingSpec

__all__ = ["CONF_DIR", "DTYPES", "ConfigError", "JobSpec", "MoebenchConfig", "compose", "options", "resolve",
           "shape_preset"]


@dataclass
class MoebenchConfig:
    """The top-level schema (``conf/config.yaml``)."""

    impl: Any = MISSING
    router: Any = MISSING
    logits: Any = MISSING
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    timing: TimingSpec = field(default_factory=TimingSpec)
    bench: Any = MISSING
    # the problem size (set by the shape preset; null = filled by shape=auto for this machine)
    shape_name: str = "auto"
    tokens: int | None = None
    hidden: int | None = None
    experts: int | None = None
    topk: int | None = None
    intermediate: int | None = None  # expert FFN size (bench=moe_layer)
    dtype: str = "bfloat16"
    seed: int = 17
    device: str = "auto"
    # per-stage implementation (a name from conf/impl); null = the impl group's choice
    impl_route: str | None = None
    impl_metadata: str | None = None
    impl_pack: str | None = None
    impl_combine: str | None = None
    world_size: int | None = None  # ranks of bench=ep_dispatch
    # re-running into an earlier job or sweep folder: skip each job whose table holds the same
    # config and no failed row (moebench.runner.resume_skip)
    resume: bool = False


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="_schema", node=MoebenchConfig)
    cs.store(group="impl", name="_schema", node=ImplConfig)  # for an implementation of one's own
    groups = {"bench": {n: b.Config for n, b in BENCHES.items()}, "impl": IMPL_CONFIGS,
              "router": {n: r.schema() for n, r in ROUTERS.items()}, "logits": LOGITS_SCHEMAS}
    for group, schemas in groups.items():
        for name, node in schemas.items():
            cs.store(group=group, name=f"_schema_{name}", node=node)


register()


# -- composing, with one-line errors ---------------------------------------------------

_EXPECTED = {"bool": "accepted: true, false", "Integer": "an integer", "Float": "a number", "int": "an integer",
             "float": "a number"}


def _expected(msg: str) -> str:
    for key, what in _EXPECTED.items():
        if f"valid {key}" in msg or f"to {key}" in msg:
            return what
    return msg.splitlines()[0] if msg else "see `python run.py --cfg job`"


def _unknown_key(key: str, value: str | None, overrides: list[str]) -> str:
    """``key=value is not an option of <group>=<option>; accepted: ...`` (the keys beside it,
    composed without the override that named it)."""
    parent, _, _ = key.rpartition(".")
    rest = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key]
    shown = f"{key}={value}" if value is not None else key
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = hydra_compose("config", overrides=rest)
        node = OmegaConf.select(node, parent) if parent else node
    except Exception:  # noqa: BLE001 -- only for the message
        node = None
    if not isinstance(node, DictConfig):
        return f"{shown} is not a moebench option"
    option = next((f" of {parent}={node[k]}" for k in ("name", "kind") if parent and isinstance(node.get(k), str)), "")
    return f"{shown} is not an option{option}; accepted: {', '.join(map(str, node.keys()))}"


def composition_error(e: BaseException, overrides: list[str]) -> str:
    """One line for a Hydra/OmegaConf composition error: the key, the value, what is accepted."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    full_key = getattr(cause, "full_key", None)
    msg = str(getattr(cause, "msg", None) or cause)
    if full_key and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key), None)
        return _unknown_key(full_key, value, overrides)
    if full_key:
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key),
                     getattr(cause, "value", None))
        return f"{full_key}={value} is not accepted; {_expected(msg)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def compose(overrides: list[str] | tuple[str, ...] = (), return_hydra_config: bool = False) -> DictConfig:
    """The job config of these overrides (Hydra's compose API on ``conf/``); a composition
    error is a one-line ConfigError."""
    from hydra.errors import HydraException

    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(composition_error(e, overrides)) from None


# -- the job and its bench ---------------------------------------------------------------

def resolve(cfg: DictConfig) -> JobSpec:
    """The job of a composed config, checked by its bench too (``Bench.validate``): every
    ConfigError is raised here, before anything is allocated or written."""
    job = resolve_job(cfg)
    accepted("bench", job.bench, tuple(BENCHES))
    bench = BENCHES[job.bench]
    job.bench_config = typed(cfg.bench, bench.Config)
    job.stages = bench.stages
    if job.world_size is not None and not bench.multi_rank:
        raise ConfigError(f"world_size={job.world_size} is not accepted with bench={job.bench}; it sets the ranks "
                          "of bench=ep_dispatch")
    bench.validate(job)
    return job
