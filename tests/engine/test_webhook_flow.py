"""The webhook flow through the engine, on the in-memory stores (the backends run it too)."""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pytest

from idempay.clock import FrozenClock
from idempay.core.audit import AuditStep, verify_trail
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import (
    EffectContext,
    FaultPoint,
    Guard,
    GuardConfig,
    GuardRequest,
    WebhookOutcome,
)
from idempay.memory import MemoryPaymentStore, NoLockProvider

SECRET = "whsec_engine_tests"
TENANT = "shop"


def event(
    event_id: str,
    event_type: str,
    *,
    intent: str = "pi_1",
    order_id: str = "o1",
    status: str = "succeeded",
    created: int = 1_767_225_600,
    amount: int = 1999,
) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": created,
            "livemode": False,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": status,
                    "amount": amount,
                    "amount_received": amount if status == "succeeded" else 0,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order_id, "idempay_tenant": TENANT},
                }
            },
        }
    ).encode()


class Shop:
    def __init__(self) -> None:
        self.clock = FrozenClock()
        self.payments = MemoryPaymentStore(clock=self.clock)
        self.guard = Guard(
            payments=self.payments,
            config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
            locks=NoLockProvider(),
            clock=self.clock,
        )
        self.sent: Counter[str] = Counter()

        @self.guard.effect("receipt", on="paid")
        def receipt(ctx: EffectContext) -> None:
            self.sent[ctx.dedup_key] += 1

    def order(self, order_id: str = "o1", intent: str | None = "pi_1") -> None:
        with self.payments.transaction() as tx:
            tx.insert_order(
                TENANT,
                order_id,
                OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", payment_intent_id=intent),
            )

    def deliver(self, body: bytes, **overrides: Any) -> Any:
        now = int(self.clock.now().timestamp())
        request = GuardRequest(
            method=overrides.get("method", "POST"),
            route="/stripe/webhook",
            body=body,
            headers={
                "Content-Type": overrides.get("content_type", "application/json"),
                "Stripe-Signature": overrides.get(
                    "signature", sign_payload(body, SECRET, timestamp=now)
                ),
            },
        )
        return self.guard.handle_webhook(request)

    def state(self, order_id: str = "o1") -> OrderState:
        with self.payments.transaction() as tx:
            record = tx.get_order(TENANT, order_id)
            assert record is not None
            return record.state

    def trail(self, order_id: str = "o1") -> list[AuditStep]:
        with self.payments.transaction() as tx:
            entries = tx.audit_trail(TENANT, order_id)
            assert verify_trail(entries).ok
            return [e.step for e in entries]


@pytest.fixture
def shop() -> Shop:
    return Shop()


def test_w1_a_duplicate_is_applied_once(shop: Shop) -> None:
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    first = shop.deliver(body)
    assert first.status == 200
    assert first.json()["outcome"] == WebhookOutcome.APPLIED
    again = shop.deliver(body)
    assert (again.status, again.json()["outcome"]) == (200, WebhookOutcome.DUPLICATE)
    assert shop.state().status is OrderStatus.PAID
    assert shop.trail() == [AuditStep.SUCCEEDED]
    assert shop.guard.dispatch_effects().done == 1
    assert shop.guard.dispatch_effects().done == 0
    assert list(shop.sent.values()) == [1]


def test_w3_out_of_order_never_regresses(shop: Shop) -> None:
    shop.order()
    shop.deliver(event("evt_2", "payment_intent.succeeded", created=1_767_225_700))
    stale = shop.deliver(
        event(
            "evt_1",
            "payment_intent.payment_failed",
            status="requires_payment_method",
            created=1_767_225_650,
        )
    )
    assert (stale.status, stale.json()["outcome"]) == (200, WebhookOutcome.STALE)
    assert shop.state().status is OrderStatus.PAID
    assert shop.trail() == [AuditStep.SUCCEEDED, AuditStep.IGNORED_STALE]


def test_w5_an_orphan_waits_for_its_order(shop: Shop) -> None:
    body = event("evt_1", "payment_intent.succeeded")
    early = shop.deliver(body)
    assert early.json()["outcome"] == WebhookOutcome.ORPHANED
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.ORPHANED
    shop.order()
    with shop.payments.transaction() as tx:
        order = tx.get_order(TENANT, "o1")
    assert order is not None
    assert shop.guard.apply_orphans(order) == 1
    assert shop.state().status is OrderStatus.PAID
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.DUPLICATE


def test_w5_an_event_finds_its_order_by_metadata_before_the_intent_is_recorded(
    shop: Shop,
) -> None:
    shop.order(intent=None)
    shop.deliver(event("evt_1", "payment_intent.succeeded"))
    state = shop.state()
    assert (state.status, state.payment_intent_id) == (OrderStatus.PAID, "pi_1")


def test_w10_unknown_types_are_acknowledged_and_ignored(shop: Shop) -> None:
    shop.order()
    body = json.dumps(
        {
            "id": "evt_x",
            "object": "event",
            "type": "customer.created",
            "created": 1,
            "livemode": False,
            "data": {"object": {"id": "cus_1", "object": "customer"}},
        }
    ).encode()
    response = shop.deliver(body)
    assert (response.status, response.json()["outcome"]) == (200, WebhookOutcome.IGNORED)
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.DUPLICATE


@pytest.mark.parametrize(
    ("overrides", "status"),
    [
        ({"signature": "t=1,v1=" + "0" * 64}, 400),
        ({"signature": ""}, 400),
        ({"method": "GET"}, 405),
        ({"content_type": "text/plain"}, 415),
    ],
)
def test_refused_deliveries_write_nothing(
    shop: Shop, overrides: dict[str, str], status: int
) -> None:
    shop.order()
    response = shop.deliver(event("evt_1", "payment_intent.succeeded"), **overrides)
    assert response.status == status
    assert response.content_type == "application/problem+json"
    assert shop.state().status is OrderStatus.AWAITING_PAYMENT
    with shop.payments.transaction() as tx:
        assert tx.get_event("", "evt_1") is None


def test_w12_a_replay_after_the_window_is_refused(shop: Shop) -> None:
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")
    old = sign_payload(body, SECRET, timestamp=int(shop.clock.now().timestamp()) - 301)
    assert shop.deliver(body, signature=old).status == 400
    assert shop.state().status is OrderStatus.AWAITING_PAYMENT


def test_w14_a_failing_effect_is_retried_then_sent_once(shop: Shop) -> None:
    shop.order()
    failures = iter([RuntimeError("smtp down")])

    @shop.guard.effect("flaky", on="paid")
    def flaky(ctx: EffectContext) -> None:
        error = next(failures, None)
        if error is not None:
            raise error
        shop.sent[ctx.dedup_key] += 1

    shop.deliver(event("evt_1", "payment_intent.succeeded"))
    first = shop.guard.dispatch_effects()
    assert (first.done, first.retried) == (1, 1)
    shop.clock.advance(3600)
    assert shop.guard.dispatch_effects().done == 1
    assert sorted(shop.sent.values()) == [1, 1]


def test_a_crash_before_commit_leaves_the_event_to_a_redelivery(shop: Shop) -> None:
    shop.order()
    body = event("evt_1", "payment_intent.succeeded")

    def crash() -> None:
        raise KeyboardInterrupt

    shop.guard.faults.arm(FaultPoint.WEBHOOK_BEFORE_COMMIT, crash)
    with pytest.raises(KeyboardInterrupt):
        shop.deliver(body)
    assert shop.state().status is OrderStatus.AWAITING_PAYMENT
    assert shop.deliver(body).json()["outcome"] == WebhookOutcome.APPLIED
    assert shop.state().status is OrderStatus.PAID


def test_shuffled_duplicated_histories_end_where_in_order_delivery_ends(shop: Shop) -> None:
    rng = random.Random(5)
    plan = []
    for n in range(30):
        order_id, intent = f"o{n}", f"pi_{n}"
        shop.order(order_id, intent)
        history = [
            ("payment_intent.processing", "processing"),
            ("payment_intent.payment_failed", "requires_payment_method"),
            ("payment_intent.succeeded", "succeeded"),
        ][: rng.randint(1, 3)]
        for i, (kind, status) in enumerate(history):
            body = event(
                f"evt_{n}_{i}",
                kind,
                intent=intent,
                order_id=order_id,
                status=status,
                created=1_767_225_600 + i,
            )
            plan.extend([body] * rng.randint(1, 4))
    rng.shuffle(plan)
    for body in plan:
        assert shop.deliver(body).status == 200
    shop.guard.dispatch_effects(limit=1000)
    assert all(times == 1 for times in shop.sent.values())
    paid = [n for n in range(30) if shop.state(f"o{n}").status is OrderStatus.PAID]
    assert len(shop.sent) == len(paid)
