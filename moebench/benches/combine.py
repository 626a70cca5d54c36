"""``bench=combine``: the weighted un-permute alone, packed rows back to token order."""

from moebench.benches.stages import COMBINE, StagesBench


class CombineBench(StagesBench):
    name = "combine"
    chain = (COMBINE,)
