"""The exceptions idempay raises, all under one root.

Catch :class:`IdempayError` to handle anything idempay raises. Errors that can reach an
HTTP client derive from :class:`RequestError`: they carry an HTTP ``status``, a stable
machine-readable ``code`` and render as RFC 9457 ``application/problem+json``. Their
messages never contain the offending value (a key, a body, a secret): only where and why
it was refused, so they are safe to log and to return.

The tree::

    IdempayError
    ├── ConfigurationError                 bad option or wiring (also ValueError)
    │   └── MissingDependencyError         an optional extra is not installed (also ImportError)
    ├── RequestError                       reaches HTTP: status + stable code
    │   ├── IdempotencyKeyError            400 invalid_idempotency_key
    │   │   └── MissingIdempotencyKeyError 400 missing_idempotency_key
    │   ├── RequestInFlightError           409 request_in_flight (+ Retry-After)
    │   ├── FingerprintMismatchError       422 idempotency_key_reused
    │   ├── OrderNotFoundError             404 order_not_found
    │   ├── OrderStateConflictError        409 order_state_conflict
    │   ├── PayloadError                   400 invalid_payload
    │   │   ├── MalformedJSONError         400 malformed_json
    │   │   ├── PayloadTooLargeError       413 payload_too_large
    │   │   ├── InvalidFieldError          400 invalid_field
    │   │   └── LivemodeMismatchError      400 livemode_mismatch
    │   ├── SignatureVerificationError     400 invalid_signature
    │   ├── MethodNotAllowedError          405 method_not_allowed
    │   ├── UnsupportedMediaTypeError      415 unsupported_media_type
    │   ├── PaymentProviderError           502 payment_provider_error
    │   └── ServiceUnavailableError        503 service_unavailable (+ Retry-After)
    │       └── PaymentOutcomeUnknownError 503 payment_outcome_unknown (+ Retry-After)
    ├── StoreError                         a storage backend failed
    │   ├── LeaseLostError                 our lease expired or was taken over (fencing)
    │   ├── ConcurrentUpdateError          compare-and-set lost against another writer
    │   └── TransientStoreError            retriable failure left after bounded retries
    └── LockError                          a lock provider failed (not: "lock is busy")

Grouping in Sentry and similar tools: a message is constant for its cause (it names the rule or
the field, never the value), and :attr:`IdempayError.fingerprint` is a stable tuple (the
library, the class, the ``code`` of an error that reaches HTTP and the ``reason`` of one that
has one) that a ``before_send`` hook can use as the event's fingerprint, so that one cause
makes one issue however many orders or requests it hits::

    def before_send(event, hint):
        exc_info = hint.get("exc_info")
        if exc_info and isinstance(exc_info[1], IdempayError):
            event["fingerprint"] = list(exc_info[1].fingerprint)
        return event
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Final

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "ConcurrentUpdateError",
    "ConfigurationError",
    "FingerprintMismatchError",
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
    "OrderStateConflictError",
    "PayloadError",
    "PayloadTooLargeError",
    "PaymentOutcomeUnknownError",
    "PaymentProviderError",
    "RequestError",
    "RequestInFlightError",
    "ServiceUnavailableError",
    "SignatureVerificationError",
    "StoreError",
    "TransientStoreError",
    "UnsupportedMediaTypeError",
]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
"""Media type of the body produced by :meth:`RequestError.problem_json`."""


class IdempayError(Exception):
    """Root of every exception idempay raises."""

    @property
    def fingerprint(self) -> tuple[str, ...]:
        """A stable grouping key: ``("idempay", class name, code[, reason])``.

        Equal for every occurrence of the same cause, different for different causes; made of
        class attributes and fixed identifiers only, never of the request's values. The code
        is empty for errors that do not reach HTTP.
        """
        return ("idempay", type(self).__name__, *self._grouping())

    def _grouping(self) -> tuple[str, ...]:
        return ("",)


class ConfigurationError(IdempayError, ValueError):
    """An option has an invalid value, or components were wired together wrongly."""


class MissingDependencyError(ConfigurationError, ImportError):
    """An optional dependency is missing; the message names the extra that provides it."""

    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"{module!r} is not installed; install it with: pip install 'idempay[{extra}]'"
        )


class RequestError(IdempayError):
    """A request was refused; safe to show to the client that sent it.

    Attributes:
        status: the HTTP status code to answer with.
        code: a stable, machine-readable identifier (part of the public API).
        title: a short, constant human summary of the problem type.
        detail: what exactly was wrong, without echoing the refused value.
    """

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    title: ClassVar[str] = "Bad request"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)

    def headers(self) -> dict[str, str]:
        """Extra response headers this error calls for (``Retry-After`` and the like)."""
        return {}

    def _grouping(self) -> tuple[str, ...]:
        return (self.code,)

    def to_problem(self, *, instance: str | None = None) -> dict[str, Any]:
        """Return the RFC 9457 problem document for this error."""
        problem: dict[str, Any] = {
            "type": f"urn:idempay:problem:{self.code}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }
        if instance is not None:
            problem["instance"] = instance
        problem.update(self._extra_members())
        return problem

    def problem_json(self, *, instance: str | None = None) -> bytes:
        """Return :meth:`to_problem` serialised as UTF-8 JSON bytes."""
        return json.dumps(self.to_problem(instance=instance), separators=(",", ":")).encode()

    def _extra_members(self) -> dict[str, Any]:
        return {}


class IdempotencyKeyError(RequestError):
    """The idempotency key is not acceptable (empty, too long, control or non-ASCII characters).

    The key is never truncated, normalised or merged with another key to make it fit.
    """

    status = 400
    code = "invalid_idempotency_key"
    title = "Invalid idempotency key"


class MissingIdempotencyKeyError(IdempotencyKeyError):
    """The operation requires an idempotency key and the request carries none."""

    code = "missing_idempotency_key"
    title = "Missing idempotency key"


class _RetryAfterError(RequestError):
    def __init__(self, detail: str | None = None, *, retry_after: int = 1) -> None:
        if retry_after < 0:
            raise ConfigurationError("retry_after must be zero or positive")
        self.retry_after = retry_after
        super().__init__(detail)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class RequestInFlightError(_RetryAfterError):
    """A request with the same idempotency key is still being processed.

    Retrying after ``retry_after`` seconds returns the stored response once the first
    request finishes.
    """

    status = 409
    code = "request_in_flight"
    title = "A request with this idempotency key is in progress"


class FingerprintMismatchError(RequestError):
    """The idempotency key was used before with a different request (method, route or body).

    Nothing is executed and the original response is not returned.
    """

    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused with a different request"


class OrderNotFoundError(RequestError):
    """No order with this id exists for the tenant (orders are never deleted)."""

    status = 404
    code = "order_not_found"
    title = "No such order"


class OrderStateConflictError(RequestError):
    """The order's state forbids the operation (a review decision on an order that is not
    under review, or whose refunds do not fit the decision); nothing was changed."""

    status = 409
    code = "order_state_conflict"
    title = "The order's state forbids this"


class PayloadError(RequestError):
    """The request body is not acceptable."""

    status = 400
    code = "invalid_payload"
    title = "Invalid payload"


class MalformedJSONError(PayloadError):
    """The body is not strict JSON.

    Raised for invalid UTF-8, syntax errors, trailing data, ``NaN``/``Infinity``, duplicate
    object keys and nesting deeper than the configured limit. ``reason`` is a stable short
    identifier of which rule was broken.
    """

    code = "malformed_json"
    title = "Malformed JSON"

    def __init__(self, detail: str | None = None, *, reason: str = "syntax") -> None:
        self.reason = reason
        super().__init__(detail)

    def _extra_members(self) -> dict[str, Any]:
        return {"reason": self.reason}

    def _grouping(self) -> tuple[str, ...]:
        return (self.code, self.reason)


class PayloadTooLargeError(PayloadError):
    """The body is larger than the configured limit."""

    status = 413
    code = "payload_too_large"
    title = "Payload too large"

    def __init__(self, detail: str | None = None, *, limit: int) -> None:
        self.limit = limit
        # The limit is a member of the problem document, not part of the message.
        super().__init__(detail or "the body exceeds the size limit")

    def _extra_members(self) -> dict[str, Any]:
        return {"limit": self.limit}


class InvalidFieldError(PayloadError):
    """A field is missing, has the wrong type, or has a value outside its domain.

    ``pointer`` is the RFC 6901 JSON pointer of the field (``/data/object/amount``).
    """

    code = "invalid_field"
    title = "Invalid field"

    def __init__(self, pointer: str, problem: str) -> None:
        self.pointer = pointer
        self.problem = problem
        super().__init__(f"{pointer or '/'}: {problem}")

    def _extra_members(self) -> dict[str, Any]:
        return {"pointer": self.pointer}


class LivemodeMismatchError(PayloadError):
    """A test-mode event reached a live-mode endpoint, or the reverse."""

    code = "livemode_mismatch"
    title = "Event mode does not match the endpoint"


class SignatureVerificationError(RequestError):
    """A webhook's signature header is missing, malformed, expired or matches no secret.

    ``reason`` is a stable identifier: ``missing_header``, ``malformed_header``,
    ``no_signatures``, ``too_many_signatures``, ``timestamp_outside_tolerance`` or
    ``no_match``.
    """

    status = 400
    code = "invalid_signature"
    title = "Invalid webhook signature"

    def __init__(self, detail: str | None = None, *, reason: str) -> None:
        self.reason = reason
        super().__init__(detail)

    def _extra_members(self) -> dict[str, Any]:
        return {"reason": self.reason}

    def _grouping(self) -> tuple[str, ...]:
        return (self.code, self.reason)


class MethodNotAllowedError(RequestError):
    """The endpoint does not accept this HTTP method."""

    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"

    def __init__(self, detail: str | None = None, *, allowed: tuple[str, ...] = ("POST",)) -> None:
        self.allowed = allowed
        super().__init__(detail)

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)}


class UnsupportedMediaTypeError(RequestError):
    """The request body is not of a media type the endpoint accepts."""

    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class ServiceUnavailableError(_RetryAfterError):
    """A dependency is down and the configured policy is to fail closed; retry later."""

    status = 503
    code = "service_unavailable"
    title = "Service temporarily unavailable"


class PaymentProviderError(RequestError):
    """The payment provider refused a request for a reason a retry will not cure.

    A bad API key, an invalid parameter, an idempotency key reused with other parameters: a
    configuration or programming error, never a card decline (a decline is a payment outcome).
    """

    status = 502
    code = "payment_provider_error"
    title = "Payment provider error"


class PaymentOutcomeUnknownError(ServiceUnavailableError):
    """A call to the payment provider timed out, was reset or failed with a 5xx.

    It may or may not have taken effect. It is never treated as a failure: the work stays
    recoverable, and a retry (or the reconciler) repeats the call with the *same* provider
    idempotency key, or finds its result, so that at most one charge is ever made.
    """

    code = "payment_outcome_unknown"
    title = "Payment outcome unknown; retry"


class StoreError(IdempayError):
    """A storage backend failed. Driver exceptions are wrapped into this class or a subclass."""


class LeaseLostError(StoreError):
    """The caller's lease is no longer valid: it expired and another owner may have taken over.

    The write that raised this did not happen. The caller must stop and must not report the
    operation as failed to its client: the new owner finishes it.
    """


class ConcurrentUpdateError(StoreError):
    """A compare-and-set write found a different version than expected; nothing was written."""


class TransientStoreError(StoreError):
    """A retriable database error (deadlock, serialization failure, busy) outlived its retries."""

    def __init__(self, message: str, *, attempts: int) -> None:
        self.attempts = attempts
        super().__init__(f"{message} (after {attempts} attempts)")


class LockError(IdempayError):
    """A lock provider could not be reached or answered wrongly.

    A lock that is merely held by someone else is not an error: ``acquire`` returns ``None``.
    """
