"""``bench=router``: logits to routing metadata -- the route stage (top-k gating), the metadata
stage on the reference's ids, and ``route_metadata``, the two chained (ids and weights straight
from the route into the metadata build), checked against the reference metadata."""

from moebench.benches.stages import METADATA, ROUTE, ROUTE_METADATA, StagesBench


class RouterBench(StagesBench):
    name = "router"
    chain = (ROUTE, METADATA, ROUTE_METADATA)
