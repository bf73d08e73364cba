"""The simulated Stripe account: PaymentIntents, Charges, Refunds, PaymentMethods and Events.

Every method takes the account's lock for its whole duration, so each API call is atomic: its
objects change and its events are created together, in one order that every reader sees.
Objects are kept as records (``_objects``) and rendered into fresh JSON-ready dicts on every
read, so a rendered object (an API response, an event's ``data.object``) is a snapshot that
later changes never touch.
"""

from __future__ import annotations

import copy
import secrets
import string
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from idempay.core.strictjson import CURRENCIES
from idempay.testing.simulator._clock import SimClock
from idempay.testing.simulator._errors import StripeAPIError, invalid, missing, not_found
from idempay.testing.simulator._forms import Params
from idempay.testing.simulator._methods import DEBIT_TYPES, TEST_METHODS, Behaviour, MethodSpec
from idempay.testing.simulator._objects import (
    JSON,
    Charge,
    PaymentIntent,
    PaymentMethod,
    Refund,
)
from idempay.testing.simulator._queries import (
    created_filter,
    page,
    page_size,
    search_predicate,
    type_matcher,
)

__all__ = ["JSON", "Account", "EventRecord", "RequestContext", "new_id"]


_ALPHABET: Final = string.ascii_letters + string.digits
_MAX_AMOUNT: Final = 99_999_999
_CANCELABLE: Final = frozenset(
    {"requires_payment_method", "requires_capture", "requires_confirmation", "requires_action"}
)
_CONFIRMABLE: Final = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action"}
)
_CAPTURE_METHODS: Final = ("automatic", "automatic_async", "manual")
_CANCELLATION_REASONS: Final = (
    "abandoned",
    "duplicate",
    "fraudulent",
    "requested_by_customer",
)
_REFUND_REASONS: Final = ("duplicate", "fraudulent", "requested_by_customer")


def new_id(prefix: str, length: int = 24) -> str:
    """A fresh object id, ``prefix`` then random letters and digits (never seeded: ids from
    two simulators, or two runs, never collide in a shared database)."""
    number = int.from_bytes(secrets.token_bytes(length))  # one read of the OS's randomness
    digits = []
    for _ in range(length):
        number, digit = divmod(number, len(_ALPHABET))
        digits.append(_ALPHABET[digit])
    return prefix + "".join(digits)


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The API request being executed, echoed in the ``request`` of the events it causes."""

    now: float
    request_id: str | None = None
    idempotency_key: str | None = None


@dataclass(slots=True)
class EventRecord:
    """An event: its rendering, and how many endpoints have yet to acknowledge it."""

    id: str
    type: str
    created: int
    data: JSON
    request: JSON
    api_version: str
    pending_webhooks: int

    def render(self) -> JSON:
        """The event object, as the API and the webhook bodies show it."""
        return {
            "id": self.id,
            "object": "event",
            "api_version": self.api_version,
            "created": self.created,
            "data": copy.deepcopy(self.data),  # a snapshot: no caller can change the record
            "livemode": False,
            "pending_webhooks": self.pending_webhooks,
            "request": dict(self.request),
            "type": self.type,
        }


class Account:
    """One simulated Stripe account (test mode). Thread-safe.

    Args:
        clock: the simulated time.
        api_version: the version events are rendered with.
        publish: called, under the account's lock, with each new event; returns how many
            webhook endpoints will receive it (the event's ``pending_webhooks``).
    """

    def __init__(
        self,
        clock: SimClock,
        *,
        api_version: str,
        publish: Callable[[EventRecord], int],
    ) -> None:
        self.clock = clock
        self.api_version = api_version
        self.base_url = ""
        self._publish = publish
        self._lock = threading.RLock()
        self._intents: dict[str, PaymentIntent] = {}
        self._charges: dict[str, Charge] = {}
        self._refunds: dict[str, Refund] = {}
        self._methods: dict[str, PaymentMethod] = {}
        self._events: dict[str, EventRecord] = {}

    # -- bookkeeping ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every object and event."""
        with self._lock:
            for table in (self._intents, self._charges, self._refunds, self._methods):
                table.clear()
            self._events.clear()

    def counts(self) -> dict[str, int]:
        """How many objects of each kind exist."""
        with self._lock:
            return {
                "payment_intents": len(self._intents),
                "charges": len(self._charges),
                "refunds": len(self._refunds),
                "events": len(self._events),
            }

    def acknowledged(self, event_id: str) -> None:
        """An endpoint acknowledged ``event_id`` (2xx): one webhook fewer pending."""
        with self._lock:
            event = self._events.get(event_id)
            if event is not None and event.pending_webhooks > 0:
                event.pending_webhooks -= 1

    def snapshot(self, kind: str) -> list[JSON]:
        """Every object of ``kind`` (``payment_intents``, ``charges``, ``refunds``,
        ``events``), oldest first, rendered now. For tests and the demo's summary."""
        with self._lock:
            tables: dict[str, Iterable[Any]] = {
                "payment_intents": self._intents.values(),
                "charges": self._charges.values(),
                "refunds": self._refunds.values(),
                "events": self._events.values(),
            }
            return [record.render() for record in tables[kind]]

    def _emit(self, ctx: RequestContext, event_type: str, obj: JSON) -> None:
        event = EventRecord(
            id=new_id("evt_"),
            type=event_type,
            created=int(ctx.now),
            data={"object": obj},
            request={"id": ctx.request_id, "idempotency_key": ctx.idempotency_key},
            api_version=self.api_version,
            pending_webhooks=0,
        )
        self._events[event.id] = event
        event.pending_webhooks = self._publish(event)

    # -- PaymentMethods ------------------------------------------------------------------

    def _method(self, params: Params, ctx: RequestContext) -> PaymentMethod | None:
        data = params.mapping("payment_method_data")
        pm_id = params.string("payment_method")
        if data is not None:
            kind = data.get("type")
            spec = DEBIT_TYPES.get(kind) if isinstance(kind, str) else None
            if spec is None:
                raise invalid(
                    "payment_method_data[type] must be sepa_debit or us_bank_account here; "
                    "use a test payment method id (pm_card_visa, ...) for cards.",
                    param="payment_method_data[type]",
                )
            return self._new_method(spec, ctx)
        if pm_id is None:
            return None
        existing = self._methods.get(pm_id)
        if existing is not None:
            return existing
        spec = TEST_METHODS.get(pm_id)
        if spec is None:
            raise StripeAPIError(
                400,
                f"No such PaymentMethod: '{pm_id}'",
                code="resource_missing",
                param="payment_method",
                stored=False,
            )
        # Stripe turns a test id into a new PaymentMethod object each time it is used.
        return self._new_method(spec, ctx)

    def _new_method(self, spec: MethodSpec, ctx: RequestContext) -> PaymentMethod:
        method = PaymentMethod(new_id("pm_"), spec, int(ctx.now))
        self._methods[method.id] = method
        return method

    def retrieve_payment_method(self, pm_id: str, params: Params) -> JSON:
        """GET /v1/payment_methods/{id}."""
        with self._lock:
            params.refuse_unknown()
            method = self._methods.get(pm_id)
            if method is None:
                raise not_found("PaymentMethod", pm_id)
            return method.render()

    # -- PaymentIntents ------------------------------------------------------------------

    def _intent(self, pi_id: str) -> PaymentIntent:
        intent = self._intents.get(pi_id)
        if intent is None:
            raise not_found("payment_intent", pi_id, param="intent")
        return intent

    def create_payment_intent(self, params: Params, ctx: RequestContext) -> JSON:
        """POST /v1/payment_intents."""
        with self._lock:
            amount = _amount(params)
            currency = _currency(params)
            if amount is None:
                raise missing("amount")
            if currency is None:
                raise missing("currency")
            capture_method = params.choice("capture_method", _CAPTURE_METHODS)
            automatic = params.mapping("automatic_payment_methods")
            types = params.strings("payment_method_types")
            metadata = params.metadata() or {}
            confirm = params.boolean("confirm") or False
            method = self._method(params, ctx)
            params.accept(
                "confirmation_method",
                "off_session",
                "payment_method_options",
                "setup_future_usage",
                "statement_descriptor",
                "statement_descriptor_suffix",
                "shipping",
                "use_stripe_sdk",
                "error_on_requires_action",
                "mandate_data",
                "mandate",
                "radar_options",
                "transfer_group",
            )
            description = params.string("description")
            receipt_email = params.string("receipt_email")
            customer = params.string("customer")
            return_url = params.string("return_url")
            expand = params.expand()
            params.refuse_unknown()
            intent_id = new_id("pi_")
            intent = PaymentIntent(
                id=intent_id,
                amount=amount,
                currency=currency,
                created=int(ctx.now),
                capture_method=capture_method or "automatic_async",
                payment_method_types=types or ["card"],
                automatic_payment_methods=automatic is not None
                and automatic.get("enabled") == "true",
                metadata=metadata,
                client_secret=f"{intent_id}_secret_{new_id('', 25)}",
                description=description,
                receipt_email=receipt_email,
                customer=customer,
                return_url=return_url,
            )
            if method is not None:
                intent.payment_method = method
                intent.status = "requires_confirmation"
            self._intents[intent.id] = intent
            self._emit(ctx, "payment_intent.created", intent.render())
            if confirm:
                self._confirm(intent, params, ctx)
            return self._render_intent(intent, expand)

    def update_payment_intent(self, pi_id: str, params: Params, ctx: RequestContext) -> JSON:
        """POST /v1/payment_intents/{id}: amount, currency, metadata, payment method."""
        with self._lock:
            intent = self._intent(pi_id)
            amount = _amount(params)
            currency = _currency(params)
            metadata = params.metadata()
            method = self._method(params, ctx)
            description = params.string("description")
            receipt_email = params.string("receipt_email")
            expand = params.expand()
            params.refuse_unknown()
            if intent.status not in _CONFIRMABLE:
                raise _unexpected_state(intent, "update")
            if amount is not None:
                intent.amount = amount
            if currency is not None:
                intent.currency = currency
            if metadata is not None:
                intent.metadata.update(metadata)
            if description is not None:
                intent.description = description
            if receipt_email is not None:
                intent.receipt_email = receipt_email
            if method is not None:
                intent.payment_method = method
                intent.status = "requires_confirmation"
                intent.next_action = None
            return self._render_intent(intent, expand)

    def confirm_payment_intent(self, pi_id: str, params: Params, ctx: RequestContext) -> JSON:
        """POST /v1/payment_intents/{id}/confirm."""
        with self._lock:
            intent = self._intent(pi_id)
            method = self._method(params, ctx)
            return_url = params.string("return_url")
            params.accept(
                "off_session",
                "payment_method_options",
                "setup_future_usage",
                "receipt_email",
                "use_stripe_sdk",
                "error_on_requires_action",
                "mandate_data",
                "mandate",
                "radar_options",
                "shipping",
                "capture_method",
                "client_secret",
            )
            expand = params.expand()
            params.refuse_unknown()
            if intent.status not in _CONFIRMABLE:
                raise _unexpected_state(intent, "confirm")
            if method is not None:
                intent.payment_method = method
            if return_url is not None:
                intent.return_url = return_url
            self._confirm(intent, params, ctx)
            return self._render_intent(intent, expand)

    def _confirm(self, intent: PaymentIntent, params: Params, ctx: RequestContext) -> None:
        method = intent.payment_method
        if method is None:
            raise StripeAPIError(
                400,
                "You cannot confirm this PaymentIntent because it has no payment method: "
                "give payment_method or payment_method_data.",
                code="payment_intent_unexpected_state",
                param="payment_method",
                extra={"payment_intent": intent.render()},
            )
        intent.last_payment_error = None
        intent.next_action = None
        match method.spec.behaviour:
            case Behaviour.SUCCEED:
                self._charge_succeeds(intent, method, ctx)
            case Behaviour.DECLINE:
                self._charge_declined(intent, method, ctx)
            case Behaviour.AUTHENTICATE if params.boolean("off_session"):
                # Off session, nobody is there to authenticate: Stripe declines instead.
                self._charge_declined(
                    intent,
                    method,
                    ctx,
                    code="authentication_required",
                    decline_code="authentication_required",
                    message="Your card was declined. This transaction requires authentication.",
                )
            case Behaviour.AUTHENTICATE:
                self._requires_action(intent, ctx)
            case Behaviour.DEBIT:
                self._debit_processing(intent, method, ctx)

    def _new_charge(
        self, intent: PaymentIntent, method: PaymentMethod, ctx: RequestContext, *, status: str
    ) -> Charge:
        charge = Charge(
            id=new_id("ch_"),
            amount=intent.amount,
            currency=intent.currency,
            payment_intent=intent.id,
            payment_method=method,
            created=int(ctx.now),
            status=status,
            description=intent.description,
            metadata=dict(intent.metadata),
        )
        self._charges[charge.id] = charge
        intent.latest_charge = charge
        return charge

    def _charge_succeeds(
        self, intent: PaymentIntent, method: PaymentMethod, ctx: RequestContext
    ) -> None:
        charge = self._new_charge(intent, method, ctx, status="succeeded")
        charge.outcome = _approved()
        if intent.capture_method == "manual":
            intent.status = "requires_capture"
            intent.amount_capturable = intent.amount
            self._emit(ctx, "charge.succeeded", charge.render())
            self._emit(ctx, "payment_intent.amount_capturable_updated", intent.render())
            return
        self._settle(intent, charge, ctx)

    def _settle(self, intent: PaymentIntent, charge: Charge, ctx: RequestContext) -> None:
        charge.status = "succeeded"
        charge.captured = True
        charge.amount_captured = charge.amount
        charge.outcome = charge.outcome or _approved()
        intent.status = "succeeded"
        intent.amount_received = charge.amount
        intent.amount_capturable = 0
        self._emit(ctx, "charge.succeeded", charge.render())
        self._emit(ctx, "payment_intent.succeeded", intent.render())

    def _fail(
        self,
        intent: PaymentIntent,
        method: PaymentMethod,
        ctx: RequestContext,
        *,
        error: JSON,
        charge: Charge | None,
    ) -> None:
        intent.status = "requires_payment_method"
        intent.payment_method = None
        intent.next_action = None
        intent.last_payment_error = {**error, "payment_method": method.render()}
        if charge is not None:
            self._emit(ctx, "charge.failed", charge.render())
        self._emit(ctx, "payment_intent.payment_failed", intent.render())

    def _charge_declined(
        self,
        intent: PaymentIntent,
        method: PaymentMethod,
        ctx: RequestContext,
        *,
        code: str | None = None,
        decline_code: str | None = None,
        message: str | None = None,
    ) -> None:
        spec = method.spec
        code = code or spec.code or "card_declined"
        decline_code = decline_code or spec.decline_code or "generic_decline"
        message = message or spec.message or "Your card was declined."
        charge = self._new_charge(intent, method, ctx, status="failed")
        charge.failure_code = code
        charge.failure_message = message
        charge.outcome = {
            "network_status": "declined_by_network",
            "reason": decline_code,
            "risk_level": "normal",
            "seller_message": "The bank declined the payment.",
            "type": "issuer_declined",
        }
        error = {
            "type": "card_error",
            "code": code,
            "decline_code": decline_code,
            "message": message,
            "charge": charge.id,
            "doc_url": f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}",
        }
        self._fail(intent, method, ctx, error=error, charge=charge)
        raise StripeAPIError(
            402,
            message,
            type="card_error",
            code=code,
            decline_code=decline_code,
            extra={
                "charge": charge.id,
                "payment_intent": intent.render(),
                "payment_method": method.render(),
            },
        )

    def _requires_action(self, intent: PaymentIntent, ctx: RequestContext) -> None:
        intent.status = "requires_action"
        url = f"{self.base_url}/_sim/3ds/{intent.id}"
        if intent.return_url is not None:
            intent.next_action = {
                "type": "redirect_to_url",
                "redirect_to_url": {"return_url": intent.return_url, "url": url},
            }
        else:
            intent.next_action = {
                "type": "use_stripe_sdk",
                "use_stripe_sdk": {
                    "type": "three_d_secure_redirect",
                    "source": new_id("src_"),
                    "stripe_js": url,
                },
            }
        self._emit(ctx, "payment_intent.requires_action", intent.render())

    def _debit_processing(
        self, intent: PaymentIntent, method: PaymentMethod, ctx: RequestContext
    ) -> None:
        charge = self._new_charge(intent, method, ctx, status="pending")
        intent.status = "processing"
        self._emit(ctx, "charge.pending", charge.render())
        self._emit(ctx, "payment_intent.processing", intent.render())

    def return_url(self, pi_id: str) -> str | None:
        """Where the customer goes back to after a redirect (3-D Secure), if given."""
        with self._lock:
            return self._intent(pi_id).return_url

    def retrieve_payment_intent(self, pi_id: str, params: Params) -> JSON:
        """GET /v1/payment_intents/{id}."""
        with self._lock:
            params.accept("client_secret")
            expand = params.expand()
            params.refuse_unknown()
            return self._render_intent(self._intent(pi_id), expand)

    def cancel_payment_intent(self, pi_id: str, params: Params, ctx: RequestContext) -> JSON:
        """POST /v1/payment_intents/{id}/cancel; refused once succeeded, or while processing."""
        with self._lock:
            intent = self._intent(pi_id)
            reason = params.choice("cancellation_reason", _CANCELLATION_REASONS)
            expand = params.expand()
            params.refuse_unknown()
            if intent.status not in _CANCELABLE:
                raise _unexpected_state(intent, "cancel")
            charge = intent.latest_charge
            authorized = intent.status == "requires_capture" and charge is not None
            intent.status = "canceled"
            intent.canceled_at = int(ctx.now)
            intent.cancellation_reason = reason
            intent.next_action = None
            intent.amount_capturable = 0
            if authorized and charge is not None:
                # Canceling an authorization releases it: Stripe shows the charge refunded.
                charge.amount_refunded = charge.amount
                self._emit(ctx, "charge.refunded", charge.render())
            self._emit(ctx, "payment_intent.canceled", intent.render())
            return self._render_intent(intent, expand)

    def capture_payment_intent(self, pi_id: str, params: Params, ctx: RequestContext) -> JSON:
        """POST /v1/payment_intents/{id}/capture (manual capture)."""
        with self._lock:
            intent = self._intent(pi_id)
            amount = params.integer("amount_to_capture", minimum=1)
            params.accept("metadata", "statement_descriptor", "statement_descriptor_suffix")
            expand = params.expand()
            params.refuse_unknown()
            charge = intent.latest_charge
            if intent.status != "requires_capture" or charge is None:
                raise _unexpected_state(intent, "capture")
            captured = intent.amount_capturable if amount is None else amount
            if captured > intent.amount_capturable:
                raise invalid(
                    "The amount to capture is greater than the amount capturable.",
                    param="amount_to_capture",
                    code="amount_too_large",
                )
            charge.captured = True
            charge.amount_captured = captured
            charge.amount_refunded = charge.amount - captured  # the part released
            intent.status = "succeeded"
            intent.amount_received = captured
            intent.amount_capturable = 0
            self._emit(ctx, "charge.captured", charge.render())
            self._emit(ctx, "payment_intent.succeeded", intent.render())
            return self._render_intent(intent, expand)

    def list_payment_intents(self, params: Params) -> JSON:
        """GET /v1/payment_intents."""
        with self._lock:
            customer = params.string("customer")
            created = created_filter(params)
            items = [
                intent
                for intent in reversed(self._intents.values())
                if created(intent.created) and (customer is None or intent.customer == customer)
            ]
            return page(items, params, "/v1/payment_intents", self._intent_renderer(params))

    def search_payment_intents(self, params: Params) -> JSON:
        """GET /v1/payment_intents/search: ``metadata['k']:'v'``, ``status:'...'``, amounts,
        joined by ``AND`` (or all by ``OR``); newest first, no indexing delay."""
        with self._lock:
            query = params.string("query", required=True)
            assert query is not None
            predicate = search_predicate(query)
            limit = page_size(params)
            page = params.string("page")
            render = self._intent_renderer(params)
            params.refuse_unknown()
            start = 0
            if page is not None:
                if not page.isdigit():
                    raise invalid("Invalid page token.", param="page")
                start = int(page)
            matches = [intent for intent in reversed(self._intents.values()) if predicate(intent)]
            chunk = matches[start : start + limit]
            more = start + limit < len(matches)
            return {
                "object": "search_result",
                "data": [render(intent) for intent in chunk],
                "has_more": more,
                "next_page": str(start + limit) if more else None,
                "url": "/v1/payment_intents/search",
            }

    def _intent_renderer(self, params: Params) -> Callable[[PaymentIntent], JSON]:
        expand = [path.removeprefix("data.") for path in params.expand()]
        return lambda intent: self._render_intent(intent, expand)

    def _render_intent(self, intent: PaymentIntent, expand: Sequence[str]) -> JSON:
        rendered = intent.render()
        for path in expand:
            if path == "latest_charge":
                if intent.latest_charge is not None:
                    rendered["latest_charge"] = intent.latest_charge.render()
            elif path == "payment_method":
                if intent.payment_method is not None:
                    rendered["payment_method"] = intent.payment_method.render()
            else:
                raise invalid(f"This property cannot be expanded ({path}).", param="expand")
        return rendered

    # -- control: what Stripe, the bank or the customer do on their own ---------------------

    def release_debit(self, pi_id: str, *, succeed: bool, failure_code: str, now: float) -> JSON:
        """A processing bank debit clears (``succeed``) or bounces with ``failure_code``."""
        with self._lock:
            intent = self._intent(pi_id)
            charge = intent.latest_charge
            if intent.status != "processing" or charge is None:
                raise _unexpected_state(intent, "release")
            ctx = RequestContext(now=now)
            if succeed:
                self._settle(intent, charge, ctx)
                return intent.render()
            message = "The bank debit failed."
            charge.status = "failed"
            charge.failure_code = failure_code
            charge.failure_message = message
            charge.outcome = {
                "network_status": "declined_by_network",
                "reason": failure_code,
                "risk_level": "not_assessed",
                "seller_message": message,
                "type": "issuer_declined",
            }
            error = {
                "type": "card_error",
                "code": failure_code,
                "message": message,
                "charge": charge.id,
            }
            self._fail(intent, charge.payment_method, ctx, error=error, charge=charge)
            return intent.render()

    def authenticate(self, pi_id: str, *, succeed: bool, now: float) -> JSON:
        """The customer completes (``succeed``) or fails 3-D Secure for a PaymentIntent."""
        with self._lock:
            intent = self._intent(pi_id)
            method = intent.payment_method
            if intent.status != "requires_action" or method is None:
                raise _unexpected_state(intent, "authenticate")
            ctx = RequestContext(now=now)
            intent.next_action = None
            if succeed:
                self._charge_succeeds(intent, method, ctx)
                return intent.render()
            error = {
                "type": "invalid_request_error",
                "code": "payment_intent_authentication_failure",
                "message": "The provided PaymentMethod has failed authentication. Provide a new "
                "payment method to attempt to fulfill this PaymentIntent again.",
                "doc_url": "https://stripe.com/docs/error-codes/"
                "payment-intent-authentication-failure",
            }
            self._fail(intent, method, ctx, error=error, charge=None)
            return intent.render()

    # -- Charges and Refunds ----------------------------------------------------------------

    def _charge(self, ch_id: str) -> Charge:
        charge = self._charges.get(ch_id)
        if charge is None:
            raise not_found("charge", ch_id, param="charge")
        return charge

    def retrieve_charge(self, ch_id: str, params: Params) -> JSON:
        """GET /v1/charges/{id}."""
        with self._lock:
            expand = params.expand()
            params.refuse_unknown()
            return self._render_charge(self._charge(ch_id), expand)

    def list_charges(self, params: Params) -> JSON:
        """GET /v1/charges, optionally for one ``payment_intent``."""
        with self._lock:
            intent_id = params.string("payment_intent")
            created = created_filter(params)
            expand = [path.removeprefix("data.") for path in params.expand()]
            items = [
                charge
                for charge in reversed(self._charges.values())
                if created(charge.created)
                and (intent_id is None or charge.payment_intent == intent_id)
            ]
            return page(
                items, params, "/v1/charges", lambda charge: self._render_charge(charge, expand)
            )

    def _render_charge(self, charge: Charge, expand: Sequence[str]) -> JSON:
        rendered = charge.render()
        for path in expand:
            if path == "payment_intent":
                rendered["payment_intent"] = self._intents[charge.payment_intent].render()
            elif path == "payment_method":
                rendered["payment_method"] = charge.payment_method.render()
            else:
                raise invalid(f"This property cannot be expanded ({path}).", param="expand")
        return rendered

    def create_refund(self, params: Params, ctx: RequestContext) -> JSON:
        """POST /v1/refunds: of a PaymentIntent or a Charge, in full or in part, never more
        than what remains."""
        with self._lock:
            intent_id = params.string("payment_intent")
            charge_id = params.string("charge")
            amount = params.integer("amount", minimum=1)
            reason = params.choice("reason", _REFUND_REASONS)
            metadata = params.metadata() or {}
            params.accept("instructions_email", "refund_application_fee", "reverse_transfer")
            expand = params.expand()
            params.refuse_unknown()
            charge = self._refundable_charge(intent_id, charge_id)
            remaining = charge.amount - charge.amount_refunded
            if remaining <= 0:
                raise StripeAPIError(
                    400,
                    f"Charge {charge.id} has already been refunded.",
                    code="charge_already_refunded",
                )
            refunded = remaining if amount is None else amount
            if refunded > remaining:
                raise StripeAPIError(
                    400,
                    f"Refund amount ({refunded}) is greater than the unrefunded amount on the "
                    f"charge ({remaining}).",
                    code="amount_too_large",
                    param="amount",
                )
            refund = Refund(
                id=new_id("re_"),
                amount=refunded,
                charge=charge.id,
                payment_intent=charge.payment_intent,
                currency=charge.currency,
                created=int(ctx.now),
                reason=reason,
                metadata=metadata,
            )
            self._refunds[refund.id] = refund
            charge.amount_refunded += refunded
            self._emit(ctx, "refund.created", refund.render())
            self._emit(ctx, "charge.refunded", charge.render())
            return self._render_refund(refund, expand)

    def _refundable_charge(self, intent_id: str | None, charge_id: str | None) -> Charge:
        if intent_id is None and charge_id is None:
            raise missing("charge")
        if intent_id is not None and charge_id is not None:
            raise invalid(
                "You can only pass one of charge or payment_intent.", param="payment_intent"
            )
        if intent_id is not None:
            intent = self._intents.get(intent_id)
            if intent is None:
                raise not_found("payment_intent", intent_id, param="payment_intent")
            charge = intent.latest_charge
            if intent.status != "succeeded" or charge is None:
                raise StripeAPIError(
                    400,
                    f"This PaymentIntent ({intent.id}) does not have a successful charge to "
                    "refund.",
                    code="charge_not_refundable",
                    param="payment_intent",
                )
            return charge
        assert charge_id is not None
        charge = self._charges.get(charge_id)
        if charge is None:
            raise not_found("charge", charge_id, param="charge")
        if charge.status != "succeeded" or not charge.captured:
            raise StripeAPIError(
                400,
                f"Charge {charge.id} has no captured amount to refund.",
                code="charge_not_refundable",
                param="charge",
            )
        return charge

    def retrieve_refund(self, re_id: str, params: Params) -> JSON:
        """GET /v1/refunds/{id}."""
        with self._lock:
            expand = params.expand()
            params.refuse_unknown()
            refund = self._refunds.get(re_id)
            if refund is None:
                raise not_found("refund", re_id, param="refund")
            return self._render_refund(refund, expand)

    def list_refunds(self, params: Params) -> JSON:
        """GET /v1/refunds, optionally for one ``payment_intent`` or ``charge``."""
        with self._lock:
            intent_id = params.string("payment_intent")
            charge_id = params.string("charge")
            created = created_filter(params)
            expand = [path.removeprefix("data.") for path in params.expand()]
            items = [
                refund
                for refund in reversed(self._refunds.values())
                if created(refund.created)
                and (intent_id is None or refund.payment_intent == intent_id)
                and (charge_id is None or refund.charge == charge_id)
            ]
            return page(
                items, params, "/v1/refunds", lambda refund: self._render_refund(refund, expand)
            )

    def _render_refund(self, refund: Refund, expand: Sequence[str]) -> JSON:
        rendered = refund.render()
        for path in expand:
            if path == "charge":
                rendered["charge"] = self._charges[refund.charge].render()
            elif path == "payment_intent":
                rendered["payment_intent"] = self._intents[refund.payment_intent].render()
            else:
                raise invalid(f"This property cannot be expanded ({path}).", param="expand")
        return rendered

    # -- Events ------------------------------------------------------------------------------

    def retrieve_event(self, evt_id: str, params: Params) -> JSON:
        """GET /v1/events/{id}."""
        with self._lock:
            params.refuse_unknown()
            event = self._events.get(evt_id)
            if event is None:
                raise not_found("event", evt_id)
            return event.render()

    def list_events(self, params: Params) -> JSON:
        """GET /v1/events: ``type`` (``*`` wildcards), ``types[]``, ``created``,
        ``delivery_success`` (``false``: still pending for some endpoint)."""
        with self._lock:
            one_type = params.string("type")
            types = params.strings("types")
            delivered = params.boolean("delivery_success")
            created = created_filter(params)
            patterns = ([one_type] if one_type else []) + (types or [])
            matchers = [type_matcher(pattern) for pattern in patterns]
            items = [
                event
                for event in reversed(self._events.values())
                if created(event.created)
                and (not matchers or any(match(event.type) for match in matchers))
                and (delivered is None or (event.pending_webhooks == 0) == delivered)
            ]
            return page(items, params, "/v1/events", EventRecord.render)


# -- helpers ---------------------------------------------------------------------------------


def _approved() -> JSON:
    return {
        "network_status": "approved_by_network",
        "reason": None,
        "risk_level": "normal",
        "seller_message": "Payment complete.",
        "type": "authorized",
    }


def _unexpected_state(intent: PaymentIntent, action: str) -> StripeAPIError:
    return StripeAPIError(
        400,
        f"You cannot {action} this PaymentIntent because it has a status of {intent.status}.",
        code="payment_intent_unexpected_state",
        extra={"payment_intent": intent.render()},
    )


def _amount(params: Params) -> int | None:
    amount = params.integer("amount", minimum=1)
    if amount is not None and amount > _MAX_AMOUNT:
        raise invalid(
            f"Amount must be no more than {_MAX_AMOUNT}.", param="amount", code="amount_too_large"
        )
    return amount


def _currency(params: Params) -> str | None:
    currency = params.string("currency")
    if currency is None:
        return None
    if currency.lower() not in CURRENCIES:
        raise invalid(f"Invalid currency: {currency}.", param="currency")
    return currency.lower()
