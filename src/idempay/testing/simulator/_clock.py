"""The simulator's clock: a :class:`~idempay.clock.Clock` plus an offset moved by hand."""

from __future__ import annotations

import threading

from idempay.clock import Clock, SystemClock
from idempay.errors import ConfigurationError

__all__ = ["SimClock"]


class SimClock:
    """Unix time as the simulated Stripe sees it: ``base.now()`` plus what :meth:`advance` added.

    One clock serves every timestamp the simulator makes: objects' ``created``, idempotency-key
    expiry and webhook signatures. Share ``base`` (a :class:`~idempay.clock.FrozenClock`) with
    the code under test to keep both on one time line.
    """

    def __init__(self, base: Clock | None = None) -> None:
        self._base = base or SystemClock()
        self._offset = 0.0
        self._lock = threading.Lock()

    def now(self) -> float:
        """The current simulated time, in Unix seconds."""
        with self._lock:
            offset = self._offset
        return self._base.now().timestamp() + offset

    def advance(self, seconds: float) -> float:
        """Move the simulated time forward and return the new time."""
        if seconds < 0:
            raise ConfigurationError("the simulator's clock does not go backwards")
        with self._lock:
            self._offset += seconds
        return self.now()

    def reset(self) -> None:
        """Drop every advance: back to the base clock."""
        with self._lock:
            self._offset = 0.0
