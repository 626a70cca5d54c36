"""The one interface every bench implements, and the one measurement every row goes through.

A bench (``moebench/benches/<name>.py``) is a class with

* ``name`` and ``Config`` -- its option of ``conf/bench`` and that option's schema (a
  dataclass registered in Hydra's ConfigStore; ``__post_init__`` checks its values);
* ``validate(job)`` -- the checks that need the whole job (a ConfigError, before anything
  is allocated); ``stages`` -- the rows it writes, in order;
* ``setup(timer)`` -- its seeded inputs and references;
* ``cases()`` -- one :class:`Case` per row: the stage, what ran it, how to build the call and
  its check, its strict bytes and FLOPs;
* ``columns()`` -- the job-level columns it adds (routing balance, GEMM path, ...);
* ``finish(rows)`` -- columns computed across rows (a share, a ratio to a same-job ceiling).

:func:`measure` is the check-then-time of every case: outputs poisoned, one checked call,
then timing -- a mismatch is a ``mismatch`` row and never timed, a case an implementation
cannot handle an ``unsupported`` row with the reason.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING

from moebench.errors import ConfigError, Mismatch, Unsupported
from moebench.job import JobSpec
from moebench.timing import Timer, first_call_ms

log = logging.getLogger("moebench")


DIRECTIONS = ("fwd", "bwd", "fwdbwd")


@dataclass
class BenchConfig:
    """The schema of a ``conf/bench`` option; benches with options subclass it."""

    name: str = MISSING
    weighted: bool = True  # combine: gate-weighted sum (false: plain sum)
    #: fwd | bwd (the stages' backward: gradients of their inputs) | fwdbwd (both, one call)
    direction: str = "fwd"

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"bench.direction={self.direction!r} is not accepted; accepted: {', '.join(DIRECTIONS)}")


@dataclass
class Call:
    """What a case builds: the call to time, the check of its result, the reset that poisons
    its outputs before the checked call, and (``timing=rotated``) a function giving the same
    call on copies of its inputs."""

    fn: Callable[[], Any]
    check: Callable[[Any], None]
    reset: Callable[[], Any] = lambda: None
    copies: Callable[[], list[Callable[[], Any]]] | None = None


@dataclass
class Case:
    """One row: ``build`` (raises Unsupported where the case cannot run) gives the Call;
    ``strict_bytes`` (called for ok rows) the fewest bytes the stage must move."""

    stage: str
    stage_impl: str
    build: Callable[[], Call]
    strict_bytes: Callable[[], int] | None = None
    flops: float | None = None
    columns: dict = field(default_factory=dict)


def measure(case: Case, timer: Timer, tokens: int) -> dict:
    """Check once, then time, then check the output of the last timed call (a replay's, in the
    graph modes); the row of one case (its outcome, timing, bytes, FLOPs and kernel time)."""
    row = {"stage": case.stage, "stage_impl": case.stage_impl, **case.columns}
    if case.flops is not None:
        row["flops"] = case.flops
    try:
        call = case.build()
        call.reset()
        got = [None]

        def first():
            got[0] = call.fn()

        row["first_call_ms"] = first_call_ms(first, timer.device)
        call.check(got[0])
        got[0] = None
        t = timer.time(call.fn, rotated=call.copies)
        if t.output is not None:
            try:
                call.check(t.output)
            except Mismatch as e:
                raise Mismatch(f"after timing ({t.mode}): {e}") from None
        t.output = None
        kernel_us = timer.kernel_us(call.fn)
    except Unsupported as e:
        return {**row, "status": "unsupported", "message": f"unsupported: {e}"}
    except Mismatch as e:
        return {**row, "status": "mismatch", "message": f"mismatch: {e}"}
    except Exception as e:  # noqa: BLE001 -- one failing case must not end the job
        log.debug("stage %s failed:\n%s", case.stage, traceback.format_exc())
        first_line = (str(e).strip().splitlines() or [""])[0]
        return {**row, "status": "error", "message": f"error: {type(e).__name__}: {first_line}"[:500]}
    sec = t.median_us * 1e-6
    row.update(status="ok", message="", time_us_median=t.median_us, time_us_p10=t.p10_us, time_us_p90=t.p90_us,
               time_us_mean=t.mean_us, time_us_std=t.std_us, time_us_samples=list(t.samples_us), repeats=t.repeats,
               tokens_per_s=tokens / sec, kernel_us=kernel_us, rotations=t.rotations, rotated_bytes=t.rotated_bytes)
    if case.strict_bytes is not None:
        n = case.strict_bytes()
        row.update(bytes_strict=n, bytes_per_token_strict=n / tokens, bw_GBps_strict=n / sec / 1e9,
                   bw_GiBps_strict=n / sec / 2**30)
    if case.flops is not None:
        row["tflops"] = case.flops / sec / 1e12
    return row


Progress = Callable[[int, int, dict, float], None]


class Bench:
    """Base class: see the module docstring."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = BenchConfig
    #: the rows this bench writes, in order
    stages: ClassVar[tuple[str, ...]] = ()
    #: the columns of its terminal summary (moebench.results.summary's default when empty)
    summary_columns: ClassVar[tuple[str, ...]] = ()
    #: does ``pct_of_copy`` apply (a same-job device copy is measured)?
    uses_copy: ClassVar[bool] = True
    #: does it run ranks of its own (``world_size``)?
    multi_rank: ClassVar[bool] = False

    def __init__(self, job: JobSpec):
        self.job = job
        self.config = job.bench_config

    @classmethod
    def validate(cls, job: JobSpec) -> None:
        """ConfigError one-liners for what needs the whole job; nothing allocated."""

    def setup(self, timer: Timer) -> None:
        self.timer = timer

    def columns(self) -> dict:
        return {}

    def cases(self) -> Iterable[Case]:
        return ()

    def finish(self, rows: list[dict]) -> list[dict]:
        return rows

    def headline(self) -> str:
        """What the job's summary table is titled with."""
        return self.job.bench

    def describe(self) -> str:
        """The job's first log line."""
        j = self.job
        return (f"bench={j.bench} impl={j.impl} shape={j.shape} T={j.tokens} H={j.hidden} E={j.experts} k={j.topk} "
                f"dtype={j.dtype_name} device={j.device}")

    def run(self, timer: Timer, progress: Progress | None = None) -> list[dict]:
        """Every case through :func:`measure`, then :meth:`finish`."""
        cases = list(self.cases())
        rows = []
        for i, case in enumerate(cases, 1):
            t0 = time.perf_counter()
            rows.append(measure(case, timer, self.job.tokens))
            if progress:
                progress(i, len(cases), rows[-1], time.perf_counter() - t0)
        return self.finish(rows)
