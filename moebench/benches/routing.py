"""``bench=routing``: route -> metadata -> pack -> (identity experts) -> combine, a row per
stage and one for the whole chain timed as one call (``total``)."""

from moebench.benches.stages import COMBINE, METADATA, PACK, ROUTE, StagesBench, Total


class RoutingBench(StagesBench):
    name = "routing"
    chain = (ROUTE, METADATA, PACK, COMBINE, Total(("route", "metadata", "pack", "combine")))
