"""More webhook scenarios of design/SCENARIOS.md, through the engine on the in-memory stores."""

from __future__ import annotations

import json

from tests.engine.test_webhook_flow import SECRET, TENANT, Shop, event

from idempay.core.audit import AuditStep
from idempay.core.orders import OrderStatus
from idempay.core.signature import sign_payload
from idempay.engine import Guard, GuardConfig, GuardRequest, WebhookOutcome
from idempay.engine._checkout import stripe_idempotency_key
from idempay.memory import MemoryPaymentStore


def charge_refunded(event_id: str, refunded: int, created: int) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "charge.refunded",
            "created": created,
            "livemode": False,
            "data": {
                "object": {
                    "id": "ch_1",
                    "object": "charge",
                    "payment_intent": "pi_1",
                    "amount": 1999,
                    "amount_refunded": refunded,
                    "currency": "eur",
                    "refunded": refunded == 1999,
                    "status": "succeeded",
                }
            },
        }
    ).encode()


def test_w4_a_failure_then_a_success_is_paid() -> None:
    shop = Shop()
    shop.order()
    failed = event(
        "evt_1", "payment_intent.payment_failed", status="requires_payment_method", created=10
    )
    assert shop.deliver(failed).json()["outcome"] == WebhookOutcome.APPLIED
    assert shop.state().status is OrderStatus.PAYMENT_FAILED
    assert shop.deliver(event("evt_2", "payment_intent.succeeded", created=20)).status == 200
    assert shop.state().status is OrderStatus.PAID
    assert shop.trail() == [AuditStep.FAILED, AuditStep.SUCCEEDED]


def test_w8_an_amount_mismatch_goes_to_review_without_fulfilment() -> None:
    shop = Shop()
    shop.order()
    shop.deliver(event("evt_1", "payment_intent.succeeded", amount=1))
    state = shop.state()
    assert state.status is OrderStatus.NEEDS_REVIEW
    shop.guard.dispatch_effects()
    assert not shop.sent  # the receipt (on "paid") never ran
    assert shop.trail() == [AuditStep.NEEDS_REVIEW]


def test_w9_refunds_delivered_out_of_order_are_cumulative() -> None:
    shop = Shop()
    shop.order()
    shop.deliver(event("evt_paid", "payment_intent.succeeded", created=10))
    assert shop.deliver(charge_refunded("evt_full", 1999, 30)).status == 200
    late_partial = shop.deliver(charge_refunded("evt_partial", 500, 20))
    assert late_partial.json()["outcome"] == WebhookOutcome.STALE
    state = shop.state()
    assert (state.status, state.amount_refunded) == (OrderStatus.REFUNDED, 1999)


def test_w11_secret_rotation() -> None:
    body = event("evt_1", "payment_intent.succeeded")
    old, new = "whsec_old", "whsec_new"

    def deliver(secrets: tuple[str, ...], signed_with: list[str]) -> int:
        payments = MemoryPaymentStore()
        guard = Guard(payments=payments, config=GuardConfig(webhook_secrets=secrets))
        now = int(guard.clock.now().timestamp())
        request = GuardRequest(
            method="POST",
            route="/stripe/webhook",
            body=body,
            headers={
                "Content-Type": "application/json",
                "Stripe-Signature": sign_payload(body, signed_with, timestamp=now),
            },
        )
        return guard.handle_webhook(request).status

    during = (new, old)
    assert deliver(during, [old, new]) == 200  # Stripe signs with both while they overlap
    assert deliver(during, [new]) == 200
    assert deliver(during, [old]) == 200
    assert deliver((new,), [old]) == 400  # the old secret revoked
    assert deliver((new,), [new]) == 200


def test_every_refused_delivery_is_a_typed_4xx() -> None:
    shop = Shop()
    shop.order()
    for body in (b"{not json", b'{"id": "evt_1", "id": "evt_2"}', b"\xff\xfe", b"[]"):
        now = int(shop.clock.now().timestamp())
        response = shop.deliver(body, signature=sign_payload(body, SECRET, timestamp=now))
        assert 400 <= response.status < 500
        assert response.json()["code"] in ("malformed_json", "invalid_field")
    assert shop.state().status is OrderStatus.AWAITING_PAYMENT


def test_an_event_finds_its_order_by_the_stripe_idempotency_key_it_echoes() -> None:
    # No metadata, and the PaymentIntent id not recorded yet (the checkout crashed right after
    # Stripe answered): the key of the request that created the PaymentIntent names the order.
    shop = Shop()
    shop.order(intent=None)
    body = json.loads(event("evt_1", "payment_intent.succeeded", intent="pi_9"))
    del body["data"]["object"]["metadata"]
    body["request"] = {
        "id": "req_1",
        "idempotency_key": stripe_idempotency_key(TENANT, "o1", "create"),
    }
    outcome = shop.deliver(json.dumps(body).encode()).json()["outcome"]
    assert outcome == WebhookOutcome.APPLIED
    state = shop.state()
    assert (state.status, state.payment_intent_id) == (OrderStatus.PAID, "pi_9")


def test_an_event_naming_no_order_is_kept_as_an_orphan() -> None:
    shop = Shop()
    shop.order(intent=None)
    body = json.loads(event("evt_1", "payment_intent.succeeded", intent="pi_9"))
    del body["data"]["object"]["metadata"]
    body["request"] = {"id": "req_1", "idempotency_key": "a-key-made-elsewhere"}
    assert shop.deliver(json.dumps(body).encode()).json()["outcome"] == WebhookOutcome.ORPHANED
    assert shop.state().status is OrderStatus.AWAITING_PAYMENT
