"""``bench=topk``: top-k gating alone -- ``route`` (logits [T, E] -> expert ids and gate
weights) and ``select`` (the selection alone: ids and values of the k largest logits, no
weights, where the router selects a top-k of the logits)."""

from moebench.benches.stages import ROUTE, SELECT, StagesBench


class TopkBench(StagesBench):
    name = "topk"
    chain = (ROUTE, SELECT)
