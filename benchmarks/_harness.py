"""Timing primitives of the stores benchmark: batches, interleaved repetitions, statistics.

The machines this runs on are shared and small (2 cores), so absolute numbers drift from one
minute to the next. Every comparison is therefore made *within* one repetition: the contender
and its reference run back to back on the same data, in alternating order from one repetition
to the next (A B, then B A), and the reported ratio is the median of the per-repetition ratios.
A batch runs for a fixed time rather than a fixed count, so that slow and fast backends fit in
the same budget.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "AsyncOpFactory",
    "Batch",
    "Contender",
    "Measured",
    "Plan",
    "SyncOpFactory",
    "measure_group",
    "percentile",
]

SyncOpFactory = Callable[[int], Callable[[int], object]]
"""Given a worker index, return that worker's operation; it is called with 0, 1, 2..."""

AsyncOpFactory = Callable[[int], Callable[[int], Awaitable[object]]]
"""The async form of :data:`SyncOpFactory`: a worker's operation is a coroutine function."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How long to measure: ``reps`` repetitions of batches lasting ``seconds`` each."""

    reps: int
    seconds: float
    warmup_ops: int
    threads: int


@dataclass(frozen=True, slots=True)
class Batch:
    """One timed run of one contender: operations done, wall time, each operation's latency."""

    ops: int
    seconds: float
    latencies_ns: Sequence[int]

    @property
    def rate(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Contender:
    """Something to time: sync operations run in threads, async ones as tasks of one loop.

    ``runner`` is required for async contenders: the loop their clients are bound to.
    """

    name: str
    sync_op: SyncOpFactory | None = None
    async_op: AsyncOpFactory | None = None
    runner: asyncio.Runner | None = None


@dataclass(slots=True)
class Measured:
    """A contender's batches over every repetition, and its ratios to the reference."""

    name: str
    batches: list[Batch] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Median operations per second over the repetitions."""
        return statistics.median(b.rate for b in self.batches)

    def latency_ms(self, q: float) -> float:
        """The ``q`` quantile (0-1) of every operation's latency, pooled, in milliseconds."""
        pooled = sorted(ns for b in self.batches for ns in b.latencies_ns)
        return percentile(pooled, q) / 1e6

    @property
    def ratio(self) -> float | None:
        """Median over the repetitions of (this rate / the reference's rate in the same rep)."""
        return statistics.median(self.ratios) if self.ratios else None

    @property
    def ratio_spread(self) -> tuple[float, float] | None:
        """The lowest and highest per-repetition ratios: how much the machine moved."""
        return (min(self.ratios), max(self.ratios)) if self.ratios else None


def percentile(sorted_values: Sequence[int], q: float) -> float:
    """The ``q`` quantile of already sorted values (nearest rank; 0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[rank])


def _sync_batch(factory: SyncOpFactory, *, threads: int, seconds: float) -> Batch:
    ops_of: list[Callable[[int], object]] = [factory(w) for w in range(threads)]
    latencies: list[list[int]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start_line = threading.Barrier(threads + 1)
    deadline = 0.0

    def work(w: int) -> None:
        op, mine = ops_of[w], latencies[w]
        clock = time.perf_counter_ns
        start_line.wait()
        end = deadline
        i = 0
        try:
            while time.perf_counter() < end:
                t0 = clock()
                op(i)
                mine.append(clock() - t0)
                i += 1
        except BaseException as error:  # noqa: BLE001 - re-raised in the measuring thread
            errors.append(error)

    workers = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(threads)]
    for t in workers:
        t.start()
    started = time.perf_counter()
    deadline = started + seconds
    start_line.wait()
    for t in workers:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    flat = [ns for per in latencies for ns in per]
    return Batch(ops=len(flat), seconds=elapsed, latencies_ns=flat)


async def _async_batch(factory: AsyncOpFactory, *, tasks: int, seconds: float) -> Batch:
    ops_of = [factory(w) for w in range(tasks)]
    latencies: list[list[int]] = [[] for _ in range(tasks)]
    started = time.perf_counter()
    end = started + seconds

    async def work(w: int) -> None:
        op, mine = ops_of[w], latencies[w]
        clock = time.perf_counter_ns
        i = 0
        while time.perf_counter() < end:
            t0 = clock()
            await op(i)
            mine.append(clock() - t0)
            i += 1

    await asyncio.gather(*(work(w) for w in range(tasks)))
    elapsed = time.perf_counter() - started
    flat = [ns for per in latencies for ns in per]
    return Batch(ops=len(flat), seconds=elapsed, latencies_ns=flat)


def _run(contender: Contender, *, threads: int, seconds: float) -> Batch:
    if contender.sync_op is not None:
        return _sync_batch(contender.sync_op, threads=threads, seconds=seconds)
    if contender.async_op is None or contender.runner is None:
        raise ValueError(f"{contender.name}: no operation to time")
    return contender.runner.run(_async_batch(contender.async_op, tasks=threads, seconds=seconds))


def _warm_up(contender: Contender, ops: int) -> None:
    """Run a few operations untimed: scripts loaded, statements prepared, pools filled."""
    if ops <= 0:
        return
    if contender.sync_op is not None:
        op = contender.sync_op(10_000)
        for i in range(ops):
            op(i)
        return
    if contender.async_op is None or contender.runner is None:
        return
    aop = contender.async_op(10_000)

    async def warm() -> None:
        for i in range(ops):
            await aop(i)

    contender.runner.run(warm())


def measure_group(
    contenders: Sequence[Contender],
    plan: Plan,
    *,
    threads: int = 1,
    on_rep: Callable[[int], None] | None = None,
) -> list[Measured]:
    """Time ``contenders`` over ``plan.reps`` repetitions, interleaved; the first is the reference.

    In each repetition every contender runs one batch; the order alternates (forwards, then
    backwards) so that a slow minute of the machine hits each of them alike. Each non-reference
    contender gets, per repetition, the ratio of its rate to the reference's rate.
    """
    results = [Measured(c.name) for c in contenders]
    for c in contenders:
        _warm_up(c, plan.warmup_ops)
    for rep in range(plan.reps):
        if on_rep is not None:
            on_rep(rep)
        order = list(range(len(contenders)))
        if rep % 2:
            order.reverse()
        for index in order:
            results[index].batches.append(
                _run(contenders[index], threads=threads, seconds=plan.seconds)
            )
        reference = results[0].batches[-1].rate
        for measured in results[1:]:
            if reference > 0:
                measured.ratios.append(measured.batches[-1].rate / reference)
    return results
