"""idempay's guard over the simulator, end to end: checkout, a lost answer, webhooks mistreated.

The scenario localstripe cannot play: Stripe commits the PaymentIntent but the answer is lost
(C5), and the webhooks then arrive duplicated and shuffled (W1, W3). The order must end paid
once, with one PaymentIntent and one charge at the simulated Stripe, and its receipt sent once.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from idempay.core.orders import OrderStatus
from idempay.engine import (
    CheckoutRequest,
    EffectContext,
    Guard,
    GuardConfig,
    GuardRequest,
    GuardResponse,
    OrderSpec,
)
from idempay.gateway import StripeGateway
from idempay.memory import MemoryIdempotencyStore, MemoryPaymentStore, NoLockProvider
from idempay.testing.simulator import DeliveryPolicy, StripeSimulator, WebhookEndpoint

from .conftest import SECRET, Receiver

TENANT = "shop"


class Shop:
    def __init__(self, sim: StripeSimulator) -> None:
        self.payments = MemoryPaymentStore()
        self.gateway = StripeGateway.from_settings(sim.api_key, api_base=sim.url, timeout=5)
        self.guard = Guard(
            payments=self.payments,
            records=MemoryIdempotencyStore(),
            gateway=self.gateway,
            locks=NoLockProvider(),
            config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
        )
        self.receipts: Counter[str] = Counter()
        self._lock = threading.Lock()

        @self.guard.checkout()
        def checkout(request: CheckoutRequest) -> OrderSpec:
            fields = request.fields
            return OrderSpec(
                order_id=fields.identifier("order_id"),
                amount=fields.integer("amount", minimum=1),
                currency="eur",
                payment_method=fields.optional_string("payment_method"),
            )

        @self.guard.effect("receipt", on="paid")
        def receipt(effect: EffectContext) -> None:
            with self._lock:
                self.receipts[effect.dedup_key] += 1

        self.checkout = checkout

    def post(self, body: dict[str, object], key: str) -> GuardResponse:
        return self.checkout(
            GuardRequest(
                method="POST",
                route="/checkout",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": key},
                tenant=TENANT,
                user="u1",
            )
        )

    def webhook(self, body: bytes, headers: dict[str, str]) -> int:
        request = GuardRequest(
            method="POST",
            route="/stripe/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": headers["stripe-signature"],
            },
        )
        return self.guard.handle_webhook(request).status


@pytest.fixture
def world(receiver: Receiver) -> Iterator[tuple[StripeSimulator, Shop]]:
    policy = DeliveryPolicy(
        duplicate_probability=1.0, duplicate_copies=2, reorder_window=50, concurrency=4
    )
    sim = StripeSimulator(
        webhook_endpoints=[WebhookEndpoint(receiver.url, SECRET)], delivery=policy, seed=11
    )
    with sim:
        shop = Shop(sim)
        receiver.now = sim.now
        receiver.forward = shop.webhook  # the receiver checked the signature; the guard too
        try:
            yield sim, shop
        finally:
            shop.gateway.close()


def test_a_lost_answer_then_mistreated_webhooks_still_pay_the_order_once(
    world: tuple[StripeSimulator, Shop],
) -> None:
    sim, shop = world
    body = {"order_id": "o-lost", "amount": 1999, "payment_method": "pm_card_visa"}
    sim.reset_next("/v1/payment_intents")  # committed at Stripe, the answer lost
    first = shop.post(body, key="click-1")
    assert first.status == 503
    assert len(sim.payment_intents()) == 1

    again = shop.post(body, key="click-1")
    assert again.status == 201
    intents = sim.payment_intents()
    assert len(intents) == 1
    assert intents[0]["status"] == "succeeded"
    assert len(sim.charges()) == 1

    stats = sim.flush_webhooks()
    assert stats.duplicated == 2 * stats.events
    assert stats.status_codes.keys() == {"200"}  # every copy answered 2xx, none a 5xx
    shop.guard.dispatch_effects()
    with shop.payments.transaction() as tx:
        order = tx.get_order(TENANT, "o-lost")
    assert order is not None
    assert order.state.status is OrderStatus.PAID
    assert list(shop.receipts.values()) == [1]
