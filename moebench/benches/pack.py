"""``bench=pack``: dispatch alone, tokens to expert-contiguous rows (the reference metadata)."""

from moebench.benches.stages import PACK, StagesBench


class PackBench(StagesBench):
    name = "pack"
    chain = (PACK,)
