"""impl=compile: ``torch.compile`` of the strong eager torch stage functions
(``moebench.impls.torch_impl``: torch.topk, the sort-free metadata, index_select pack, gather +
bmm combine), with its tie rule (``exact_ties`` as impl=torch).

Each stage (route, metadata, pack, combine) is compiled on its first call with the
options of ``conf/impl/compile.yaml`` (``mode``, ``dynamic``, ``fullgraph``, ``backend``).
The harness times that first call separately (``first_call_ms``, compile time included)
and times the later calls, which hit the compiled code: the arguments of a stage are the
same tensors (shape, dtype, strides) and the same router/capacity constants every call,
so dynamo's guards pass and nothing recompiles inside the timed loop.

fullgraph: asked for per stage; if dynamo cannot trace a stage whole (a graph break, e.g.
``fractions.Fraction`` in ``routing.ceil_capacity``, which the metadata build calls under a
capacity) the stage is compiled again without it -- still torch.compile of the same functions,
with graph breaks -- and the reason is kept in ``graph_breaks[stage]`` and logged.

Recompiles: dynamo caches compiled code per Python function, across impl instances, and
after ``recompile_limit`` variants (torch's default: 8) it silently runs the function
eagerly. A sweep over many shapes/dtypes/routers in one process (Hydra's multirun, the
tests) passes that easily, and eager torch must never be timed as ``impl=compile``: the
limit is raised to ``recompile_limit`` and dynamo's ``fail_on_recompile_limit_hit`` is
set, so going past it is an ``error`` row, not an eager measurement. (These are process-
wide dynamo settings; they only make dynamo stricter or roomier, not different.)

``mode: reduce-overhead`` wraps the stage in torch's own CUDA graphs; with
``timing=graph`` the harness captures it again -- prefer ``mode: default`` there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moebench.errors import ConfigError
from moebench.impls import torch_impl
from moebench.impls.base import Impl, ImplConfig, accepted

log = logging.getLogger(__name__)

STAGE_FUNCTIONS = {
    "route": torch_impl.route,
    "select": torch_impl.select,
    "metadata": torch_impl.metadata,
    "pack": torch_impl.pack,
    "combine": torch_impl.combine,
    "pack_fp8": torch_impl.pack_fp8,
    "route_backward": torch_impl.route_backward,
    "pack_backward": torch_impl.pack_backward,
    "combine_backward": torch_impl.combine_backward,
}


#: torch.compile's modes (``default`` = torch's default, no mode argument)
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class CompileConfig(ImplConfig):
    _target_: str = "moebench.impls.compile_impl.CompileImpl"
    name: str = "compile"
    mode: str = "default"
    dynamic: bool | None = False
    fullgraph: bool = True
    backend: str = "inductor"
    recompile_limit: int = 64

    def __post_init__(self):
        accepted("impl.mode", self.mode, MODES)
        if self.recompile_limit < 1:
            raise ConfigError(f"impl.recompile_limit={self.recompile_limit} is not accepted; an integer >= 1")
        if not self.backend:
            raise ConfigError("impl.backend='' is not accepted; a torch.compile backend, e.g. inductor")


def _graph_break_errors() -> tuple[type[BaseException], ...]:
    exc = torch._dynamo.exc
    return tuple(getattr(exc, n) for n in ("Unsupported", "UserError") if hasattr(exc, n))


class CompileImpl(Impl):
    name = "compile"
    exact_ties = False  # torch.topk, compiled

    def exact_ties_for(self, router):
        return torch_impl.uses_reference_selection(router)

    def __init__(self, name: str | None = None, mode: str | None = "default", dynamic: bool | None = False,
                 fullgraph: bool = True, backend: str = "inductor", recompile_limit: int = 64, **options):
        super().__init__(name, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend,
                         recompile_limit=recompile_limit, **options)
        self.mode = None if mode in (None, "default") else mode
        self.dynamic = dynamic
        self.fullgraph = bool(fullgraph)
        self.backend = backend
        self.recompile_limit = int(recompile_limit)
        self._compiled: dict[str, object] = {}
        self._fullgraph: dict[str, bool] = {}
        #: stage -> why fullgraph tracing failed (the stage then runs with graph breaks)
        self.graph_breaks: dict[str, str] = {}

    # -- compilation -------------------------------------------------------------------------
    def _configure_dynamo(self) -> None:
        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) < self.recompile_limit:
                setattr(cfg, key, self.recompile_limit)
                break
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            cfg.fail_on_recompile_limit_hit = True

    def compiled(self, stage: str, fullgraph: bool | None = None):
        """The compiled stage function (compiled lazily, once per stage and fullgraph setting)."""
        if stage not in self._compiled or (fullgraph is not None and fullgraph != self._fullgraph[stage]):
            fg = self.fullgraph if fullgraph is None else fullgraph
            self._configure_dynamo()
            kwargs = {"fullgraph": fg, "dynamic": self.dynamic, "backend": self.backend}
            if self.mode is not None:
                kwargs["mode"] = self.mode
            self._compiled[stage] = torch.compile(STAGE_FUNCTIONS[stage], **kwargs)
            self._fullgraph[stage] = fg
        return self._compiled[stage]

    def _call(self, stage: str, *args):
        fn = self.compiled(stage)
        if not self._fullgraph[stage]:
            return fn(*args)
        try:
            return fn(*args)
        except _graph_break_errors() as e:
            # fullgraph tracing failed before anything ran: compile with graph breaks instead
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            self.graph_breaks[stage] = why
            log.warning("impl=%s: %s does not compile as one graph (%s); compiling it with graph breaks",
                        self.name, stage, why)
            return self.compiled(stage, fullgraph=False)(*args)

    # -- stages --------------------------------------------------------------------------
    def route(self, logits, k, router, bias=None, out=None):
        return self._call("route", logits, k, router, bias)

    def select(self, logits, k, router, bias=None, out=None):
        return self._call("select", logits, 1 if router.name == "top1" else k)

    def metadata(self, ids, weights, num_experts, capacity, num_rows=None):
        return self._call("metadata", ids, weights, num_experts, capacity, num_rows)

    def pack(self, x, meta, out=None):
        return self._call("pack", x, meta, out)

    def combine(self, y, meta, out=None, weighted=True):
        return self._call("combine", y, meta, out, weighted)

    def pack_fp8(self, x, meta, quant, out=None):
        return self._call("pack_fp8", x, meta, quant)

    def route_backward(self, logits, ids, weights, d_weights, router, bias=None):
        return self._call("route_backward", logits, ids, weights, d_weights, router)

    def pack_backward(self, d_packed, meta):
        return self._call("pack_backward", d_packed, meta)

    def combine_backward(self, d_out, y, meta, weighted=True):
        return self._call("combine_backward", d_out, y, meta, weighted)
