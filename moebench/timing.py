"""Timing: device events with the L2 flushed between repeats, CUDA-graph replay, or a
host wall clock on the CPU -- the same statistics in every mode (METHOD.md habits:
warm-up first, many repeats, median; compile/first-call time kept out of the stats).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

MODES = ("events", "graph")
L2_FLUSH_BYTES = 256 * 1024 * 1024  # several times the H100/H200 L2 (50 MB)


@dataclass(frozen=True)
class TimingSpec:
    mode: str = "events"  # events | graph (cuda only; cpu always uses the wall clock)
    warmup: int = 5
    repeats: int = 50


@dataclass
class Timing:
    mode: str
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    std_us: float
    repeats: int

    @classmethod
    def from_samples(cls, mode: str, samples_us: list[float]) -> "Timing":
        s = sorted(samples_us)
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        return cls(mode, statistics.median(s), q[0], q[-1], statistics.fmean(s),
                   statistics.pstdev(s) if len(s) > 1 else 0.0, len(s))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_ms(fn, device: torch.device) -> float:
    """Wall time of one call including compilation / JIT (synchronised)."""
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3


class Timer:
    """Times a callable on one device; holds the L2-flush buffer for the job."""

    def __init__(self, spec: TimingSpec, device: torch.device):
        if spec.mode not in MODES:
            raise ValueError(f"timing.mode={spec.mode!r}; accepted: {', '.join(MODES)}")
        self.spec = spec
        self.device = device
        self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    @property
    def mode(self) -> str:
        return self.spec.mode if self.device.type == "cuda" else "wall"

    def flush_l2(self) -> None:
        if self._flush is not None:
            self._flush.zero_()

    def time(self, fn) -> Timing:
        if self.device.type != "cuda":
            return self._time_wall(fn)
        if self.spec.mode == "graph":
            return self._time_graph(fn)
        return self._time_events(fn)

    def _time_wall(self, fn) -> Timing:
        for _ in range(self.spec.warmup):
            fn()
        samples = []
        for _ in range(self.spec.repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        return Timing.from_samples("wall", samples)

    def _event_samples(self, mode: str, call) -> Timing:
        """``repeats`` calls, each after an L2 flush, each between its own pair of events."""
        n = self.spec.repeats
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            self.flush_l2()
            starts[i].record()
            call()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        return Timing.from_samples(mode, [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])

    def _time_events(self, fn) -> Timing:
        for _ in range(self.spec.warmup):
            fn()
        return self._event_samples("events", fn)

    def _time_graph(self, fn) -> Timing:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(max(1, self.spec.warmup)):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        return self._event_samples("graph", graph.replay)


def copy_bandwidth_GBps(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth (bytes read + bytes written per second, decimal GB/s),
    measured in the job itself so every row's ``pct_of_copy`` has a same-job ceiling."""
    if nbytes is None:
        nbytes = 1 << 30 if device.type == "cuda" else 64 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = Timer(TimingSpec("events", warmup=3, repeats=20 if device.type == "cuda" else 5), device).time(
        lambda: dst.copy_(src))
    return 2 * nbytes / (t.median_us * 1e-6) / 1e9
