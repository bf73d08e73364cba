"""Bounded, jittered retries of transactions that lost a race or hit a transient error."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeVar

from idempay.errors import ConcurrentUpdateError, ConfigurationError, TransientStoreError

__all__ = ["DEFAULT_ATTEMPTS", "RETRIABLE", "delays", "retry", "retry_async"]

DEFAULT_ATTEMPTS: Final = 8
RETRIABLE: Final = (ConcurrentUpdateError, TransientStoreError)
"""What a retry may cure: a lost compare-and-set, a deadlock, a serialization failure, busy."""

_BASE: Final = 0.005
_CAP: Final = 0.5

T = TypeVar("T")


def delays(attempts: int) -> Iterator[float]:
    """The pauses between ``attempts`` tries: exponential with full jitter, capped.

    Full jitter spreads the retries of writers that collided, so they do not collide again.
    """
    if attempts < 1:
        raise ConfigurationError("attempts must be at least 1")
    for n in range(attempts - 1):
        yield random.uniform(0, min(_CAP, _BASE * 2**n))  # noqa: S311 - jitter, not secrecy


def _exhausted(error: Exception, attempts: int) -> Exception:
    if isinstance(error, TransientStoreError):
        return TransientStoreError(str(error).split(" (after")[0], attempts=attempts)
    return error


def retry(work: Callable[[], T], *, attempts: int = DEFAULT_ATTEMPTS) -> T:
    """Run ``work``, again after each retriable failure, at most ``attempts`` times."""
    pauses = delays(attempts)
    while True:
        try:
            return work()
        except RETRIABLE as error:
            pause = next(pauses, None)
            if pause is None:
                raise _exhausted(error, attempts) from error
            time.sleep(pause)


async def retry_async(work: Callable[[], Awaitable[T]], *, attempts: int = DEFAULT_ATTEMPTS) -> T:
    """Async twin of :func:`retry`; the pauses never block the event loop."""
    pauses = delays(attempts)
    while True:
        try:
            return await work()
        except RETRIABLE as error:
            pause = next(pauses, None)
            if pause is None:
                raise _exhausted(error, attempts) from error
            await asyncio.sleep(pause)
