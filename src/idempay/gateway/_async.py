"""The Stripe gateway (async source; the sync twin is generated): the calls idempay makes.

Every call goes through the official ``stripe`` library. Errors become idempay's, sorted by
what they mean for the money:

- a decline (``CardError``) is an *outcome*: the PaymentIntent exists, and is returned with its
  ``last_payment_error_code``;
- a timeout, a reset connection, a 5xx or a 429 is an *unknown outcome*
  (:class:`~idempay.errors.PaymentOutcomeUnknownError`): the call may have taken effect, so it is
  never treated as a failure; repeating it with the same idempotency key is safe;
- anything else (bad key, bad parameter, key reused with other parameters) is a
  :class:`~idempay.errors.PaymentProviderError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from idempay._lazy import require
from idempay.core.events import PaymentIntentSnapshot, read_payment_intent
from idempay.errors import ConfigurationError, PaymentOutcomeUnknownError, PaymentProviderError

if TYPE_CHECKING:
    import stripe
else:
    stripe = require("stripe", extra="stripe")

__all__ = ["AsyncStripeGateway"]

logger = logging.getLogger(__name__)

_UNKNOWN = (
    "APIConnectionError",  # timeouts and resets
    "APIError",  # 5xx
    "RateLimitError",  # 429: not executed, but retrying with the same key is the cure
)


def _snapshot(obj: Any) -> PaymentIntentSnapshot:
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return read_payment_intent(data)


def _raw(obj: Any) -> bytes:
    # An event fetched from the API has no signed body: its JSON is rebuilt from the object.
    return json.dumps(obj.to_dict(), separators=(",", ":"), default=str).encode()


def _translate(error: Exception) -> Exception:
    logger.debug("stripe call failed", exc_info=error)
    name = type(error).__name__
    if name in _UNKNOWN:
        return PaymentOutcomeUnknownError(
            "the payment provider did not answer clearly; retry with the same idempotency key",
            retry_after=2,
        )
    status = getattr(error, "http_status", None)
    if isinstance(status, int) and status >= 500:
        return PaymentOutcomeUnknownError("the payment provider failed; retry", retry_after=2)
    return PaymentProviderError(f"the payment provider refused the request ({name})")


class AsyncStripeGateway:
    """The Stripe calls of the checkout flow and the reconciler, with idempay's error model.

    Args:
        client: a ``stripe.StripeClient``. Give it an HTTP client with a bounded timeout and
            ``max_network_retries=0`` or a small number: idempay repeats calls itself, always
            with the same idempotency key (:meth:`from_settings` does this).
    """

    def __init__(self, client: stripe.StripeClient) -> None:
        self.client = client
        self._owned_http: Any = None

    @classmethod
    def from_settings(
        cls,
        api_key: str,
        *,
        api_base: str | None = None,
        timeout: float = 20.0,
        max_network_retries: int = 0,
    ) -> AsyncStripeGateway:
        """A gateway with a client of bounded timeout; ``api_base`` points it at a simulator."""
        if not api_key:
            raise ConfigurationError("a Stripe API key is needed")
        http_client = stripe.HTTPXClient(timeout=timeout, allow_sync_methods=True)
        client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=max_network_retries,
            http_client=http_client,
        )
        gateway = cls(client)
        gateway._owned_http = http_client
        return gateway

    async def aclose(self) -> None:
        """Close the HTTP client :meth:`from_settings` made (not one you passed in)."""
        if self._owned_http is not None:
            await self._owned_http.close_async()  # unasync: remove
            # self._owned_http.close()  # unasync: sync-only
            self._owned_http = None

    async def create_payment_intent(
        self,
        *,
        amount: int,
        currency: str,
        metadata: Mapping[str, str],
        idempotency_key: str,
        payment_method: str | None = None,
        capture_method: str = "automatic",
    ) -> PaymentIntentSnapshot:
        """Create a PaymentIntent (not confirmed: see :meth:`confirm_payment_intent`).

        Creating first and confirming apart means the PaymentIntent's id is known, and can be
        stored, before any money moves.

        Raises:
            PaymentOutcomeUnknownError: timeout, reset, 5xx or 429: repeat with the same key.
            PaymentProviderError: any other refusal.
        """
        params: dict[str, Any] = {
            "amount": amount,
            "currency": currency,
            "metadata": dict(metadata),
            "capture_method": capture_method,
        }
        if payment_method is not None:
            params["payment_method"] = payment_method
        try:
            intent = await self.client.v1.payment_intents.create_async(
                params=params,  # type: ignore[arg-type]
                options={"idempotency_key": idempotency_key},
            )
        except stripe.StripeError as error:
            raise _translate(error) from error
        return _snapshot(intent)

    async def confirm_payment_intent(
        self, intent_id: str, *, idempotency_key: str
    ) -> PaymentIntentSnapshot:
        """Confirm a PaymentIntent that has its payment method.

        A declined card is an outcome, not an error: the PaymentIntent comes back in
        ``requires_payment_method`` with its ``last_payment_error_code``.

        Raises:
            PaymentOutcomeUnknownError: timeout, reset, 5xx or 429: repeat with the same key.
            PaymentProviderError: any other refusal.
        """
        try:
            intent = await self.client.v1.payment_intents.confirm_async(
                intent_id, options={"idempotency_key": idempotency_key}
            )
        except stripe.CardError:
            return await self.retrieve_payment_intent(intent_id)
        except stripe.StripeError as error:
            raise _translate(error) from error
        return _snapshot(intent)

    async def cancel_payment_intent(
        self, intent_id: str, *, idempotency_key: str
    ) -> PaymentIntentSnapshot:
        """Cancel a PaymentIntent that has not succeeded, so that it can no longer be paid.

        Raises:
            PaymentOutcomeUnknownError: timeout, reset, 5xx or 429: repeat with the same key.
            PaymentProviderError: Stripe refused (it succeeded, or a bank debit is processing).
        """
        try:
            intent = await self.client.v1.payment_intents.cancel_async(
                intent_id, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as error:
            raise _translate(error) from error
        return _snapshot(intent)

    async def retrieve_payment_intent(self, intent_id: str) -> PaymentIntentSnapshot:
        """The PaymentIntent as Stripe has it now."""
        try:
            intent = await self.client.v1.payment_intents.retrieve_async(intent_id)
        except stripe.StripeError as error:
            raise _translate(error) from error
        return _snapshot(intent)

    async def find_payment_intents(
        self,
        *,
        order_id: str,
        metadata_key: str = "order_id",
        max_pages: int = 20,
    ) -> list[PaymentIntentSnapshot]:
        """The PaymentIntents whose metadata names ``order_id``, newest first.

        For an intent whose id was never stored (a crash after the call, an unknown outcome
        older than Stripe's 24-hour idempotency window). Uses Stripe's search where the server
        has it (its index lags a little: a miss is made safe by the creation key, derived from
        the order), else walks the list of recent PaymentIntents, ``max_pages`` of 100 at most.
        """
        query = f"metadata['{metadata_key}']:'{order_id}'"
        try:
            found = await self.client.v1.payment_intents.search_async(
                params={"query": query, "limit": 100}
            )
            return [_snapshot(pi) for pi in found.data]
        except stripe.InvalidRequestError:
            pass  # no search on this server (a simulator): walk the list instead
        except stripe.StripeError as error:
            raise _translate(error) from error
        matches: list[PaymentIntentSnapshot] = []
        params: dict[str, Any] = {"limit": 100}
        for _page in range(max_pages):
            try:
                page = await self.client.v1.payment_intents.list_async(params=params)  # type: ignore[arg-type]
            except stripe.StripeError as error:
                raise _translate(error) from error
            for intent in page.data:
                snapshot = _snapshot(intent)
                if snapshot.metadata.get(metadata_key) == order_id:
                    matches.append(snapshot)
            if not page.has_more or not page.data:
                break
            params["starting_after"] = page.data[-1].id
        return matches

    async def retrieve_event(self, event_id: str) -> bytes:
        """The event as Stripe's API has it now, as JSON (see :func:`idempay.parse_event`).

        Raises:
            PaymentProviderError: no such event (Stripe keeps events for 30 days).
        """
        try:
            event = await self.client.v1.events.retrieve_async(event_id)
        except stripe.StripeError as error:
            raise _translate(error) from error
        return _raw(event)

    async def list_undelivered_events(
        self,
        *,
        types: Sequence[str],
        created_after: int | None = None,
        max_pages: int = 10,
    ) -> list[bytes]:
        """Events of ``types`` that some webhook endpoint has not acknowledged yet
        (``delivery_success=false``: still being retried, or given up on), newest first,
        as JSON; at most ``max_pages`` pages of 100.

        ``created_after`` (unix seconds) bounds how far back to look. Stripe lists events of
        the last 30 days and accepts up to 20 ``types``.
        """
        params: dict[str, Any] = {"delivery_success": False, "limit": 100}
        if types:
            params["types"] = list(types)
        if created_after is not None:
            params["created"] = {"gt": created_after}
        found: list[bytes] = []
        for _page in range(max_pages):
            try:
                page = await self.client.v1.events.list_async(params=params)  # type: ignore[arg-type]
            except stripe.StripeError as error:
                raise _translate(error) from error
            found.extend(_raw(event) for event in page.data)
            if not page.has_more or not page.data:
                break
            params["starting_after"] = page.data[-1].id
        return found
