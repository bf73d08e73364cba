"""The outbox dispatcher of one process: a daemon thread that runs due effects (the receipt).

Every worker process runs one; the outbox leases each effect to one dispatcher at a time, so
several of them never run an effect twice at once, and an effect whose process died is taken
over once its lease ran out.
"""

from __future__ import annotations

import atexit
import logging
import threading

from idempay.engine import Guard

log = logging.getLogger(__name__)

BATCH = 50
IDLE_SECONDS = 0.2


class EffectDispatcher:
    """Runs ``guard.dispatch_effects`` in a loop until stopped; survives any error of a round.

    :meth:`start` and :meth:`stop` are idempotent. :meth:`stop` runs at interpreter exit (and
    earlier if called, as the ASGI lifespan's shutdown does): the loop ends, the guard's queued
    journal entries are written and its HTTP client to Stripe is closed.
    """

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = threading.Lock()

    def start(self) -> None:
        """Start the loop in a daemon thread, unless it was started (or stopped) already."""
        with self._state:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._run, name="idempay-effects", daemon=True)
            self._thread.start()
            atexit.register(self.stop)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop (after its current round), then flush the journal; once."""
        with self._state:
            if self._stop.is_set():
                return
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        try:
            written = self.guard.flush_journal()
        except Exception:  # exiting anyway: say what was lost, do not hide the exit
            log.exception("the journal could not be flushed at exit")
        else:
            log.info("effect dispatcher stopped; %d journal entries written", written)
        if self.guard.gateway is not None:
            self.guard.gateway.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.guard.dispatch_effects(limit=BATCH)
            except Exception:  # a database hiccup: try again on the next round
                log.exception("effect dispatch failed")
                report = None
            # Straight on while there is work; a short wait (cut short by stop) when idle.
            if report is None or not (report.done or report.retried):
                self._stop.wait(IDLE_SECONDS)
