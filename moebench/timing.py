"""Timing: device events with the L2 flushed between repeats, CUDA-graph replay, CUDA-graph
replay of many calls over rotated input copies, or a host wall clock on the CPU -- the same
statistics in every mode (METHOD.md habits: warm-up first, many repeats, median;
compile/first-call time kept out of the stats).

Modes (``timing.mode``):

* ``events``: each call between two events, the L2 flushed before it;
* ``graph``: the call captured in a CUDA graph, each replay between two events, the L2
  flushed before it (one graph launch per call: a floor of a few microseconds);
* ``rotated``: ``n`` calls captured in one graph, call ``i`` on its own copy of the
  stage's inputs (the copies together at least ``ROTATE_BYTES``, so each call reads its
  inputs from DRAM, not from the L2 the previous call filled; where 64 copies still fit in
  the L2, it is flushed before every replay); each replay between two events, divided by
  ``n``: one call back to back with others, for the stages whose time is close to a launch
  latency (top-k, route, metadata).

Every mode keeps the output of the last timed call (``Timing.output``: a replay's output in
the graph modes) so the caller checks what was timed, not only the call before it.
``Timer.kernel_us`` adds the device-kernel time of a call from the CUDA profiler (CUPTI through
``torch.profiler``): beside the event time it shows a host- or launch-bound row as such.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from moebench.errors import ConfigError

MODES = ("events", "graph", "rotated")
L2_FLUSH_BYTES = 256 * 1024 * 1024  # several times the H100/H200 L2 (50 MB)
ROTATE_BYTES = 128 * 1024 * 1024  # input copies a rotated replay cycles through (> 2.5 x the L2)
MAX_ROTATIONS = 64


def rotations(set_bytes: int) -> int:
    """Input copies for ``timing=rotated``: enough to cycle through ROTATE_BYTES, 2 to 64."""
    return max(2, min(MAX_ROTATIONS, -(-ROTATE_BYTES // max(set_bytes, 1))))


@dataclass
class Rotation:
    """The calls ``timing=rotated`` cycles through (each on its own copy of the inputs) and
    the bytes of one copy."""

    calls: list
    copy_bytes: int

    @property
    def bytes(self) -> int:
        return len(self.calls) * self.copy_bytes


@dataclass
class TimingSpec:
    """The schema of ``conf/timing``."""

    mode: str = "events"  # events | graph | rotated (cuda only; cpu always uses the wall clock)
    warmup: int = 5
    repeats: int = 50

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"timing.mode={self.mode!r} is not accepted; accepted: {', '.join(MODES)}")
        if isinstance(self.warmup, bool) or self.warmup < 0:
            raise ConfigError(f"timing.warmup={self.warmup!r} is not accepted; an integer >= 0")
        if isinstance(self.repeats, bool) or self.repeats < 1:
            raise ConfigError(f"timing.repeats={self.repeats!r} is not accepted; an integer >= 1")


@dataclass
class Timing:
    mode: str
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    std_us: float
    repeats: int
    #: every repeat, in the order measured
    samples_us: tuple[float, ...] = ()
    #: timing=rotated: the calls of one replay and the bytes of their input copies together
    rotations: int | None = None
    rotated_bytes: int | None = None
    #: the output of the last timed call (a replay's, in the graph modes), for a check after timing
    output: object = None

    @classmethod
    def from_samples(cls, mode: str, samples_us: list[float]) -> "Timing":
        s = sorted(samples_us)
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        return cls(mode, statistics.median(s), q[0], q[-1], statistics.fmean(s),
                   statistics.pstdev(s) if len(s) > 1 else 0.0, len(s), tuple(samples_us))


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
    """Times a callable on one device; holds the L2-flush buffer for the job.

    ``barrier`` (collectives across ranks): called before every warm-up call and every
    timed repeat (after the L2 flush), so every rank starts each repeat together."""

    def __init__(self, spec: TimingSpec, device: torch.device, barrier=None):
        if spec.mode not in MODES:
            raise ValueError(f"timing.mode={spec.mode!r}; accepted: {', '.join(MODES)}")
        self.spec = spec
        self.device = device
        self.barrier = barrier or (lambda: None)
        self._flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    @property
    def mode(self) -> str:
        return self.spec.mode if self.device.type == "cuda" else "wall"

    def flush_l2(self) -> None:
        if self._flush is not None:
            self._flush.zero_()

    def time(self, fn, rotated=None) -> Timing:
        """Time ``fn``; ``rotated`` (mode ``rotated``): a function giving the :class:`Rotation`
        to cycle through, each call on its own copy of the inputs (see the module doc)."""
        if self.device.type != "cuda":
            return self._time_wall(fn)
        if self.spec.mode == "graph":
            return self._time_graph(fn)
        if self.spec.mode == "rotated":
            if rotated is None:
                raise ValueError("timing=rotated needs input copies this measurement does not provide; "
                                 "use timing=events or timing=graph")
            return self._time_rotated(rotated())
        return self._time_events(fn)

    def _warmup(self, fn) -> None:
        for _ in range(self.spec.warmup):
            self.barrier()
            fn()

    def _time_wall(self, fn) -> Timing:
        self._warmup(fn)
        samples = []
        out = None
        for _ in range(self.spec.repeats):
            self.barrier()
            t0 = time.perf_counter()
            out = fn()
            samples.append((time.perf_counter() - t0) * 1e6)
        t = Timing.from_samples("wall", samples)
        t.output = out
        return t

    def _event_samples(self, mode: str, call) -> Timing:
        """``repeats`` calls, each after an L2 flush, each between its own pair of events."""
        n = self.spec.repeats
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        out = None
        for i in range(n):
            self.flush_l2()
            self.barrier()
            starts[i].record()
            out = call()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        t = Timing.from_samples(mode, [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)])
        t.output = out
        return t

    def _time_events(self, fn) -> Timing:
        self._warmup(fn)
        return self._event_samples("events", fn)

    def _capture(self, fns):
        """Warm up on a side stream, then capture ``fns`` in order in one graph; returns the
        graph and the output of the last captured call (rewritten by every replay)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(max(1, self.spec.warmup)):
                for fn in fns:
                    fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                out = fn()
        graph.replay()
        return graph, out

    def _time_graph(self, fn) -> Timing:
        graph, out = self._capture([fn])
        t = self._event_samples("graph", graph.replay)
        t.output = out
        return t

    def _time_rotated(self, rotation: Rotation) -> Timing:
        fns = list(rotation.calls)
        graph, out = self._capture(fns)
        for _ in range(2):
            graph.replay()
        # copies that fit in the L2 would be read from it: flush it before every replay
        l2 = torch.cuda.get_device_properties(self.device).L2_cache_size
        flush = rotation.bytes < 2 * l2
        n = self.spec.repeats
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if flush:
                self.flush_l2()
            starts[i].record()
            graph.replay()
            ends[i].record()
        torch.cuda.synchronize(self.device)
        t = Timing.from_samples("rotated", [s.elapsed_time(e) * 1e3 / len(fns) for s, e in zip(starts, ends)])
        t.rotations, t.rotated_bytes, t.output = len(fns), rotation.bytes, out
        return t

    def kernel_us(self, fn, calls: int = 10) -> float | None:
        """Device-kernel time of one call (µs): the kernels' durations summed by the CUDA
        profiler over ``calls`` back-to-back warm calls (L2 not flushed), divided by ``calls``;
        None off CUDA or where the profiler records no device time."""
        if self.device.type != "cuda":
            return None
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(self.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize(self.device)
        total = 0.0
        for e in prof.key_averages():
            total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0
        return total / calls if total > 0 else None


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
