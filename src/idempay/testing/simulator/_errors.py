"""Errors the simulator answers with, in Stripe's shape: ``{"error": {"type", "code", ...}}``."""

from __future__ import annotations

from typing import Any

__all__ = ["StripeAPIError", "invalid", "missing", "not_found"]


class StripeAPIError(Exception):
    """An error response, rendered as Stripe renders it.

    ``stored`` says whether the idempotency layer saves this response for the key: Stripe saves
    what an endpoint answers once it began executing (a decline, a state conflict), but not a
    request refused by parameter validation, which may simply be retried.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # Stripe's field name
        code: str | None = None,
        param: str | None = None,
        decline_code: str | None = None,
        stored: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.decline_code = decline_code
        self.stored = stored
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}`` with only the fields that have a value."""
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.code is not None:
            error["code"] = self.code
            error["doc_url"] = f"https://stripe.com/docs/error-codes/{self.code.replace('_', '-')}"
        if self.param is not None:
            error["param"] = self.param
        if self.decline_code is not None:
            error["decline_code"] = self.decline_code
        error.update(self.extra)
        return {"error": error}


def invalid(message: str, *, param: str | None = None, code: str | None = None) -> StripeAPIError:
    """A parameter refused before the endpoint runs (400, not stored under the key)."""
    return StripeAPIError(400, message, param=param, code=code, stored=False)


def missing(param: str) -> StripeAPIError:
    """A required parameter absent (400 ``parameter_missing``)."""
    return invalid(f"Missing required param: {param}.", param=param, code="parameter_missing")


def not_found(kind: str, object_id: str, *, param: str = "id") -> StripeAPIError:
    """An object that does not exist (404 ``resource_missing``)."""
    return StripeAPIError(
        404,
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param=param,
        stored=False,
    )
