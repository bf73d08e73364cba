"""idempay: payment-safety middleware for Python.

Idempotent checkout, exactly-once Stripe webhook effects and an audited order state machine,
with guarantees that rest on the database, never on a lock. ``import idempay`` imports only the
standard library and ``typing_extensions``; drivers and frameworks load when first used.
"""

from __future__ import annotations

from idempay.clock import Clock, FrozenClock, SystemClock
from idempay.core.audit import AuditSource, AuditStep, verify_trail
from idempay.core.events import StripeEvent, parse_event
from idempay.core.keys import Scope, key_digest, parse_key_header, request_fingerprint
from idempay.core.observe import observation_from_event, observation_from_intent
from idempay.core.orders import OrderState, OrderStatus, Transition, apply, new_order
from idempay.core.records import RecordState, StoredResponse
from idempay.core.signature import sign_payload, verify_signature
from idempay.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    FingerprintMismatchError,
    IdempayError,
    IdempotencyKeyError,
    InvalidFieldError,
    LeaseLostError,
    LivemodeMismatchError,
    LockError,
    MalformedJSONError,
    MethodNotAllowedError,
    MissingDependencyError,
    MissingIdempotencyKeyError,
    OrderNotFoundError,
    OrderStateConflictError,
    PayloadError,
    PayloadTooLargeError,
    PaymentOutcomeUnknownError,
    PaymentProviderError,
    RequestError,
    RequestInFlightError,
    ServiceUnavailableError,
    SignatureVerificationError,
    StoreError,
    TransientStoreError,
    UnsupportedMediaTypeError,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "AuditSource",
    "AuditStep",
    "Clock",
    "ConcurrentUpdateError",
    "ConfigurationError",
    "FingerprintMismatchError",
    "FrozenClock",
    "IdempayError",
    "IdempotencyKeyError",
    "InvalidFieldError",
    "LeaseLostError",
    "LivemodeMismatchError",
    "LockError",
    "MalformedJSONError",
    "MethodNotAllowedError",
    "MissingDependencyError",
    "MissingIdempotencyKeyError",
    "OrderNotFoundError",
    "OrderState",
    "OrderStateConflictError",
    "OrderStatus",
    "PayloadError",
    "PayloadTooLargeError",
    "PaymentOutcomeUnknownError",
    "PaymentProviderError",
    "RecordState",
    "RequestError",
    "RequestInFlightError",
    "Scope",
    "ServiceUnavailableError",
    "SignatureVerificationError",
    "StoreError",
    "StoredResponse",
    "StripeEvent",
    "SystemClock",
    "TransientStoreError",
    "Transition",
    "UnsupportedMediaTypeError",
    "__version__",
    "apply",
    "key_digest",
    "new_order",
    "observation_from_event",
    "observation_from_intent",
    "parse_event",
    "parse_key_header",
    "request_fingerprint",
    "sign_payload",
    "verify_signature",
    "verify_trail",
]
