"""OpenTelemetry metrics for idempay (extra ``otel``: ``pip install "idempay[otel]"``).

::

    from idempay.observability import add_observer
    from idempay.observability.otel import OpenTelemetryObserver

    add_observer(OpenTelemetryObserver())  # the global MeterProvider, once the SDK sets it

The instruments (meter ``idempay``), with the Prometheus name an exporter gives them:

- ``idempay.decisions`` (counter; ``step``, ``source``): ``idempay_decisions_total``.
- ``idempay.operation.duration`` (histogram, s; ``operation``, ``outcome``):
  ``idempay_operation_duration_seconds``.
- ``idempay.outbox.pending``, ``idempay.outbox.due``, ``idempay.outbox.dead`` (gauges).
- ``idempay.outbox.oldest_due_age`` (gauge, s), read when the metrics are collected.
- ``idempay.orders`` (gauge; ``status``).
- ``idempay.reconciled`` (counter; ``result``): ``idempay_reconciled_total``.

Every attribute value comes from a small fixed set: never an id, a key, an amount or personal
data. Gauges are synchronous ``Gauge`` instruments when the installed API has them (1.23 and
later), and observable gauges reporting the last values otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Protocol

from idempay._lazy import require
from idempay.clock import Clock, SystemClock
from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.observability import OPERATION_BUCKETS

require("opentelemetry.metrics", extra="otel")

from opentelemetry import metrics  # noqa: E402
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation  # noqa: E402

__all__ = ["OpenTelemetryObserver"]

_Attributes = Mapping[str, str]


class _Gauge(Protocol):
    def set(self, amount: float, attributes: _Attributes | None = None) -> None: ...


class _LastValues:
    """A gauge for APIs without a synchronous one: observed values, reported when collected."""

    def __init__(self, meter: Meter, name: str, unit: str, description: str) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        meter.create_observable_gauge(
            name, callbacks=[self._observe], unit=unit, description=description
        )

    def set(self, amount: float, attributes: _Attributes | None = None) -> None:
        key = tuple(sorted((attributes or {}).items()))
        with self._lock:
            self._values[key] = amount

    def _observe(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            values = list(self._values.items())
        return [Observation(value, dict(key)) for key, value in values]


def _gauge(meter: Meter, name: str, unit: str, description: str) -> _Gauge:
    create = getattr(meter, "create_gauge", None)
    if create is None:
        return _LastValues(meter, name, unit, description)
    gauge: _Gauge = create(name, unit=unit, description=description)
    return gauge


class OpenTelemetryObserver:
    """An :class:`~idempay.observability.Observer` recording idempay's metrics with OpenTelemetry.

    Args:
        meter_provider: where to create the instruments; the global provider when ``None``
            (a proxy until the SDK sets one, which it then follows).
        clock: the clock that ages the oldest due effect; the machine's by default.

    The age of the oldest due effect is computed at collection, from the last reported
    backlog: it keeps growing while nothing drains the outbox, even if nothing reports.
    """

    def __init__(
        self, *, meter_provider: MeterProvider | None = None, clock: Clock | None = None
    ) -> None:
        from idempay import __version__

        self._clock: Clock = clock or SystemClock()
        self._oldest_due_at: datetime | None = None
        meter = metrics.get_meter("idempay", __version__, meter_provider=meter_provider)
        self._decisions = meter.create_counter(
            "idempay.decisions",
            unit="{decision}",
            description="Audit steps and guard decisions (payment steps, duplicates, "
            "rejections...), by step and source.",
        )
        description = "Time taken by an idempay operation (checkout, webhook, effect...)."
        try:
            self._operations = meter.create_histogram(
                "idempay.operation.duration",
                unit="s",
                description=description,
                explicit_bucket_boundaries_advisory=OPERATION_BUCKETS,
            )
        except TypeError:
            # API before 1.23: no advisory buckets; the SDK's views can still set them.
            self._operations = meter.create_histogram(
                "idempay.operation.duration", unit="s", description=description
            )
        self._pending = _gauge(
            meter, "idempay.outbox.pending", "{effect}", "Outbox effects waiting to run."
        )
        self._due = _gauge(
            meter,
            "idempay.outbox.due",
            "{effect}",
            "Outbox effects whose time to run has come and that have not run.",
        )
        self._dead = _gauge(
            meter,
            "idempay.outbox.dead",
            "{effect}",
            "Outbox effects that exhausted their attempts and wait for an operator.",
        )
        meter.create_observable_gauge(
            "idempay.outbox.oldest_due_age",
            callbacks=[self._observe_age],
            unit="s",
            description="How long the oldest due outbox effect has been waiting (0 when none).",
        )
        self._orders = _gauge(
            meter, "idempay.orders", "{order}", "Orders in each status, as last counted."
        )
        self._reconciled = meter.create_counter(
            "idempay.reconciled",
            unit="{item}",
            description="Items settled by reconciliation, by result "
            "(changed means a webhook was missed).",
        )

    def decision(self, step: AuditStep, source: AuditSource) -> None:
        self._decisions.add(1, {"step": step.value, "source": source.value})

    def operation(self, name: str, outcome: str, seconds: float) -> None:
        self._operations.record(seconds, {"operation": name, "outcome": outcome})

    def outbox(self, backlog: OutboxBacklog) -> None:
        self._pending.set(backlog.pending)
        self._due.set(backlog.due)
        self._dead.set(backlog.dead)
        self._oldest_due_at = backlog.oldest_due_at

    def orders(self, counts: Mapping[OrderStatus, int]) -> None:
        # Every status, so that a status that emptied reads 0 rather than its last count.
        for status in OrderStatus:
            self._orders.set(counts.get(status, 0), {"status": status.value})

    def reconciled(self, result: str, count: int) -> None:
        if count > 0:
            self._reconciled.add(count, {"result": result})

    def _observe_age(self, options: CallbackOptions) -> Iterable[Observation]:
        oldest = self._oldest_due_at
        age = 0.0 if oldest is None else (self._clock.now() - oldest).total_seconds()
        return [Observation(max(0.0, age))]
