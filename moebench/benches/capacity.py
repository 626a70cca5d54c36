"""``bench=capacity``: metadata -> pack -> combine with a capacity enforced (drops, padding),
a row per stage and the chain (``total``); the balance and drop columns say what it cost."""

from moebench.benches.stages import COMBINE, METADATA, PACK, StagesBench, Total
from moebench.errors import ConfigError


class CapacityBench(StagesBench):
    name = "capacity"
    chain = (METADATA, PACK, COMBINE, Total(("metadata", "pack", "combine")))

    @classmethod
    def validate(cls, job):
        if job.capacity.dropless:
            raise ConfigError("bench=capacity needs a capacity factor; capacity.cf=null is not accepted "
                              "(e.g. capacity.cf=1.25)")
