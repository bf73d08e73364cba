"""Canceling an order at Stripe, and the in-flight "wait, then replay" policy of checkouts.

Against localstripe, with the in-memory stores (the cancel rules run on every backend in
test_days.py).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from tests.engine.test_checkout_flow import TENANT, Shop, uid

from idempay.core.audit import AuditSource, AuditStep
from idempay.core.orders import OrderStatus
from idempay.core.records import IdempotencyRecord
from idempay.engine import CheckoutRequest, EffectContext, Guard, GuardConfig, GuardRequest
from idempay.engine._checkout import OrderSpec
from idempay.gateway import StripeGateway
from idempay.memory import MemoryIdempotencyStore, MemoryPaymentStore, NoLockProvider


@pytest.fixture
def shop(localstripe_url: str) -> Iterator[Shop]:
    shop = Shop(localstripe_url)
    shop.sent = Counter()

    @shop.guard.effect("notify-cancel", on="canceled")
    def notify(ctx: EffectContext) -> None:
        shop.sent[ctx.order_id] += 1

    yield shop
    shop.gateway.close()


def _sources(shop: Shop, order_id: str) -> list[tuple[AuditStep, AuditSource]]:
    with shop.payments.transaction() as tx:
        return [(e.step, e.source) for e in tx.audit_trail(TENANT, order_id)]


def test_cancel_at_stripe_cancels_the_payment_intent_first(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    created = shop.post({"order_id": order_id, "amount": 1500}, key=f"k-{order_id}")
    assert created.status == 201
    intent_id = created.json()["payment_intent_id"]

    order = shop.guard.cancel_order(order_id, tenant=TENANT)

    assert order.state.status is OrderStatus.CANCELED
    assert shop.gateway.retrieve_payment_intent(intent_id).status == "canceled"
    assert (AuditStep.CANCELED, AuditSource.OPERATOR) in _sources(shop, order_id)
    shop.guard.dispatch_effects()
    assert shop.sent == Counter({order_id: 1})
    # Again: Stripe's answer and the local rule both say "already canceled"; nothing fires.
    assert shop.guard.cancel_order(order_id, tenant=TENANT).state.status is OrderStatus.CANCELED
    shop.guard.dispatch_effects()
    assert shop.sent == Counter({order_id: 1})


def test_cancel_of_a_paid_order_is_refused_by_stripe_and_by_the_rules(shop: Shop) -> None:
    order_id = f"o-{uid()}"
    body = {"order_id": order_id, "amount": 1500, "payment_method": "pm_card_visa"}
    assert shop.post(body, key=f"k-{order_id}").json()["status"] == "paid"

    order = shop.guard.cancel_order(order_id, tenant=TENANT)

    assert order.state.status is OrderStatus.PAID
    assert _sources(shop, order_id)[-1] == (AuditStep.REJECTED, AuditSource.OPERATOR)
    shop.guard.dispatch_effects()
    assert not shop.sent


class WatchedRecords(MemoryIdempotencyStore):
    """The in-memory store, telling the test when a waiting request polls it."""

    def __init__(self) -> None:
        super().__init__()
        self.polled = threading.Event()

    def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        self.polled.set()
        return super().get(scope, key)


class SlowShop:
    """A checkout whose handler is held until the test lets it go."""

    def __init__(self, stripe_url: str, wait: timedelta) -> None:
        self.records = WatchedRecords()
        self.gateway = StripeGateway.from_settings("sk_test_idempay", api_base=stripe_url)
        self.guard = Guard(
            payments=MemoryPaymentStore(),
            records=self.records,
            gateway=self.gateway,
            locks=NoLockProvider(),
            config=GuardConfig(in_flight_wait=wait),
        )
        self.entered = threading.Event()
        self.go = threading.Event()
        self.calls = 0

        @self.guard.checkout()
        def checkout(request: CheckoutRequest) -> OrderSpec:
            self.calls += 1
            self.entered.set()
            assert self.go.wait(timeout=30)
            return OrderSpec(
                order_id=request.fields.identifier("order_id"), amount=700, currency="eur"
            )

        self.checkout = checkout

    def post(self, order_id: str) -> Any:
        return self.checkout(
            GuardRequest(
                method="POST",
                route="/checkout",
                body=json.dumps({"order_id": order_id}).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": order_id},
                tenant=TENANT,
            )
        )


def test_a_request_in_flight_is_waited_for_then_replayed(localstripe_url: str) -> None:
    shop = SlowShop(localstripe_url, wait=timedelta(seconds=30))
    order_id = f"o-{uid()}"
    try:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(shop.post, order_id)
            assert shop.entered.wait(timeout=30)
            second = pool.submit(shop.post, order_id)
            # The second request is polling the record: only now may the first finish.
            assert shop.records.polled.wait(timeout=30)
            shop.go.set()
            a, b = first.result(timeout=60), second.result(timeout=60)
    finally:
        shop.gateway.close()
    assert (a.status, a.header("Idempotent-Replayed")) == (201, None)
    assert (b.status, b.header("Idempotent-Replayed")) == (201, "true")
    assert b.json() == a.json()
    assert shop.calls == 1


def test_a_wait_that_runs_out_answers_409(localstripe_url: str) -> None:
    shop = SlowShop(localstripe_url, wait=timedelta(milliseconds=50))
    order_id = f"o-{uid()}"
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(shop.post, order_id)
            assert shop.entered.wait(timeout=30)
            second = shop.post(order_id)
            assert shop.records.polled.is_set()
            shop.go.set()
            assert first.result(timeout=60).status == 201
    finally:
        shop.go.set()
        shop.gateway.close()
    assert second.status == 409
    assert second.header("Retry-After") is not None
    assert shop.calls == 1


def test_waiting_is_off_by_default() -> None:
    assert GuardConfig().in_flight_wait == timedelta(0)
    with pytest.raises(ValueError, match="negative"):
        GuardConfig(in_flight_wait=timedelta(seconds=-1))
