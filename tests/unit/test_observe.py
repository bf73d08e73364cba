"""Stripe events and PaymentIntents reduced to state-machine observations."""

from __future__ import annotations

import json
from typing import Any

import pytest

from idempay.core.events import PaymentIntentSnapshot, parse_event
from idempay.core.observe import observation_from_event, observation_from_intent
from idempay.core.orders import (
    DisputeObserved,
    DisputeStatus,
    OrderState,
    OrderStatus,
    PaymentObserved,
    PaymentPhase,
    RefundObserved,
    apply,
)
from idempay.errors import InvalidFieldError

CREATED = 1_760_000_000


def intent(status: str = "succeeded", **extra: Any) -> dict[str, Any]:
    return {
        "id": "pi_123",
        "object": "payment_intent",
        "status": status,
        "amount": 1999,
        "amount_received": 1999 if status == "succeeded" else 0,
        "currency": "eur",
        "livemode": False,
        "metadata": {"order_id": "o-42"},
        "last_payment_error": None,
    } | extra


def charge(**extra: Any) -> dict[str, Any]:
    return {
        "id": "ch_1",
        "object": "charge",
        "payment_intent": "pi_123",
        "amount": 1999,
        "amount_refunded": 0,
        "currency": "eur",
        "refunded": False,
        "status": "succeeded",
    } | extra


def event(event_type: str, obj: dict[str, Any]) -> bytes:
    body = {
        "id": "evt_1",
        "object": "event",
        "type": event_type,
        "created": CREATED,
        "livemode": False,
        "api_version": "2025-06-30.basil",
        "data": {"object": obj},
        "request": {"id": "req_1", "idempotency_key": "idempay:o-42:create"},
    }
    return json.dumps(body).encode()


def observe(event_type: str, obj: dict[str, Any]) -> object:
    return observation_from_event(parse_event(event(event_type, obj)))


@pytest.mark.parametrize(
    ("event_type", "status", "phase"),
    [
        ("payment_intent.succeeded", "succeeded", PaymentPhase.SUCCEEDED),
        # The PI is back in requires_payment_method: the type says what happened.
        ("payment_intent.payment_failed", "requires_payment_method", PaymentPhase.FAILED),
        ("payment_intent.processing", "processing", PaymentPhase.PROCESSING),
        ("payment_intent.requires_action", "requires_action", PaymentPhase.ACTION_REQUIRED),
        ("payment_intent.canceled", "canceled", PaymentPhase.CANCELED),
        ("payment_intent.amount_capturable_updated", "requires_capture", PaymentPhase.AUTHORIZED),
        ("payment_intent.created", "requires_payment_method", PaymentPhase.AWAITING_PAYMENT),
        ("payment_intent.created", "requires_action", PaymentPhase.ACTION_REQUIRED),
        (
            "payment_intent.partially_funded",
            "requires_payment_method",
            PaymentPhase.AWAITING_PAYMENT,
        ),
    ],
)
def test_payment_intent_events(event_type: str, status: str, phase: PaymentPhase) -> None:
    assert observe(event_type, intent(status)) == PaymentObserved(
        phase=phase,
        observed_at=CREATED,
        payment_intent_id="pi_123",
        amount=1999,
        currency="eur",
    )


def test_unknown_payment_intent_event_types_are_ignored() -> None:
    assert observe("payment_intent.some_future_event", intent("processing")) is None


def test_charge_refunded_is_cumulative() -> None:
    assert observe("charge.refunded", charge(amount_refunded=500, refunded=False)) == (
        RefundObserved(amount_refunded=500, currency="eur")
    )


def test_charge_failure_and_pending_name_their_intent() -> None:
    failed = observe("charge.failed", charge(status="failed"))
    assert isinstance(failed, PaymentObserved)
    assert (failed.phase, failed.payment_intent_id) == (PaymentPhase.FAILED, "pi_123")
    pending = observe("charge.pending", charge(status="pending"))
    assert isinstance(pending, PaymentObserved)
    assert pending.phase is PaymentPhase.PROCESSING


def test_charge_succeeded_is_not_a_payment() -> None:
    # With manual capture it is only an authorisation; payment_intent.succeeded is the success.
    assert observe("charge.succeeded", charge()) is None


@pytest.mark.parametrize(
    ("status", "overlay"),
    [
        ("needs_response", DisputeStatus.OPEN),
        ("warning_needs_response", DisputeStatus.OPEN),
        ("under_review", DisputeStatus.OPEN),
        ("won", DisputeStatus.WON),
        ("warning_closed", DisputeStatus.WON),
        ("lost", DisputeStatus.LOST),
    ],
)
def test_disputes(status: str, overlay: DisputeStatus) -> None:
    dispute = {
        "id": "dp_1",
        "object": "dispute",
        "charge": "ch_1",
        "payment_intent": "pi_123",
        "amount": 1999,
        "currency": "eur",
        "status": status,
    }
    assert observe("charge.dispute.updated", dispute) == DisputeObserved(status=overlay)


def test_unknown_dispute_status_is_ignored() -> None:
    dispute = {
        "id": "dp_1",
        "object": "dispute",
        "charge": "ch_1",
        "payment_intent": None,
        "amount": 1,
        "currency": "eur",
        "status": "prevented",
    }
    assert observe("charge.dispute.updated", dispute) is None


def session(payment_status: str) -> dict[str, Any]:
    return {
        "id": "cs_1",
        "object": "checkout.session",
        "payment_intent": "pi_123",
        "payment_status": payment_status,
        "amount_total": 1999,
        "currency": "eur",
        "metadata": {"order_id": "o-42"},
        "client_reference_id": None,
    }


@pytest.mark.parametrize(
    ("event_type", "payment_status", "phase"),
    [
        ("checkout.session.completed", "paid", PaymentPhase.SUCCEEDED),
        ("checkout.session.completed", "unpaid", PaymentPhase.PROCESSING),
        ("checkout.session.completed", "no_payment_required", None),
        ("checkout.session.async_payment_succeeded", "paid", PaymentPhase.SUCCEEDED),
        ("checkout.session.async_payment_failed", "unpaid", PaymentPhase.FAILED),
        ("checkout.session.expired", "unpaid", PaymentPhase.CANCELED),
    ],
)
def test_checkout_sessions(
    event_type: str, payment_status: str, phase: PaymentPhase | None
) -> None:
    observed = observe(event_type, session(payment_status))
    if phase is None:
        assert observed is None
    else:
        assert isinstance(observed, PaymentObserved)
        assert (observed.phase, observed.amount, observed.payment_intent_id) == (
            phase,
            1999,
            "pi_123",
        )


def test_events_idempay_does_not_read_are_ignored() -> None:
    assert observe("customer.created", {"id": "cus_1", "object": "customer"}) is None
    assert observe("refund.updated", {"id": "re_1", "object": "refund"}) is None


def test_a_fetched_intent_is_observed_at_the_fetch_time() -> None:
    event_ = parse_event(event("payment_intent.processing", intent("processing")))
    assert isinstance(event_.object, PaymentIntentSnapshot)
    observed = observation_from_intent(event_.object, observed_at=CREATED + 3600)
    assert observed == PaymentObserved(
        PaymentPhase.PROCESSING, CREATED + 3600, "pi_123", 1999, "eur"
    )


def test_an_intent_with_an_unknown_status_is_refused() -> None:
    event_ = parse_event(event("payment_intent.processing", intent("processing")))
    assert isinstance(event_.object, PaymentIntentSnapshot)
    odd = PaymentIntentSnapshot(
        id="pi_1",
        status="requires_reconfirmation",
        amount=1,
        amount_received=0,
        currency="eur",
        livemode=False,
        metadata={},
        last_payment_error_code=None,
    )
    with pytest.raises(InvalidFieldError):
        observation_from_intent(odd, observed_at=0)


def test_end_to_end_a_success_pays_the_order_it_names() -> None:
    order = OrderState(OrderStatus.AWAITING_PAYMENT, 1999, "eur", payment_intent_id="pi_123")
    observed = observe("payment_intent.succeeded", intent())
    assert isinstance(observed, PaymentObserved)
    transition = apply(order, observed)
    assert transition.after.status is OrderStatus.PAID


def test_an_intent_back_to_awaiting_with_an_error_is_a_failed_attempt() -> None:
    declined = PaymentIntentSnapshot(
        id="pi_1",
        status="requires_payment_method",
        amount=1999,
        amount_received=0,
        currency="eur",
        livemode=False,
        metadata={},
        last_payment_error_code="card_declined",
    )
    observed = observation_from_intent(declined, observed_at=5)
    assert isinstance(observed, PaymentObserved)
    assert observed.phase is PaymentPhase.FAILED
