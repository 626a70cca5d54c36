"""``bench=pack``: dispatch alone, tokens to expert-contiguous rows (the reference metadata);
``bench.quant`` packs FP8 rows with block scales instead (forward only)."""

from __future__ import annotations

from dataclasses import dataclass

from moebench import routing
from moebench.benches.base import BenchConfig
from moebench.benches.stages import PACK, PackQuant, StagesBench, plant_extremes, stage_case
from moebench.errors import ConfigError


@dataclass
class PackConfig(BenchConfig):
    #: none | fp8_block128 (fp32 scales, amax / 448 per 128 channels) | fp8_ue8m0 (power-of-two scales)
    quant: str = "none"

    def __post_init__(self):
        super().__post_init__()
        if self.quant not in routing.QUANTS:
            raise ConfigError(f"bench.quant={self.quant!r} is not accepted; accepted: {', '.join(routing.QUANTS)}")
        if self.quant != "none" and self.direction != "fwd":
            raise ConfigError(f"bench.direction={self.direction!r} with bench.quant={self.quant}: the quantized "
                              "pack is forward only; accepted: fwd")


class PackBench(StagesBench):
    name = "pack"
    Config = PackConfig
    chain = (PACK,)

    def setup(self, timer):
        super().setup(timer)
        if self.config is not None and self.config.quant != "none":  # the rows a quantizer gets wrong first
            self.inp.x = plant_extremes(self.inp.x)

    def cases(self):
        quant = self.config.quant if self.config is not None else "none"
        if quant == "none":
            return super().cases()
        return [stage_case(PackQuant(quant), self.job, self.impls, self.inp)]
