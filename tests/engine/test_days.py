"""Orders that live for days: a bank debit processing for a week (W6) and local cancels (W7).

Run on real SQLite, PostgreSQL and MariaDB, with one FrozenClock shared by the guard and its
store, so that a week passes in a few milliseconds and every timestamp (signatures, audit
entries, outbox schedules) follows the simulated calendar.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from idempay.backends import payment_store_from_url
from idempay.clock import FrozenClock
from idempay.core.audit import AuditSource, AuditStep, verify_trail
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import EffectContext, Guard, GuardConfig, GuardRequest, WebhookOutcome
from idempay.errors import OrderNotFoundError
from idempay.protocols import PaymentStore

SECRET = "whsec_days"
TENANT = "shop"
DAY = timedelta(days=1)


class Shop:
    """One order's life on a real store, with a clock that only moves when told to."""

    def __init__(self, url: str) -> None:
        from idempay.backends.sql import upgrade

        upgrade(url)
        self.clock = FrozenClock()
        self.payments: PaymentStore = payment_store_from_url(url, clock=self.clock)
        self.guard = Guard(
            payments=self.payments,
            config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
            clock=self.clock,
        )
        self.sent: Counter[str] = Counter()
        self.order_id = f"o-{secrets.token_hex(4)}"
        self.intent = f"pi_{secrets.token_hex(6)}"

        for trigger in ("paid", "payment_failed", "canceled", "needs_review"):
            self.guard.effect(trigger, on=trigger)(self._record(trigger))

    def _record(self, name: str) -> Any:
        def run(ctx: EffectContext) -> None:
            assert ctx.order_id == self.order_id
            self.sent[name] += 1

        return run

    def create_order(self) -> None:
        with self.payments.transaction() as tx:
            tx.insert_order(
                TENANT,
                self.order_id,
                OrderState(
                    OrderStatus.AWAITING_PAYMENT, 4200, "eur", payment_intent_id=self.intent
                ),
            )

    def deliver(self, event_type: str, status: str) -> WebhookOutcome:
        now = int(self.clock.now().timestamp())
        body = json.dumps(
            {
                "id": f"evt_{secrets.token_hex(6)}",
                "object": "event",
                "type": event_type,
                "created": now,
                "livemode": False,
                "data": {
                    "object": {
                        "id": self.intent,
                        "object": "payment_intent",
                        "status": status,
                        "amount": 4200,
                        "currency": "eur",
                        "payment_method_types": ["sepa_debit"],
                        "livemode": False,
                        "metadata": {"order_id": self.order_id, "idempay_tenant": TENANT},
                    }
                },
            }
        ).encode()
        response = self.guard.handle_webhook(
            GuardRequest(
                method="POST",
                route="/stripe/webhook",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": sign_payload(body, SECRET, timestamp=now),
                },
            )
        )
        assert response.status == 200, response.body
        return WebhookOutcome(response.json()["outcome"])

    def status(self) -> OrderStatus:
        with self.payments.transaction() as tx:
            record = tx.get_order(TENANT, self.order_id)
        assert record is not None
        return record.state.status

    def trail(self) -> list[tuple[AuditStep, AuditSource]]:
        with self.payments.transaction() as tx:
            entries = tx.audit_trail(TENANT, self.order_id)
        assert verify_trail(entries).ok
        return [(e.step, e.source) for e in entries]

    def close(self) -> None:
        close = getattr(self.payments, "close", None)
        if close is not None:
            close()


@pytest.fixture(params=["sqlite", "postgres", "mysql"])
def shop(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Shop]:
    url = (
        f"sqlite:///{tmp_path / 'days.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue(f"{request.param}_url")
    )
    shop = Shop(url)
    shop.create_order()
    yield shop
    shop.close()


def _a_week_of_processing(shop: Shop) -> None:
    assert shop.deliver("payment_intent.processing", "processing") is WebhookOutcome.APPLIED
    for day in range(1, 7):
        shop.clock.advance(DAY)
        # The daily jobs run: nothing is fulfilled, nothing is canceled behind Stripe's back.
        shop.guard.dispatch_effects()
        assert shop.status() is OrderStatus.PROCESSING, f"day {day}"
        if day == 3:
            # A cancel while the debit is in flight is refused: only Stripe can stop it.
            refused = shop.guard.cancel_order(shop.order_id, tenant=TENANT)
            assert refused.state.status is OrderStatus.PROCESSING
    assert not shop.sent


def test_w6_a_bank_debit_processing_for_a_week_then_succeeding(shop: Shop) -> None:
    _a_week_of_processing(shop)
    shop.clock.advance(DAY)
    assert shop.deliver("payment_intent.succeeded", "succeeded") is WebhookOutcome.APPLIED
    assert shop.status() is OrderStatus.PAID
    assert shop.guard.dispatch_effects().done == 1
    assert shop.sent == Counter({"paid": 1})
    assert shop.trail() == [
        (AuditStep.PROCESSING, AuditSource.WEBHOOK),
        (AuditStep.REJECTED, AuditSource.OPERATOR),
        (AuditStep.SUCCEEDED, AuditSource.WEBHOOK),
    ]


def test_w6_a_bank_debit_processing_for_a_week_then_failing(shop: Shop) -> None:
    _a_week_of_processing(shop)
    shop.clock.advance(DAY)
    outcome = shop.deliver("payment_intent.payment_failed", "requires_payment_method")
    assert outcome is WebhookOutcome.APPLIED
    assert shop.status() is OrderStatus.PAYMENT_FAILED
    shop.guard.dispatch_effects()
    assert shop.sent == Counter({"payment_failed": 1})
    steps = [step for step, _ in shop.trail()]
    assert steps == [AuditStep.PROCESSING, AuditStep.REJECTED, AuditStep.FAILED]


def test_w7_a_success_after_a_local_cancel_goes_to_review(shop: Shop) -> None:
    canceled = shop.guard.cancel_order(shop.order_id, tenant=TENANT, at_stripe=False)
    assert canceled.state.status is OrderStatus.CANCELED
    shop.clock.advance(timedelta(hours=2))
    assert shop.deliver("payment_intent.succeeded", "succeeded") is WebhookOutcome.APPLIED
    assert shop.status() is OrderStatus.NEEDS_REVIEW
    shop.guard.dispatch_effects()
    # Never fulfilled as paid, never silently kept: a human is told.
    assert shop.sent == Counter({"canceled": 1, "needs_review": 1})
    assert [step for step, _ in shop.trail()] == [AuditStep.CANCELED, AuditStep.NEEDS_REVIEW]
    # Canceling again changes nothing and fires nothing.
    again = shop.guard.cancel_order(shop.order_id, tenant=TENANT, at_stripe=False)
    assert again.state.status is OrderStatus.NEEDS_REVIEW


def test_a_paid_order_cannot_be_canceled(shop: Shop) -> None:
    shop.deliver("payment_intent.succeeded", "succeeded")
    refused = shop.guard.cancel_order(shop.order_id, tenant=TENANT)
    assert refused.state.status is OrderStatus.PAID
    assert [step for step, _ in shop.trail()] == [AuditStep.SUCCEEDED, AuditStep.REJECTED]


def test_canceling_an_unknown_order_is_404(shop: Shop) -> None:
    with pytest.raises(OrderNotFoundError) as caught:
        shop.guard.cancel_order("no-such-order", tenant=TENANT)
    assert caught.value.status == 404


def test_inspect_order_shows_the_state_the_checked_trail_and_the_effects(shop: Shop) -> None:
    shop.deliver("payment_intent.succeeded", "succeeded")
    shop.guard.dispatch_effects()
    view = shop.guard.inspect_order(shop.order_id, tenant=TENANT)
    assert view.order.state.status is OrderStatus.PAID
    assert [e.step for e in view.audit] == [AuditStep.SUCCEEDED]
    assert view.trail_check.ok
    assert view.trail_check.entries == 1
    assert [(e.effect, e.status.value) for e in view.effects] == [("paid", "done")]
    with pytest.raises(OrderNotFoundError):
        shop.guard.inspect_order(shop.order_id, tenant="another-tenant")
