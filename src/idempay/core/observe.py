"""From Stripe's words to the state machine's: events and PaymentIntents become observations.

Whatever reaches an order (a webhook event, the PaymentIntent returned by an API call, one
fetched by the reconciler) is reduced here to an :data:`~idempay.core.orders.Observation`, so
that a single function, :func:`idempay.core.orders.apply`, decides every change.
"""

from __future__ import annotations

from typing import Final, assert_never

from idempay.core.events import (
    ChargeSnapshot,
    CheckoutSessionSnapshot,
    DisputeSnapshot,
    PaymentIntentSnapshot,
    StripeEvent,
)
from idempay.core.orders import (
    INTENT_STATUS_EVENT_TYPES,
    DisputeObserved,
    DisputeStatus,
    Observation,
    PaymentObserved,
    PaymentPhase,
    RefundObserved,
    phase_for_event_type,
    phase_for_intent_status,
)
from idempay.errors import InvalidFieldError

__all__ = [
    "DISPUTE_STATUSES",
    "observation_from_event",
    "observation_from_intent",
]

DISPUTE_STATUSES: Final = {
    "warning_needs_response": DisputeStatus.OPEN,
    "warning_under_review": DisputeStatus.OPEN,
    "needs_response": DisputeStatus.OPEN,
    "under_review": DisputeStatus.OPEN,
    # An inquiry closed without a chargeback: the money stays, as with a won dispute.
    "warning_closed": DisputeStatus.WON,
    "won": DisputeStatus.WON,
    "lost": DisputeStatus.LOST,
}
"""Stripe's dispute statuses, reduced to the overlay idempay keeps."""

_SESSION_PAYMENT_STATUS: Final = {
    "paid": PaymentPhase.SUCCEEDED,
    # Bank debits through Checkout complete "unpaid"; the outcome follows days later.
    "unpaid": PaymentPhase.PROCESSING,
}


def observation_from_intent(intent: PaymentIntentSnapshot, *, observed_at: int) -> Observation:
    """Reduce a PaymentIntent (an API response, or one fetched by the reconciler).

    ``observed_at`` is when it was read (unix seconds). The PaymentIntent's own status is the
    truth at that moment, so it always yields an observation; ``requires_payment_method``
    with a ``last_payment_error`` is a failed attempt.
    """
    phase = phase_for_intent_status(intent.status)
    if phase is PaymentPhase.AWAITING_PAYMENT and intent.last_payment_error_code is not None:
        # Back to requires_payment_method with an error: the last attempt failed.
        phase = PaymentPhase.FAILED
    if phase is None:
        # parse_event admits only known statuses; this guards snapshots built elsewhere.
        raise InvalidFieldError("/status", "is not a known PaymentIntent status")
    return PaymentObserved(
        phase=phase,
        observed_at=observed_at,
        payment_intent_id=intent.id,
        amount=intent.amount,
        currency=intent.currency,
    )


def observation_from_event(event: StripeEvent) -> Observation | None:
    """Reduce a webhook event, or return None for events idempay does not act upon.

    Guarantees:
        - The phase comes from the event type where the type alone decides
          (``payment_intent.payment_failed`` is a failure although the PaymentIntent is back in
          ``requires_payment_method``), else from the object's own status.
        - Refunds are read from ``charge.refunded`` as the charge's cumulative
          ``amount_refunded`` (so delivery order cannot make it decrease).
        - ``charge.succeeded`` is not a success (with manual capture it is only an
          authorisation): ``payment_intent.succeeded`` is.
        - ``observed_at`` is the event's ``created`` time.
    """
    obj = event.object
    match obj:
        case PaymentIntentSnapshot():
            phase = phase_for_event_type(event.type)
            if phase is None and event.type in INTENT_STATUS_EVENT_TYPES:
                phase = phase_for_intent_status(obj.status)
            return _payment(event, phase, obj.id, obj.amount, obj.currency)
        case ChargeSnapshot():
            if event.type == "charge.refunded":
                return RefundObserved(amount_refunded=obj.amount_refunded, currency=obj.currency)
            phase = phase_for_event_type(event.type)
            return _payment(event, phase, obj.payment_intent_id, obj.amount, obj.currency)
        case DisputeSnapshot():
            status = DISPUTE_STATUSES.get(obj.status)
            return None if status is None else DisputeObserved(status=status)
        case CheckoutSessionSnapshot():
            phase = phase_for_event_type(event.type)
            if phase is None and event.type == "checkout.session.completed":
                phase = _SESSION_PAYMENT_STATUS.get(obj.payment_status)
            return _payment(event, phase, obj.payment_intent_id, obj.amount_total, obj.currency)
        case None:
            return None
        case _:
            assert_never(obj)


def _payment(
    event: StripeEvent,
    phase: PaymentPhase | None,
    payment_intent_id: str | None,
    amount: int | None,
    currency: str | None,
) -> PaymentObserved | None:
    if phase is None:
        return None
    return PaymentObserved(
        phase=phase,
        observed_at=event.created,
        payment_intent_id=payment_intent_id,
        amount=amount,
        currency=currency,
    )
