"""OpenTelemetryObserver on the real OpenTelemetry SDK, read with an in-memory metric reader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry.metrics import Meter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tests.engine.test_webhook_flow import Shop, event

from idempay.clock import FrozenClock
from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.engine import WebhookOutcome
from idempay.observability import (
    OPERATION_BUCKETS,
    Observer,
    notify_orders,
    notify_outbox,
    notify_reconciled,
    operation,
)
from idempay.observability.otel import OpenTelemetryObserver

Observe = Callable[[Observer], None]
Points = dict[tuple[tuple[str, Any], ...], Any]


class Metrics:
    """A MeterProvider with an in-memory reader, and the points of each metric it collected."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def read(self) -> dict[str, tuple[Any, Points]]:
        """Each idempay metric: (the metric, its data points by sorted attributes)."""
        found: dict[str, tuple[Any, Points]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                if scope.scope.name != "idempay":
                    continue
                for metric in scope.metrics:
                    points = {
                        tuple(sorted((p.attributes or {}).items())): p
                        for p in metric.data.data_points
                    }
                    found[metric.name] = (metric, points)
        return found


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    found = Metrics()
    yield found
    found.provider.shutdown()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def otel(metrics: Metrics, clock: FrozenClock, observe: Observe) -> OpenTelemetryObserver:
    observer = OpenTelemetryObserver(meter_provider=metrics.provider, clock=clock)
    observe(observer)
    return observer


@pytest.mark.usefixtures("otel")
def test_a_duplicate_delivery_counts_one_duplicate_decision(metrics: Metrics) -> None:
    shop = Shop()
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.APPLIED
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.DUPLICATE
    metric, points = metrics.read()["idempay.decisions"]
    assert metric.unit == "{decision}"
    assert {key: point.value for key, point in points.items()} == {
        (("source", "webhook"), ("step", "succeeded")): 1,
        (("source", "webhook"), ("step", "duplicate")): 1,
    }


@pytest.mark.usefixtures("otel")
def test_operations_are_recorded_in_seconds_with_idempays_buckets(metrics: Metrics) -> None:
    with operation("webhook") as op:
        op.outcome = "applied"
    with operation("webhook") as op:
        op.outcome = "applied"
    metric, points = metrics.read()["idempay.operation.duration"]
    assert metric.unit == "s"
    (point,) = points.values()
    assert dict(point.attributes) == {"operation": "webhook", "outcome": "applied"}
    assert point.count == 2
    assert tuple(point.explicit_bounds) == OPERATION_BUCKETS


@pytest.mark.usefixtures("otel")
def test_gauges_report_the_outbox_and_the_orders(metrics: Metrics, clock: FrozenClock) -> None:
    notify_outbox(
        OutboxBacklog(pending=4, due=3, dead=2, oldest_due_at=clock.now() - timedelta(minutes=1))
    )
    notify_orders({OrderStatus.AWAITING_PAYMENT: 7, OrderStatus.NEEDS_REVIEW: 1})
    clock.advance(30)
    read = metrics.read()
    single = {
        name: next(iter(read[name][1].values())).value
        for name in (
            "idempay.outbox.pending",
            "idempay.outbox.due",
            "idempay.outbox.dead",
            "idempay.outbox.oldest_due_age",
        )
    }
    assert single == {
        "idempay.outbox.pending": 4,
        "idempay.outbox.due": 3,
        "idempay.outbox.dead": 2,
        "idempay.outbox.oldest_due_age": 90.0,
    }
    orders = {dict(key)["status"]: point.value for key, point in read["idempay.orders"][1].items()}
    assert orders == {status.value: 0 for status in OrderStatus} | {
        "awaiting_payment": 7,
        "needs_review": 1,
    }


@pytest.mark.usefixtures("otel")
def test_reconciliation_results_are_counted(metrics: Metrics) -> None:
    notify_reconciled("changed", 2)
    notify_reconciled("changed", 1)
    notify_reconciled("not_found", 1)
    _, points = metrics.read()["idempay.reconciled"]
    assert {dict(key)["result"]: point.value for key, point in points.items()} == {
        "changed": 3,
        "not_found": 1,
    }


class _OlderMeter:
    """A real SDK meter offered with the surface of opentelemetry-api 1.20: no synchronous
    gauge and no advisory histogram buckets."""

    def __init__(self, meter: Meter) -> None:
        self._meter = meter
        self.create_counter = meter.create_counter
        self.create_observable_gauge = meter.create_observable_gauge

    def create_histogram(self, name: str, unit: str = "", description: str = "") -> Any:
        return self._meter.create_histogram(name, unit=unit, description=description)


class _OlderProvider:
    def __init__(self, provider: MeterProvider) -> None:
        self._provider = provider

    def get_meter(self, *args: Any, **kwargs: Any) -> _OlderMeter:
        return _OlderMeter(self._provider.get_meter(*args, **kwargs))


def test_without_synchronous_gauges_the_last_values_are_observed(
    metrics: Metrics, clock: FrozenClock
) -> None:
    observer = OpenTelemetryObserver(
        meter_provider=_OlderProvider(metrics.provider),  # type: ignore[arg-type]
        clock=clock,
    )
    observer.outbox(OutboxBacklog(pending=1, due=1, dead=0, oldest_due_at=clock.now()))
    observer.orders({OrderStatus.PAID: 2})
    observer.orders({OrderStatus.PAID: 3})
    observer.operation("checkout", "201", 0.5)
    observer.decision(AuditStep.REPLAYED, AuditSource.CHECKOUT)
    read = metrics.read()
    assert next(iter(read["idempay.outbox.pending"][1].values())).value == 1
    orders = {dict(key)["status"]: point.value for key, point in read["idempay.orders"][1].items()}
    assert orders["paid"] == 3
    assert orders["needs_review"] == 0
    (histogram,) = read["idempay.operation.duration"][1].values()
    assert histogram.count == 1
    assert sum(point.value for point in read["idempay.decisions"][1].values()) == 1
