"""The records of the simulated account, and how each renders as Stripe's JSON.

Records are mutable and live under the account's lock; ``render()`` returns a fresh dict every
time, so a rendered object never changes after it was answered or put in an event.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from idempay.testing.simulator._methods import MethodSpec

__all__ = ["JSON", "Charge", "PaymentIntent", "PaymentMethod", "Refund", "billing_details"]

JSON = dict[str, Any]


@dataclass(slots=True)
class PaymentMethod:
    """A PaymentMethod made from a test id: its behaviour is its spec's."""

    id: str
    spec: MethodSpec
    created: int

    def render(self) -> JSON:
        """The object as the API answers it."""
        return {
            "id": self.id,
            "object": "payment_method",
            "billing_details": billing_details(),
            "created": self.created,
            "customer": None,
            "livemode": False,
            "metadata": {},
            "type": self.spec.type,
            self.spec.type: self.spec.details(),
        }


@dataclass(slots=True)
class Charge:
    """One payment attempt of a PaymentIntent; ``amount_refunded`` is cumulative."""

    id: str
    amount: int
    currency: str
    payment_intent: str
    payment_method: PaymentMethod
    created: int
    status: str
    captured: bool = False
    amount_captured: int = 0
    amount_refunded: int = 0
    failure_code: str | None = None
    failure_message: str | None = None
    outcome: JSON | None = None
    description: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def render(self) -> JSON:
        """The object as the API answers it."""
        return {
            "id": self.id,
            "object": "charge",
            "amount": self.amount,
            "amount_captured": self.amount_captured,
            "amount_refunded": self.amount_refunded,
            "balance_transaction": None,
            "billing_details": billing_details(),
            "captured": self.captured,
            "created": self.created,
            "currency": self.currency,
            "customer": None,
            "description": self.description,
            "disputed": False,
            "failure_code": self.failure_code,
            "failure_message": self.failure_message,
            "livemode": False,
            "metadata": dict(self.metadata),
            "outcome": None if self.outcome is None else dict(self.outcome),
            "paid": self.status == "succeeded",
            "payment_intent": self.payment_intent,
            "payment_method": self.payment_method.id,
            "payment_method_details": {
                "type": self.payment_method.spec.type,
                self.payment_method.spec.type: self.payment_method.spec.details(),
            },
            "receipt_url": None,
            "refunded": self.amount_refunded >= self.amount,
            "status": self.status,
        }


@dataclass(slots=True)
class Refund:
    """A refund, settled at once."""

    id: str
    amount: int
    charge: str
    payment_intent: str
    currency: str
    created: int
    reason: str | None
    metadata: dict[str, str]

    def render(self) -> JSON:
        """The object as the API answers it."""
        return {
            "id": self.id,
            "object": "refund",
            "amount": self.amount,
            "balance_transaction": None,
            "charge": self.charge,
            "created": self.created,
            "currency": self.currency,
            "metadata": dict(self.metadata),
            "payment_intent": self.payment_intent,
            "reason": self.reason,
            "status": "succeeded",
        }


@dataclass(slots=True)
class PaymentIntent:
    """A PaymentIntent, its status and its latest attempt."""

    id: str
    amount: int
    currency: str
    created: int
    capture_method: str
    payment_method_types: list[str]
    automatic_payment_methods: bool
    metadata: dict[str, str]
    client_secret: str
    status: str = "requires_payment_method"
    payment_method: PaymentMethod | None = None
    description: str | None = None
    receipt_email: str | None = None
    customer: str | None = None
    return_url: str | None = None
    latest_charge: Charge | None = None
    last_payment_error: JSON | None = None
    next_action: JSON | None = None
    amount_received: int = 0
    amount_capturable: int = 0
    canceled_at: int | None = None
    cancellation_reason: str | None = None

    def render(self) -> JSON:
        """The object as the API answers it."""
        return {
            "id": self.id,
            "object": "payment_intent",
            "amount": self.amount,
            "amount_capturable": self.amount_capturable,
            "amount_details": {"tip": {}},
            "amount_received": self.amount_received,
            "application": None,
            "application_fee_amount": None,
            "automatic_payment_methods": (
                {"allow_redirects": "always", "enabled": True}
                if self.automatic_payment_methods
                else None
            ),
            "canceled_at": self.canceled_at,
            "cancellation_reason": self.cancellation_reason,
            "capture_method": self.capture_method,
            "client_secret": self.client_secret,
            "confirmation_method": "automatic",
            "created": self.created,
            "currency": self.currency,
            "customer": self.customer,
            "description": self.description,
            "last_payment_error": copy.deepcopy(self.last_payment_error),
            "latest_charge": None if self.latest_charge is None else self.latest_charge.id,
            "livemode": False,
            "metadata": dict(self.metadata),
            "next_action": copy.deepcopy(self.next_action),
            "on_behalf_of": None,
            "payment_method": None if self.payment_method is None else self.payment_method.id,
            "payment_method_options": {},
            "payment_method_types": list(self.payment_method_types),
            "processing": None,
            "receipt_email": self.receipt_email,
            "review": None,
            "setup_future_usage": None,
            "shipping": None,
            "statement_descriptor": None,
            "statement_descriptor_suffix": None,
            "status": self.status,
            "transfer_data": None,
            "transfer_group": None,
        }


def billing_details() -> JSON:
    """Empty billing details: the test payment methods carry none."""
    return {"address": None, "email": None, "name": None, "phone": None}
