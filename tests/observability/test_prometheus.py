"""PrometheusObserver on a real prometheus_client registry, fed by a real Guard."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from tests.engine.test_webhook_flow import Shop, event
from tests.observability.recording import Recorder

from idempay.clock import FrozenClock
from idempay.core.audit import AuditSource, AuditStep
from idempay.core.models import OutboxBacklog
from idempay.core.orders import OrderStatus
from idempay.engine import WebhookOutcome
from idempay.errors import ConfigurationError
from idempay.observability import (
    Observer,
    notify_operation,
    notify_orders,
    notify_outbox,
    notify_reconciled,
    operation,
)
from idempay.observability.prometheus import PrometheusObserver

Observe = Callable[[Observer], None]


class Failing(Recorder):
    """An observer whose every hook raises."""

    def decision(self, step: AuditStep, source: AuditSource) -> None:
        raise RuntimeError("exporter down")

    def operation(self, name: str, outcome: str, seconds: float) -> None:
        raise RuntimeError("exporter down")


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock()


@pytest.fixture
def prometheus(
    registry: CollectorRegistry, clock: FrozenClock, observe: Observe
) -> PrometheusObserver:
    observer = PrometheusObserver(registry=registry, clock=clock)
    observe(observer)
    return observer


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def decisions(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Every decisions_total sample, by (step, source)."""
    return {
        (sample.labels["step"], sample.labels["source"]): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name == "idempay_decisions"
        for sample in family.samples
        if sample.name == "idempay_decisions_total"
    }


@pytest.mark.usefixtures("prometheus")
def test_a_duplicate_delivery_counts_one_duplicate_decision(registry: CollectorRegistry) -> None:
    shop = Shop()
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.APPLIED
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.DUPLICATE
    assert decisions(registry) == {("succeeded", "webhook"): 1.0, ("duplicate", "webhook"): 1.0}
    shop.deliver(body)
    assert value(registry, "idempay_decisions_total", step="duplicate", source="webhook") == 2.0


@pytest.mark.usefixtures("prometheus")
def test_a_forged_webhook_counts_a_rejection(registry: CollectorRegistry) -> None:
    shop = Shop()
    shop.order()
    forged = shop.deliver(
        event("evt_1", "payment_intent.succeeded"), signature="t=1767225600,v1=" + "0" * 64
    )
    assert forged.status == 400
    assert decisions(registry) == {("rejected", "webhook"): 1.0}


def test_a_failing_observer_does_not_break_a_webhook(
    registry: CollectorRegistry,
    observe: Observe,
    clock: FrozenClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observe(Failing())  # registered first: the one after it must still hear everything
    observe(PrometheusObserver(registry=registry, clock=clock))
    shop = Shop()
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    with caplog.at_level(logging.WARNING, logger="idempay.observability"):
        applied = shop.deliver(body)
        duplicate = shop.deliver(body)
    assert (applied.status, applied.json()["outcome"]) == (200, WebhookOutcome.APPLIED)
    assert (duplicate.status, duplicate.json()["outcome"]) == (200, WebhookOutcome.DUPLICATE)
    assert shop.state().status is OrderStatus.PAID
    assert shop.guard.dispatch_effects().done == 1
    assert decisions(registry) == {("succeeded", "webhook"): 1.0, ("duplicate", "webhook"): 1.0}
    warnings = [r for r in caplog.records if r.name == "idempay.observability"]
    assert len(warnings) == 1


@pytest.mark.usefixtures("prometheus")
def test_operations_fill_the_latency_histogram(registry: CollectorRegistry) -> None:
    with operation("webhook", event_type="payment_intent.succeeded") as op:
        op.outcome = "applied"
    notify_operation("checkout", "201", 0.003)
    notify_operation("checkout", "201", 12.0)
    count = value(
        registry, "idempay_operation_seconds_count", operation="webhook", outcome="applied"
    )
    assert count == 1.0

    def bucket(le: str) -> float | None:
        return value(
            registry, "idempay_operation_seconds_bucket", operation="checkout", outcome="201", le=le
        )

    assert (bucket("0.0025"), bucket("0.005"), bucket("10.0"), bucket("30.0")) == (0, 1, 1, 2)
    assert value(
        registry, "idempay_operation_seconds_sum", operation="checkout", outcome="201"
    ) == (pytest.approx(12.003))


@pytest.mark.usefixtures("prometheus")
def test_the_outbox_gauges_and_the_age_of_the_oldest_due_effect(
    registry: CollectorRegistry, clock: FrozenClock
) -> None:
    assert value(registry, "idempay_outbox_oldest_due_age_seconds") == 0.0
    notify_outbox(
        OutboxBacklog(pending=5, due=2, dead=1, oldest_due_at=clock.now() - timedelta(seconds=30))
    )
    assert value(registry, "idempay_outbox_pending") == 5.0
    assert value(registry, "idempay_outbox_due") == 2.0
    assert value(registry, "idempay_outbox_dead") == 1.0
    assert value(registry, "idempay_outbox_oldest_due_age_seconds") == 30.0
    # Read at scrape time: it keeps growing while nobody drains the outbox or reports.
    clock.advance(90)
    assert value(registry, "idempay_outbox_oldest_due_age_seconds") == 120.0
    notify_outbox(OutboxBacklog(pending=3, due=0, dead=1, oldest_due_at=None))
    assert value(registry, "idempay_outbox_oldest_due_age_seconds") == 0.0
    assert value(registry, "idempay_outbox_due") == 0.0


@pytest.mark.usefixtures("prometheus")
def test_every_order_status_is_reported_and_an_emptied_one_reads_zero(
    registry: CollectorRegistry,
) -> None:
    notify_orders({OrderStatus.PAID: 12, OrderStatus.NEEDS_REVIEW: 1})
    assert value(registry, "idempay_orders", status="needs_review") == 1.0
    assert value(registry, "idempay_orders", status="paid") == 12.0
    assert value(registry, "idempay_orders", status="created") == 0.0
    notify_orders({OrderStatus.PAID: 13})
    assert value(registry, "idempay_orders", status="needs_review") == 0.0
    for status in OrderStatus:
        assert value(registry, "idempay_orders", status=status.value) is not None


@pytest.mark.usefixtures("prometheus")
def test_reconciliation_results_add_up(registry: CollectorRegistry) -> None:
    notify_reconciled("changed", 2)
    notify_reconciled("changed", 3)
    notify_reconciled("unchanged", 0)
    assert value(registry, "idempay_reconciled_total", result="changed") == 5.0
    # A result seen with no item still exists as a series, at zero.
    assert value(registry, "idempay_reconciled_total", result="unchanged") == 0.0


@pytest.mark.usefixtures("prometheus")
def test_label_values_never_carry_an_order_event_or_intent_id(
    registry: CollectorRegistry,
) -> None:
    ids = {"order_id": "order-7f3a9c2e", "intent": "pi_3Lz9KqXb8Rr2", "event_id": "evt_1Q2w3E4r"}
    shop = Shop()
    shop.order(ids["order_id"], intent=ids["intent"])
    body = event(
        ids["event_id"], "payment_intent.succeeded", intent=ids["intent"], order_id=ids["order_id"]
    )
    shop.deliver(body)
    shop.deliver(body)
    shop.deliver(body, signature="t=1767225600,v1=" + "0" * 64)
    orphan = event("evt_orphan_5h6j", "payment_intent.succeeded", order_id="order-unknown-91")
    shop.deliver(orphan)
    shop.guard.dispatch_effects()
    text = generate_latest(registry).decode()
    for identifier in [*ids.values(), "evt_orphan_5h6j", "order-unknown-91"]:
        assert identifier not in text
    allowed = {
        "step": {step.value for step in AuditStep},
        "source": {source.value for source in AuditSource},
    }
    seen = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                seen.add(label)
                assert label_value in allowed.get(label, {label_value}), (label, label_value)
                assert "1999" not in label_value  # the amount
    assert {"step", "source"} <= seen


def test_one_observer_per_registry_and_namespace(
    registry: CollectorRegistry, prometheus: PrometheusObserver
) -> None:
    before = generate_latest(registry)
    with pytest.raises(ConfigurationError, match="one PrometheusObserver per registry"):
        PrometheusObserver(registry=registry)
    # Refused whole: not one metric of the refused observer was registered.
    assert generate_latest(registry) == before
    shop = PrometheusObserver(registry=registry, namespace="shop")
    shop.decision(AuditStep.REPLAYED, AuditSource.CHECKOUT)
    assert value(registry, "shop_decisions_total", step="replayed", source="checkout") == 1.0
    assert value(registry, "idempay_decisions_total", step="replayed", source="checkout") is None
