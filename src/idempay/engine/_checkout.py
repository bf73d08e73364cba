"""What a checkout handler receives and returns (shared by the sync and async engines)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from idempay.core.strictjson import CURRENCIES, JSONValue, ObjectReader
from idempay.engine._http import GuardRequest
from idempay.errors import ConfigurationError

__all__ = ["CheckoutRequest", "OrderSpec", "RecoveryPoint", "stripe_idempotency_key"]

_MAX_STRIPE_KEY: Final = 255


class RecoveryPoint:
    """The durable steps of a checkout, recorded on its idempotency record."""

    ORDER_CREATED: Final = "order_created"
    INTENT_CREATED: Final = "intent_created"


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    """What a checkout handler receives: the strictly parsed body and who is asking.

    ``fields`` reads the body with exact types (``fields.integer("quantity", minimum=1)``);
    ``tenant`` and ``user`` are the request's scope. Client-supplied statuses or timestamps in
    the body are never used by idempay for any decision.
    """

    body: Mapping[str, JSONValue]
    fields: ObjectReader
    tenant: str
    user: str
    request: GuardRequest


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderSpec:
    """The order a checkout handler decides on; idempay creates it and its PaymentIntent.

    ``order_id`` identifies the order for good: every checkout naming it, whatever its
    idempotency key, reaches the same order and the same PaymentIntent. With
    ``payment_method`` the payment is confirmed server-side; without, the customer's browser
    confirms it with the returned ``client_secret``.
    """

    order_id: str
    amount: int
    currency: str
    payment_method: str | None = None
    capture_method: str = "automatic"
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        order_id: object = self.order_id
        if (
            not isinstance(order_id, str)
            or not 1 <= len(order_id) <= 255
            or not all("\x21" <= ch <= "\x7e" for ch in order_id)
        ):
            raise ConfigurationError("order_id must be 1 to 255 printable ASCII characters")
        amount: object = self.amount
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ConfigurationError("amount must be a positive integer (minor units)")
        if self.currency not in CURRENCIES:
            raise ConfigurationError("currency must be a lowercase ISO 4217 code")
        if self.capture_method not in ("automatic", "manual"):
            raise ConfigurationError("capture_method is automatic or manual")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))


def stripe_idempotency_key(tenant: str, order_id: str, phase: str) -> str:
    """The Stripe idempotency key of one phase of one order: the same on every retry.

    Derived from the order, never random, so that a retry in another process, days later,
    still reaches the same PaymentIntent; readable when it fits Stripe's 255 characters, so
    that a webhook can be traced back to its order by the key Stripe echoes in the event.
    """
    readable = f"idempay:{len(tenant)}:{tenant}:{order_id}:{phase}"
    if len(readable) <= _MAX_STRIPE_KEY:
        return readable
    digest = hashlib.sha256(f"{len(tenant)}:{tenant}:{order_id}".encode()).hexdigest()
    return f"idempay:h:{digest}:{phase}"


def order_of_stripe_key(key: str | None) -> tuple[str, str] | None:
    """The (tenant, order_id) a readable :func:`stripe_idempotency_key` names, else None.

    Stripe echoes the idempotency key of the request that caused an event in the event's
    ``request.idempotency_key``: this traces such an event back to its order when the
    PaymentIntent id is not recorded yet and its metadata is missing. Hashed keys (very long
    ids) and keys made by anything else give None.
    """
    if key is None or not key.startswith("idempay:"):
        return None
    length, sep, rest = key[len("idempay:") :].partition(":")
    if not sep or not length.isdigit() or length != str(int(length)):
        return None
    size = int(length)
    tenant, rest = rest[:size], rest[size:]
    if len(tenant) != size or not rest.startswith(":"):
        return None
    order_id, sep, phase = rest[1:].rpartition(":")
    if not sep or not order_id or not phase:
        return None
    return tenant, order_id
