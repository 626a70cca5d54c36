"""The benches: one module (or package) per ``conf/bench`` option, each a :class:`Bench`
(``base.py``) with its typed config. ``BENCHES`` maps the option to its class."""

from moebench.benches.base import Bench, BenchConfig, Call, Case, measure
from moebench.benches.capacity import CapacityBench
from moebench.benches.combine import CombineBench
from moebench.benches.ep_dispatch import EPDispatchBench
from moebench.benches.moe_layer import MoeLayerBench
from moebench.benches.pack import PackBench
from moebench.benches.router import RouterBench
from moebench.benches.routing import RoutingBench
from moebench.benches.topk import TopkBench

BENCHES: dict[str, type[Bench]] = {b.name: b for b in (TopkBench, PackBench, CombineBench, RoutingBench,
                                                        CapacityBench, RouterBench, MoeLayerBench, EPDispatchBench)}

__all__ = ["BENCHES", "Bench", "BenchConfig", "Call", "Case", "measure"]
