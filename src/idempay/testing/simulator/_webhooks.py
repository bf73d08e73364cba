"""The webhook sender: every event, signed as Stripe signs it, to every endpoint, under a policy.

Delivery is at least once by default, as Stripe's; the :class:`DeliveryPolicy` makes it worse
on purpose, the way Stripe's deliveries are in the field: extra copies, random delays,
reordering within a window, drops, and retries with backoff when an endpoint answers non-2xx
or does not answer.

Every random choice (drop, copies, delays, the shuffle of a window) is drawn from one RNG seeded
by the simulator's ``seed``, in the order events are created, so a run with the same seed and
the same sequence of events plans exactly the same deliveries. With ``concurrency=1`` and no
delay, the order of arrival is reproducible too; with more workers, deliveries overlap as
Stripe's do.

Deliveries run on background threads. :meth:`WebhookSender.flush` releases every held window
and waits until every delivery, retries included, has succeeded or given up: tests and the demo
wait on it instead of sleeping.
"""

from __future__ import annotations

import contextlib
import heapq
import http.client
import json
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from idempay.core.signature import sign_payload
from idempay.errors import ConfigurationError
from idempay.testing.simulator._clock import SimClock
from idempay.testing.simulator._stripe import EventRecord

__all__ = ["DeliveryPolicy", "DeliveryStats", "WebhookEndpoint", "WebhookSender"]

logger = logging.getLogger(__name__)

_USER_AGENT: Final = "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
_BACKOFF_CAP_MS: Final = 60_000


@dataclass(frozen=True, slots=True)
class WebhookEndpoint:
    """Where events go: ``url``, signed with ``secret`` (``whsec_...``), for the event types
    in ``enabled_events`` (``"*"`` for all, ``"payment_intent.*"`` for a family)."""

    url: str
    secret: str
    enabled_events: tuple[str, ...] = ("*",)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError("a webhook endpoint needs an http:// or https:// URL")
        if not self.secret:
            raise ConfigurationError("a webhook endpoint needs a signing secret")
        # A bare string would be read as a tuple of its characters.
        events: object = self.enabled_events
        if isinstance(events, str):
            raise ConfigurationError("enabled_events is a tuple of event types, not a string")

    def wants(self, event_type: str) -> bool:
        """Whether this endpoint receives events of ``event_type``."""
        for pattern in self.enabled_events:
            if pattern in ("*", event_type):
                return True
            if pattern.endswith(".*") and event_type.startswith(pattern[:-1]):
                return True
        return False


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How the sender mistreats deliveries. The default is Stripe on a good day: each event
    once per endpoint, at once, retried on failure.

    Attributes:
        duplicate_probability: chance that an event is sent more than once to an endpoint.
        duplicate_copies: extra copies sent when it is (each with its own delay).
        drop_probability: chance that an event never reaches an endpoint at all (no attempt,
            ``pending_webhooks`` stays above zero: a reconciler sees it).
        max_delay_ms: each delivery waits a random 0 to ``max_delay_ms`` milliseconds.
        reorder_window: deliveries are held until this many are waiting, then released in a
            random order (1: no reordering).
        reorder_linger_ms: a window that does not fill is released after this long; ``None``
            holds it until it fills or :meth:`WebhookSender.flush` is called (reproducible
            windows for tests).
        max_attempts: attempts per delivery, the first included; a non-2xx answer, a refused
            connection or a timeout is retried until then.
        retry_backoff_ms: the wait before the first retry, doubled for each next one.
        timeout: seconds an endpoint has to answer one attempt.
        concurrency: deliveries in flight at once (worker threads).
    """

    duplicate_probability: float = 0.0
    duplicate_copies: int = 1
    drop_probability: float = 0.0
    max_delay_ms: int = 0
    reorder_window: int = 1
    reorder_linger_ms: int | None = 100
    max_attempts: int = 3
    retry_backoff_ms: int = 100
    timeout: float = 10.0
    concurrency: int = 4

    def __post_init__(self) -> None:
        for name in ("duplicate_probability", "drop_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigurationError(f"{name} must be between 0 and 1")
        minimums = {
            "duplicate_copies": 1,
            "max_delay_ms": 0,
            "reorder_window": 1,
            "max_attempts": 1,
            "retry_backoff_ms": 0,
            "concurrency": 1,
        }
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ConfigurationError(f"{name} must be at least {minimum}")
        if self.reorder_linger_ms is not None and self.reorder_linger_ms < 0:
            raise ConfigurationError("reorder_linger_ms must be positive, or None")
        if self.timeout <= 0:
            raise ConfigurationError("timeout must be positive")


@dataclass(slots=True)
class DeliveryStats:
    """What the sender did, counted since the last reset.

    Attributes:
        events: events handed to the sender (each once, whatever the endpoints).
        planned: deliveries planned (event x endpoint, copies included, drops excluded).
        duplicated: extra copies among ``planned``.
        dropped: deliveries dropped by the policy (never attempted).
        attempted: HTTP attempts made.
        delivered: attempts answered 2xx.
        retried: attempts after a first one failed.
        failed: deliveries that used up their attempts without a 2xx.
        abandoned: deliveries still waiting when the sender was closed or reset.
        status_codes: attempts by outcome: the HTTP status as a string, ``"timeout"`` or
            ``"connection_error"``.
    """

    events: int = 0
    planned: int = 0
    duplicated: int = 0
    dropped: int = 0
    attempted: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    abandoned: int = 0
    status_codes: Counter[str] = field(default_factory=Counter)

    def copy(self) -> DeliveryStats:
        """A snapshot that later deliveries do not change."""
        return DeliveryStats(
            events=self.events,
            planned=self.planned,
            duplicated=self.duplicated,
            dropped=self.dropped,
            attempted=self.attempted,
            delivered=self.delivered,
            retried=self.retried,
            failed=self.failed,
            abandoned=self.abandoned,
            status_codes=Counter(self.status_codes),
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data (the control API's ``/_sim/stats``)."""
        return {
            "events": self.events,
            "planned": self.planned,
            "duplicated": self.duplicated,
            "dropped": self.dropped,
            "attempted": self.attempted,
            "delivered": self.delivered,
            "retried": self.retried,
            "failed": self.failed,
            "abandoned": self.abandoned,
            "status_codes": dict(sorted(self.status_codes.items())),
        }


@dataclass(order=True, slots=True)
class _Delivery:
    due: float
    seq: int
    event_id: str = field(compare=False)
    body: bytes = field(compare=False, repr=False)
    endpoint: WebhookEndpoint = field(compare=False)
    delay: float = field(compare=False, default=0.0)
    attempt: int = field(compare=False, default=0)


class WebhookSender:
    """Signs and sends events to the registered endpoints under a :class:`DeliveryPolicy`.

    Args:
        clock: signatures carry this clock's time (``t=``), as Stripe's carry its own.
        policy: how deliveries are mistreated.
        seed: seeds the RNG of every random choice; ``None`` draws one.
        on_delivered: called with the event id after each endpoint's first 2xx for it.
    """

    def __init__(
        self,
        clock: SimClock,
        *,
        policy: DeliveryPolicy,
        seed: int | None,
        on_delivered: Callable[[str], None],
    ) -> None:
        self._clock = clock
        self.policy = policy
        self._seed = seed
        self._rng = random.Random(seed)
        self._on_delivered = on_delivered
        self._endpoints: list[WebhookEndpoint] = []
        self._cond = threading.Condition()
        self._queue: list[_Delivery] = []
        self._window: list[_Delivery] = []
        self._window_deadline: float | None = None
        self._acknowledged: set[tuple[str, str]] = set()
        self._in_flight = 0
        self._seq = 0
        self._closed = False
        self._workers: list[threading.Thread] = []
        self._stats = DeliveryStats()

    # -- configuration -------------------------------------------------------------------

    def add_endpoint(self, endpoint: WebhookEndpoint) -> None:
        """Send every later event that ``endpoint`` wants to it too."""
        with self._cond:
            self._endpoints.append(endpoint)

    def endpoints(self) -> list[WebhookEndpoint]:
        """The registered endpoints, in registration order."""
        with self._cond:
            return list(self._endpoints)

    def stats(self) -> DeliveryStats:
        """A snapshot of the counters."""
        with self._cond:
            return self._stats.copy()

    def reset(self) -> None:
        """Drop every waiting delivery, reseed the RNG and zero the counters (endpoints stay)."""
        with self._cond:
            self._queue.clear()
            self._window.clear()
            self._window_deadline = None
            self._acknowledged.clear()
            self._rng = random.Random(self._seed)
            self._stats = DeliveryStats()
            self._cond.notify_all()

    # -- planning (called under the account's lock, so in event order) --------------------

    def publish(self, event: EventRecord) -> int:
        """Plan the deliveries of ``event``; return how many endpoints want it.

        The body is rendered once, with ``pending_webhooks`` already counted: every copy and
        retry of a delivery carries the same bytes, as Stripe's do.
        """
        with self._cond:
            wanted = [endpoint for endpoint in self._endpoints if endpoint.wants(event.type)]
            event.pending_webhooks = len(wanted)
            self._stats.events += 1
            if self._closed:
                self._stats.abandoned += len(wanted)
                return len(wanted)
            if not wanted:
                return 0
            body = json.dumps(event.render(), indent=2).encode()
            policy = self.policy
            for endpoint in wanted:
                if policy.drop_probability and self._rng.random() < policy.drop_probability:
                    self._stats.dropped += 1
                    continue
                copies = 1
                if (
                    policy.duplicate_probability
                    and self._rng.random() < policy.duplicate_probability
                ):
                    copies += policy.duplicate_copies
                    self._stats.duplicated += policy.duplicate_copies
                for _ in range(copies):
                    delay = self._rng.randint(0, policy.max_delay_ms) / 1000.0
                    self._window.append(_Delivery(0.0, 0, event.id, body, endpoint, delay))
                    self._stats.planned += 1
            if self._window:
                self._ensure_workers()
                if len(self._window) >= policy.reorder_window:
                    self._release_window()
                elif self._window_deadline is None and policy.reorder_linger_ms is not None:
                    self._window_deadline = time.monotonic() + policy.reorder_linger_ms / 1000
            self._cond.notify_all()
            return len(wanted)

    def _release_window(self) -> None:
        # Called with the condition held.
        window, self._window = self._window, []
        self._window_deadline = None
        if self.policy.reorder_window > 1:
            self._rng.shuffle(window)
        now = time.monotonic()
        for delivery in window:
            self._seq += 1
            delivery.seq = self._seq
            delivery.due = now + delivery.delay
            heapq.heappush(self._queue, delivery)
        self._cond.notify_all()

    # -- waiting ---------------------------------------------------------------------------

    def _idle(self) -> bool:
        return not self._queue and not self._window and self._in_flight == 0

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until nothing is waiting, held or in flight; ``False`` if ``timeout`` ran out.

        A held window is released by its linger time only (see :meth:`flush`).
        """
        with self._cond:
            return self._cond.wait_for(self._idle, timeout=timeout)

    def flush(self, timeout: float = 30.0) -> DeliveryStats:
        """Release every held window now, then wait until every delivery is done.

        Raises:
            TimeoutError: deliveries were still going on after ``timeout`` seconds.
        """
        with self._cond:
            if self._window:
                self._release_window()
            if not self._cond.wait_for(self._idle, timeout=timeout):
                raise TimeoutError("webhook deliveries still pending after the timeout")
            return self._stats.copy()

    # -- workers ---------------------------------------------------------------------------

    def _ensure_workers(self) -> None:
        # Called with the condition held; workers start with the first delivery.
        if self._workers or self._closed:
            return
        for number in range(self.policy.concurrency):
            worker = threading.Thread(
                target=self._work, name=f"idempay-sim-webhooks-{number}", daemon=True
            )
            self._workers.append(worker)
            worker.start()

    def _next(self) -> _Delivery | None:
        """The next due delivery, or ``None`` once closed; waits without polling."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._window_deadline is not None and now >= self._window_deadline:
                    self._release_window()
                if self._queue and self._queue[0].due <= now:
                    self._in_flight += 1
                    return heapq.heappop(self._queue)
                wake = [self._queue[0].due] if self._queue else []
                if self._window_deadline is not None:
                    wake.append(self._window_deadline)
                self._cond.wait(timeout=(min(wake) - now) if wake else None)
            return None

    def _work(self) -> None:
        while (delivery := self._next()) is not None:
            try:
                outcome = self._attempt(delivery)
            except Exception:  # a worker must survive anything an endpoint does
                logger.exception("webhook delivery crashed")
                outcome = "connection_error"
            self._settle(delivery, outcome)

    def _attempt(self, delivery: _Delivery) -> str:
        parts = urlsplit(delivery.endpoint.url)
        timestamp = int(self._clock.now())
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign_payload(
                delivery.body, delivery.endpoint.secret, timestamp=timestamp
            ),
            "User-Agent": _USER_AGENT,
        }
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_class(parts.hostname or "", parts.port, timeout=self.policy.timeout)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            connection.request("POST", path, body=delivery.body, headers=headers)
            response = connection.getresponse()
            response.read()
            return str(response.status)
        except TimeoutError:
            return "timeout"
        except OSError:
            return "connection_error"
        finally:
            connection.close()

    def _settle(self, delivery: _Delivery, outcome: str) -> None:
        acknowledged = False
        with self._cond:
            self._in_flight -= 1
            self._stats.attempted += 1
            if delivery.attempt > 0:
                self._stats.retried += 1
            self._stats.status_codes[outcome] += 1
            if outcome.isdigit() and 200 <= int(outcome) < 300:
                self._stats.delivered += 1
                ident = (delivery.event_id, delivery.endpoint.url)
                if ident not in self._acknowledged:
                    self._acknowledged.add(ident)
                    acknowledged = True
            elif delivery.attempt + 1 < self.policy.max_attempts and not self._closed:
                backoff = self.policy.retry_backoff_ms * (2**delivery.attempt)
                delivery.attempt += 1
                delivery.due = time.monotonic() + min(backoff, _BACKOFF_CAP_MS) / 1000
                self._seq += 1
                delivery.seq = self._seq
                heapq.heappush(self._queue, delivery)
            else:
                self._stats.failed += 1
            self._cond.notify_all()
        if acknowledged:
            # Outside the sender's lock: the account takes its own.
            self._on_delivered(delivery.event_id)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the workers; deliveries still waiting are abandoned (counted)."""
        with self._cond:
            self._closed = True
            self._stats.abandoned += len(self._queue) + len(self._window)
            self._queue.clear()
            self._window.clear()
            self._cond.notify_all()
            workers, self._workers = self._workers, []
        for worker in workers:
            with contextlib.suppress(RuntimeError):
                worker.join(timeout)
