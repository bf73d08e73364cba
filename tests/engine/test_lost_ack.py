"""L5: the database connection dies mid-transaction, or a commit's acknowledgement is lost.

Real PostgreSQL behind :class:`idempay.testing.wire.WireProxy`, which forwards a statement,
lets the server execute and commit it, then throws the answer away and cuts the connection:
the worker cannot know whether its write happened. localstripe is Stripe. The answer must be a
503 (retry), and the retry must find what was committed: the stored response replayed, the
event a duplicate; never a second order, PaymentIntent, charge or effect.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from idempay.backends import idempotency_store_from_url, payment_store_from_url
from idempay.backends.sql import upgrade
from idempay.core.audit import AuditStep, verify_trail
from idempay.core.orders import OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import (
    CheckoutRequest,
    FaultPoint,
    Guard,
    GuardConfig,
    GuardRequest,
    OrderSpec,
)
from idempay.gateway import StripeGateway
from idempay.testing.wire import WireProxy

SECRET = "whsec_lost_ack"
TENANT = "acme"


class Shop:
    """A guard whose PostgreSQL traffic goes through a breakable wire."""

    def __init__(self, postgres_url: str, stripe_url: str) -> None:
        upgrade(postgres_url)
        self.proxy = WireProxy.from_url(postgres_url)
        url = self.proxy.url_for(postgres_url)
        self.payments = payment_store_from_url(url)
        self.records = idempotency_store_from_url(url)
        self.gateway = StripeGateway.from_settings("sk_test_lost_ack", api_base=stripe_url)
        self.guard = Guard(
            payments=self.payments,
            records=self.records,
            gateway=self.gateway,
            config=GuardConfig(webhook_secrets=(SECRET,), livemode=False),
        )
        self.sent: list[str] = []
        self.guard.effect("receipt", on="paid")(lambda ctx: self.sent.append(ctx.dedup_key))

        @self.guard.checkout()
        def checkout(request: CheckoutRequest) -> OrderSpec:
            return OrderSpec(
                order_id=request.fields.identifier("order_id"),
                amount=1500,
                currency="eur",
                payment_method=request.fields.optional_string("payment_method"),
            )

        self.checkout = checkout

    def post(self, order_id: str, *, pay: bool = True) -> Any:
        body: dict[str, Any] = {"order_id": order_id}
        if pay:
            body["payment_method"] = "pm_card_visa"
        return self.checkout(
            GuardRequest(
                method="POST",
                route="/checkout",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": f"k-{order_id}"},
                tenant=TENANT,
            )
        )

    def deliver(self, body: bytes) -> Any:
        return self.guard.handle_webhook(
            GuardRequest(
                method="POST",
                route="/stripe/webhook",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": sign_payload(body, SECRET, timestamp=int(time.time())),
                },
            )
        )

    def intents(self, order_id: str) -> list[Any]:
        return list(self.gateway.find_payment_intents(order_id=order_id))

    def order_and_trail(self, order_id: str) -> tuple[Any, list[AuditStep]]:
        with self.payments.transaction() as tx:
            order = tx.get_order(TENANT, order_id)
            trail = list(tx.audit_trail(TENANT, order_id))
        assert verify_trail(trail).ok
        return order, [e.step for e in trail]

    def close(self) -> None:
        self.gateway.close()
        self.payments.close()  # type: ignore[attr-defined]
        self.records.close()  # type: ignore[attr-defined]
        self.proxy.close()


@pytest.fixture
def shop(own_postgres_url: str, localstripe_url: str) -> Iterator[Shop]:
    # A database of its own: the effect count below must not see other tests' outbox rows.
    shop = Shop(own_postgres_url, localstripe_url)
    yield shop
    shop.close()


def _updates_the_record(sql: str) -> bool:
    text = sql.lower()
    return "idempay_idempotency_records" in text and text.lstrip().startswith("update")


def test_l5_a_lost_acknowledgement_of_the_completed_checkout_is_replayed(shop: Shop) -> None:
    order_id = f"l5c-{secrets.token_hex(5)}"
    warm = shop.post(f"{order_id}-warm")  # connections open, statements prepared
    assert warm.status == 201
    # The checkpoints update the record too: let them through, drop the completion's answer.
    completions: list[str] = []

    def the_completion(sql: str) -> bool:
        if _updates_the_record(sql) and "response" in sql.lower():
            completions.append(sql)
            return True
        return False

    shop.proxy.drop_reply_after(the_completion)
    first = shop.post(order_id)
    assert completions, "the completion never went through the proxy"
    assert not shop.proxy.drop_armed
    assert first.status == 503
    assert first.header("Retry-After") is not None

    again = shop.post(order_id)
    assert (again.status, again.header("Idempotent-Replayed")) == (201, "true")
    assert again.json()["status"] == "paid"
    intents = shop.intents(order_id)
    assert [pi.id for pi in intents] == [again.json()["payment_intent_id"]]
    order, steps = shop.order_and_trail(order_id)
    assert order.state.status is OrderStatus.PAID
    assert steps.count(AuditStep.STARTED) == 1
    assert steps.count(AuditStep.SUCCEEDED) == 1


def test_l5_a_lost_acknowledgement_of_a_webhook_commit_makes_the_redelivery_a_duplicate(
    shop: Shop,
) -> None:
    order_id = f"l5w-{secrets.token_hex(5)}"
    created = shop.post(order_id, pay=False)
    assert created.status == 201, created.body
    intent = created.json()["payment_intent_id"]
    body = json.dumps(
        {
            "id": f"evt_{secrets.token_hex(8)}",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "livemode": False,
            "data": {
                "object": {
                    "id": intent,
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 1500,
                    "currency": "eur",
                    "livemode": False,
                    "metadata": {"order_id": order_id, "idempay_tenant": TENANT},
                }
            },
        }
    ).encode()
    shop.proxy.drop_reply_after(lambda sql: "idempay_inbox" in sql and "insert" in sql.lower())
    first = shop.deliver(body)
    assert not shop.proxy.drop_armed
    assert first.status == 503  # Stripe delivers it again
    order, steps = shop.order_and_trail(order_id)
    assert order.state.status is OrderStatus.PAID  # the commit did happen
    again = shop.deliver(body)
    assert (again.status, again.json()["outcome"]) == (200, "duplicate")
    assert steps.count(AuditStep.SUCCEEDED) == 1
    assert shop.guard.dispatch_effects().done == 1
    assert shop.guard.dispatch_effects().done == 0
    assert len(shop.sent) == 1


def test_l5_a_connection_killed_inside_the_order_transaction_rolls_it_back(
    shop: Shop,
) -> None:
    order_id = f"l5k-{secrets.token_hex(5)}"
    assert shop.post(f"{order_id}-warm").status == 201
    shop.guard.faults.arm(FaultPoint.CHECKOUT_IN_ORDER_TRANSACTION, shop.proxy.kill_connections)
    first = shop.post(order_id)
    assert first.status == 503
    order, steps = shop.order_and_trail(order_id)
    assert order is None  # rolled back with its connection
    assert steps == []
    assert shop.intents(order_id) == []  # Stripe was never called

    again = shop.post(order_id)
    assert again.status == 201, again.body
    assert again.header("Idempotent-Replayed") is None
    assert len(shop.intents(order_id)) == 1
    order, steps = shop.order_and_trail(order_id)
    assert order.state.status is OrderStatus.PAID
    assert steps.count(AuditStep.STARTED) == 1
