"""``bench=topk``: top-k gating alone, logits [T, E] -> expert ids and gate weights."""

from moebench.benches.stages import ROUTE, StagesBench


class TopkBench(StagesBench):
    name = "topk"
    chain = (ROUTE,)
