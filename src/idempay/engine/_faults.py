"""Named fault points in the flows, where tests inject an exception or kill the process.

Production code passes through them at the cost of one dictionary lookup. A test arms a point
with an action; the next time a flow reaches it, the action runs (once, or every time):
raise an exception to simulate a crash the process survives, or kill the process outright to
reproduce a crash at exactly that step.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from enum import StrEnum

from idempay.errors import ConfigurationError

__all__ = ["FaultPoint", "FaultPoints", "kill_process"]


class FaultPoint(StrEnum):
    """Where a flow can be interrupted."""

    CHECKOUT_IN_ORDER_TRANSACTION = "checkout.inside_order_transaction"
    """Inside the transaction that creates the order, after its writes, before its commit."""
    CHECKOUT_AFTER_ORDER = "checkout.after_order_created"
    CHECKOUT_AFTER_STRIPE = "checkout.after_stripe_call"
    CHECKOUT_BEFORE_COMPLETE = "checkout.before_complete"
    WEBHOOK_BEFORE_COMMIT = "webhook.before_commit"
    WEBHOOK_AFTER_COMMIT = "webhook.after_commit"
    OUTBOX_BEFORE_EFFECT = "outbox.before_effect"
    OUTBOX_AFTER_EFFECT = "outbox.after_effect"


def kill_process() -> None:
    """An action that kills the current process at once, as a power cut would."""
    os.kill(os.getpid(), signal.SIGKILL)


class FaultPoints:
    """The armed points of one guard; thread-safe."""

    def __init__(self) -> None:
        self._armed: dict[FaultPoint, tuple[Callable[[], None], bool]] = {}
        self._lock = threading.Lock()

    def arm(self, point: FaultPoint, action: Callable[[], None], *, once: bool = True) -> None:
        """Run ``action`` when a flow reaches ``point`` (the next time only, if ``once``)."""
        if not isinstance(point, FaultPoint):
            raise ConfigurationError("unknown fault point")
        with self._lock:
            self._armed[point] = (action, once)

    def disarm(self, point: FaultPoint | None = None) -> None:
        """Disarm ``point``, or every point."""
        with self._lock:
            if point is None:
                self._armed.clear()
            else:
                self._armed.pop(point, None)

    def reach(self, point: FaultPoint) -> None:
        """Called by the flows: run the action armed at ``point``, if any."""
        if not self._armed:
            return
        with self._lock:
            armed = self._armed.get(point)
            if armed is not None and armed[1]:
                del self._armed[point]
        if armed is not None:
            armed[0]()
