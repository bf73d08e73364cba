"""Where a webhook's time goes: its steps timed one by one, and cProfile grouped by library.

:class:`Stopwatch` stands in for a store or a lock provider and times the calls the guard makes
to it (wall time, and this thread's CPU time, which leaves out the waiting for the server), so
the rest of ``handle_webhook`` is what the guard itself spends. :func:`by_library` sums a
cProfile run's own time per library.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["Stopwatch", "by_library", "median_ms", "profile_calls", "timed_calls"]

Sample = tuple[float, float]  # (wall seconds, thread CPU seconds)


class Stopwatch:
    """Delegates to ``target``; the calls to methods in ``names`` are timed into ``samples``."""

    def __init__(self, target: Any, names: Iterable[str], samples: dict[str, list[Sample]]) -> None:
        self._target = target
        self._names = frozenset(names)
        self._samples = samples

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name not in self._names:
            return attr
        record = self._samples[name].append

        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return attr(*args, **kwargs)
            finally:
                record((time.perf_counter() - wall, time.thread_time() - cpu))

        return timed


def timed_calls(op: Callable[[int], object], n: int) -> list[Sample]:
    """Run ``op`` ``n`` times; (wall, CPU) of each call."""
    samples = []
    for i in range(n):
        wall, cpu = time.perf_counter(), time.thread_time()
        op(i)
        samples.append((time.perf_counter() - wall, time.thread_time() - cpu))
    return samples


def median_ms(samples: Sequence[Sample], index: int = 0) -> float:
    return statistics.median(s[index] for s in samples) * 1000 if samples else 0.0


def profile_calls(op: Callable[[int], object], n: int) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        for i in range(n):
            op(i)
    finally:
        profiler.disable()
    return pstats.Stats(profiler)


_LIBRARIES = (
    ("/psycopg/", "psycopg (its wait for the server included)"),
    ("/sqlalchemy/", "SQLAlchemy"),
    ("/redis/", "redis-py (its wait for the server included)"),
    ("/idempay/", "idempay"),
    ("/json/", "json (standard library)"),
)


def by_library(stats: pstats.Stats, calls: int) -> list[tuple[str, float]]:
    """Own time (tottime) per library, in milliseconds per call of the profiled operation."""
    totals: dict[str, float] = defaultdict(float)
    for (filename, _line, _name), row in stats.stats.items():  # type: ignore[attr-defined]
        tottime = row[2]
        label = next((lib for key, lib in _LIBRARIES if key in filename), "everything else")
        totals[label] += tottime
    return sorted(
        ((label, seconds / calls * 1000) for label, seconds in totals.items()),
        key=lambda item: -item[1],
    )


def top_functions(stats: pstats.Stats, calls: int, count: int) -> list[tuple[str, float]]:
    """The ``count`` functions with the most own time, in milliseconds per call."""
    rows = []
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        short = "/".join(filename.split("/")[-2:])
        rows.append((f"{short}:{line}({name})", row[2] / calls * 1000))
    rows.sort(key=lambda item: -item[1])
    return rows[:count]
