"""Stripe's test payment methods that the simulator knows, and what each one does."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Final

__all__ = ["DEBIT_TYPES", "TEST_METHODS", "Behaviour", "MethodSpec"]


class Behaviour(Enum):
    """What confirming a PaymentIntent with the method does."""

    SUCCEED = "succeed"
    """The charge succeeds at once (or is authorized, with manual capture)."""
    DECLINE = "decline"
    """The issuer declines: 402 ``card_error``, a failed charge, back to a new payment method."""
    AUTHENTICATE = "authenticate"
    """3-D Secure: ``requires_action`` until the authentication is completed or failed."""
    DEBIT = "debit"
    """A bank debit: ``processing`` until released as succeeded or failed."""


@dataclass(frozen=True, slots=True)
class MethodSpec:
    """A test payment method: its kind, its display details and its behaviour."""

    behaviour: Behaviour
    type: str = "card"
    brand: str = "visa"
    last4: str = "4242"
    code: str | None = None
    decline_code: str | None = None
    message: str | None = None

    def details(self) -> dict[str, object]:
        """The ``card`` (or bank) hash of the PaymentMethod and of its charges."""
        if self.type == "card":
            return {
                "brand": self.brand,
                "country": "US",
                "exp_month": 12,
                "exp_year": 2034,
                "funding": "credit",
                "last4": self.last4,
                "three_d_secure_usage": {"supported": True},
            }
        if self.type == "sepa_debit":
            return {"bank_code": "37040044", "country": "DE", "last4": self.last4}
        return {"account_type": "checking", "bank_name": "STRIPE TEST BANK", "last4": self.last4}


def _declined(
    last4: str, decline_code: str, message: str, code: str = "card_declined"
) -> MethodSpec:
    return MethodSpec(
        Behaviour.DECLINE, last4=last4, code=code, decline_code=decline_code, message=message
    )


_GENERIC = "Your card was declined."
_SECURE = MethodSpec(Behaviour.AUTHENTICATE, last4="3220")

TEST_METHODS: Final = MappingProxyType(
    {
        "pm_card_visa": MethodSpec(Behaviour.SUCCEED),
        "pm_card_visa_debit": MethodSpec(Behaviour.SUCCEED, last4="5556"),
        "pm_card_mastercard": MethodSpec(Behaviour.SUCCEED, brand="mastercard", last4="4444"),
        "pm_card_amex": MethodSpec(Behaviour.SUCCEED, brand="amex", last4="8431"),
        "pm_card_chargeDeclined": _declined("0002", "generic_decline", _GENERIC),
        "pm_card_visa_chargeDeclined": _declined("0002", "generic_decline", _GENERIC),
        "pm_card_chargeCustomerFail": _declined("0341", "generic_decline", _GENERIC),
        "pm_card_chargeDeclinedInsufficientFunds": _declined(
            "9995", "insufficient_funds", "Your card has insufficient funds."
        ),
        "pm_card_visa_chargeDeclinedInsufficientFunds": _declined(
            "9995", "insufficient_funds", "Your card has insufficient funds."
        ),
        "pm_card_chargeDeclinedExpiredCard": _declined(
            "0069", "expired_card", "Your card has expired.", code="expired_card"
        ),
        "pm_card_threeDSecure2Required": _SECURE,
        "pm_card_threeDSecureRequired": MethodSpec(Behaviour.AUTHENTICATE, last4="3063"),
        "pm_card_authenticationRequired": MethodSpec(Behaviour.AUTHENTICATE, last4="3184"),
        "pm_sepa_debit": MethodSpec(Behaviour.DEBIT, type="sepa_debit", last4="3000"),
        "pm_usBankAccount": MethodSpec(Behaviour.DEBIT, type="us_bank_account", last4="6789"),
    }
)
"""Test payment-method ids accepted in ``payment_method``, by behaviour."""

DEBIT_TYPES: Final = MappingProxyType(
    {
        "sepa_debit": TEST_METHODS["pm_sepa_debit"],
        "us_bank_account": TEST_METHODS["pm_usBankAccount"],
    }
)
"""``payment_method_data[type]`` values that make a bank-debit payment method."""
