"""Observers: metrics and traces of what idempay decides and how long its work takes.

idempay reports to the observers registered here, in the process that does the work:

- every audit step and every decision of the guard (``decision``), the same ones that are
  logged on the ``idempay.audit`` logger, logged or not;
- the latency and outcome of an operation (``operation``): a checkout, a webhook, one effect;
- the state of the outbox (``outbox``) and the number of orders per status (``orders``), as the
  dispatcher and the reconciler see them;
- what reconciliation found (``reconciled``).

Register :class:`~idempay.observability.prometheus.PrometheusObserver` or
:class:`~idempay.observability.otel.OpenTelemetryObserver`, or any object with the five methods
of :class:`Observer`::

    from idempay.observability import add_observer
    from idempay.observability.prometheus import PrometheusObserver

    add_observer(PrometheusObserver())

Guarantees:

- An observer never breaks idempay: an exception it raises is swallowed; its first failure is
  logged at WARNING on the ``idempay.observability`` logger (with the traceback), later ones at
  DEBUG, so that a broken exporter cannot flood the logs.
- With no observer registered, a notification costs one check of an empty tuple.
- idempay passes observers only low-cardinality values: steps, sources, statuses, operation
  names, outcomes and counts. Never an order id, an event id, a key, an amount, an e-mail or a
  payload, so none of them can end up in a metric label.

:func:`operation` times a block, reports it, and opens an OpenTelemetry span around it when
``opentelemetry-api`` is installed; nothing of OpenTelemetry is imported otherwise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.errors import ConfigurationError

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "OPERATION_BUCKETS",
    "Observer",
    "Operation",
    "add_observer",
    "notify_decision",
    "notify_operation",
    "notify_orders",
    "notify_outbox",
    "notify_reconciled",
    "operation",
    "remove_observer",
]

logger = logging.getLogger(__name__)

OPERATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""Latency buckets of the operation histograms, in seconds: from a duplicate answered from one
read (about a millisecond) to a payment-provider call near its timeout."""


@runtime_checkable
class Observer(Protocol):
    """Receives what idempay does, to turn it into metrics (or anything else).

    Every method is called synchronously, on the thread (or event loop) doing the work, so it
    must be cheap and must not block: update a counter, set a gauge, put on a queue. An
    exception raised here is logged and swallowed; it never reaches idempay's caller.
    """

    def decision(self, step: AuditStep, source: AuditSource) -> None:
        """One audit step or guard decision (a payment step, a duplicate, a rejection...)."""
        ...

    def operation(self, name: str, outcome: str, seconds: float) -> None:
        """One operation finished: its name (``"checkout"``, ``"webhook"``...), how it ended
        (``"ok"``, ``"error"``, ``"duplicate"``, ``"201"``...) and how long it took."""
        ...

    def outbox(self, backlog: OutboxBacklog) -> None:
        """The outbox's state as last counted (pending, due, dead, oldest due)."""
        ...

    def orders(self, counts: Mapping[OrderStatus, int]) -> None:
        """How many orders are in each status; a status that is absent has none."""
        ...

    def reconciled(self, result: str, count: int) -> None:
        """Reconciliation settled ``count`` items with ``result`` (``"changed"``,
        ``"unchanged"``, ``"not_found"``, ``"error"``...)."""
        ...


class _Registration:
    """One registered observer, and whether its first failure was logged already."""

    __slots__ = ("observer", "warned")

    def __init__(self, observer: Observer) -> None:
        self.observer = observer
        self.warned = False


_lock: Final = threading.Lock()
# Replaced, never mutated: notifications read it without the lock.
_registrations: tuple[_Registration, ...] = ()


def add_observer(observer: Observer) -> None:
    """Register ``observer`` for every notification in this process; thread-safe.

    Adding an observer that is registered already (the same object) does nothing.

    Raises:
        ConfigurationError: ``observer`` lacks one of the methods of :class:`Observer`.
    """
    global _registrations  # noqa: PLW0603 - the process-wide registry, replaced under the lock
    if not isinstance(observer, Observer):
        raise ConfigurationError(
            "an observer needs the methods decision, operation, outbox, orders and reconciled"
        )
    with _lock:
        if any(r.observer is observer for r in _registrations):
            return
        _registrations = (*_registrations, _Registration(observer))


def remove_observer(observer: Observer) -> None:
    """Unregister ``observer`` (the same object); does nothing if it is not registered."""
    global _registrations  # noqa: PLW0603 - the process-wide registry, replaced under the lock
    with _lock:
        _registrations = tuple(r for r in _registrations if r.observer is not observer)


def _failed(registration: _Registration, hook: str, error: Exception) -> None:
    with _lock:
        first = not registration.warned
        registration.warned = True
    name = type(registration.observer).__qualname__
    if first:
        logger.warning(
            "observer %s failed in %s(); ignored (its later failures are logged at DEBUG)",
            name,
            hook,
            exc_info=error,
        )
    else:
        logger.debug("observer %s failed in %s(); ignored", name, hook, exc_info=error)


def notify_decision(step: AuditStep, source: AuditSource) -> None:
    """Tell every observer about one audit step or guard decision."""
    registrations = _registrations
    if not registrations:
        return
    for registration in registrations:
        try:
            registration.observer.decision(step, source)
        except Exception as error:  # noqa: BLE001 - an observer must never break idempay
            _failed(registration, "decision", error)


def notify_operation(name: str, outcome: str, seconds: float) -> None:
    """Tell every observer that operation ``name`` ended with ``outcome`` after ``seconds``."""
    registrations = _registrations
    if not registrations:
        return
    for registration in registrations:
        try:
            registration.observer.operation(name, outcome, seconds)
        except Exception as error:  # noqa: BLE001 - an observer must never break idempay
            _failed(registration, "operation", error)


def notify_outbox(backlog: OutboxBacklog) -> None:
    """Tell every observer how the outbox stands."""
    registrations = _registrations
    if not registrations:
        return
    for registration in registrations:
        try:
            registration.observer.outbox(backlog)
        except Exception as error:  # noqa: BLE001 - an observer must never break idempay
            _failed(registration, "outbox", error)


def notify_orders(counts: Mapping[OrderStatus, int]) -> None:
    """Tell every observer how many orders each status holds."""
    registrations = _registrations
    if not registrations:
        return
    for registration in registrations:
        try:
            registration.observer.orders(counts)
        except Exception as error:  # noqa: BLE001 - an observer must never break idempay
            _failed(registration, "orders", error)


def notify_reconciled(result: str, count: int) -> None:
    """Tell every observer that reconciliation settled ``count`` items with ``result``."""
    registrations = _registrations
    if not registrations:
        return
    for registration in registrations:
        try:
            registration.observer.reconciled(result, count)
        except Exception as error:  # noqa: BLE001 - an observer must never break idempay
            _failed(registration, "reconciled", error)


# --- operations and spans -------------------------------------------------------------------


class _Tracing:
    """The parts of ``opentelemetry-api`` an operation uses, imported once."""

    __slots__ = ("attach", "detach", "error", "in_context", "tracer")

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import StatusCode

        from idempay import __version__

        # get_tracer returns a proxy until an SDK sets the global tracer provider, and follows
        # that provider from then on: looking it up once per process is enough.
        self.tracer: Tracer = trace.get_tracer("idempay", __version__)
        self.in_context = trace.set_span_in_context
        self.attach = context.attach
        self.detach = context.detach
        self.error = StatusCode.ERROR


_UNKNOWN: Final = object()
_tracing: object = _UNKNOWN


def _get_tracing() -> _Tracing | None:
    global _tracing  # noqa: PLW0603 - looked up once per process
    found = _tracing
    if found is _UNKNOWN:
        try:
            found = _Tracing()
        except ImportError:
            found = None
        _tracing = found
    return found if isinstance(found, _Tracing) else None


class Operation:
    """One timed operation, from :func:`operation`.

    Set :attr:`outcome` inside the block to say how it ended (``"applied"``, ``"duplicate"``,
    ``"201"``...): a short value from a small, fixed set, since it becomes a metric label. When
    the block raises, the outcome is ``"error"`` (``"cancelled"`` for a task cancellation, an
    interrupt or a generator closed early) and the exception propagates.

    After the block, :attr:`seconds` is how long it took. One object times one block.
    """

    __slots__ = (
        "_span",
        "_started",
        "_token",
        "_tracing",
        "attributes",
        "name",
        "outcome",
        "seconds",
    )

    def __init__(self, name: str, attributes: Mapping[str, str]) -> None:
        self.name = name
        self.attributes = dict(attributes)
        self.outcome = "ok"
        self.seconds: float | None = None
        self._started = 0.0
        self._tracing: _Tracing | None = None
        self._span: Span | None = None
        self._token: Token[Context] | None = None

    def __enter__(self) -> Operation:
        tracing = self._tracing = _get_tracing()
        if tracing is not None:
            span = tracing.tracer.start_span(
                f"idempay.{self.name}",
                attributes={f"idempay.{key}": value for key, value in self.attributes.items()},
            )
            # Current for the block, so that database and HTTP spans nest under it.
            self._span, self._token = span, tracing.attach(tracing.in_context(span))
        self._started = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._started
        if exc is not None:
            self.outcome = "error" if isinstance(exc, Exception) else "cancelled"
        tracing, span, token = self._tracing, self._span, self._token
        if tracing is not None and span is not None and token is not None:
            self._span = self._token = None
            try:
                span.set_attribute("idempay.outcome", self.outcome)
                if isinstance(exc, Exception):
                    span.record_exception(exc)
                    # The type, not the message: a status description is indexed and grouped.
                    span.set_status(tracing.error, type(exc).__name__)
                span.end()
            finally:
                tracing.detach(token)
        notify_operation(self.name, self.outcome, self.seconds)

    async def __aenter__(self) -> Operation:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def operation(name: str, **attributes: str) -> Operation:
    """Time the block as operation ``name``; usable as ``with`` and as ``async with``.

    On exit, observers get ``operation(name, outcome, seconds)``. When ``opentelemetry-api`` is
    installed, the block also runs in a span ``idempay.<name>`` (tracer ``"idempay"``), current
    for the block so that database and HTTP spans nest under it, with ``attributes`` prefixed
    ``idempay.`` and ``idempay.outcome`` set on exit; an exception is recorded on the span and
    its status set to error. Without OpenTelemetry it only times the block.

    ``name`` and ``attributes`` must be low-cardinality (an operation, an event type, a
    source): never an id, a key, an amount, an e-mail address or a payload::

        with operation("webhook", event_type=event.type) as op:
            op.outcome = handle(event)
    """
    return Operation(name, attributes)
