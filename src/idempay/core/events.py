"""Stripe events as typed values: a strict parser for the (already signature-checked) body.

:func:`parse_event` reads a Stripe snapshot event with :mod:`idempay.core.strictjson` and
returns a :class:`StripeEvent`. For the objects idempay acts on (PaymentIntents, Charges,
Disputes, Checkout Sessions) the embedded object is read into a snapshot with exact types: an
amount of ``"100"``, ``100.0``, ``true`` or ``-1`` is refused, never coerced. An event of a type
idempay does not act on is accepted with only its envelope checked, so that it can be
acknowledged and ignored rather than retried by Stripe for days.

Every refusal is a :class:`~idempay.errors.PayloadError` subclass whose message names the field
(a JSON pointer) and the rule, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final, TypeAlias, assert_never

from idempay.core.strictjson import (
    DEFAULT_LIMITS,
    JSONLimits,
    JSONValue,
    ObjectReader,
    loads_object,
)
from idempay.errors import InvalidFieldError, LivemodeMismatchError

__all__ = [
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_KEY_LENGTH",
    "MAX_METADATA_VALUE_LENGTH",
    "PAYMENT_INTENT_STATUSES",
    "ChargeSnapshot",
    "CheckoutSessionSnapshot",
    "DisputeSnapshot",
    "EventObject",
    "ObjectType",
    "PaymentIntentSnapshot",
    "StripeEvent",
    "parse_event",
    "read_payment_intent",
]

MAX_METADATA_ENTRIES: Final = 50
"""Most metadata entries Stripe allows on one object."""

MAX_METADATA_KEY_LENGTH: Final = 40
"""Longest metadata key Stripe allows, in characters."""

MAX_METADATA_VALUE_LENGTH: Final = 500
"""Longest metadata value Stripe allows, in characters."""

PAYMENT_INTENT_STATUSES: Final[frozenset[str]] = frozenset(
    {
        "requires_payment_method",
        "requires_confirmation",
        "requires_action",
        "processing",
        "requires_capture",
        "canceled",
        "succeeded",
    }
)
"""The statuses a PaymentIntent can have; any other value is refused."""

_EVENT_TYPE: Final = re.compile(r"[a-z0-9_.]+")

# Stripe issues more than one id prefix for some objects: `py_` charges (and their `pyr_`
# refunds) come from non-card payment methods, `du_` and `pdp_` disputes from newer and ACH
# disputes. SDKs that accepted only `ch_`, `re_` or `dp_` failed on real events.
_PAYMENT_INTENT_PREFIXES: Final = ("pi_",)
_CHARGE_PREFIXES: Final = ("ch_", "py_")
_DISPUTE_PREFIXES: Final = ("dp_", "du_", "pdp_")
_CHECKOUT_SESSION_PREFIXES: Final = ("cs_",)
_REFUND_PREFIXES: Final = ("re_", "pyr_")

_IDEMPOTENCY_KEY_MAX_LENGTH: Final = 255


class ObjectType(StrEnum):
    """The kind of object an event carries in ``data.object`` (its ``object`` field)."""

    PAYMENT_INTENT = "payment_intent"
    CHARGE = "charge"
    REFUND = "refund"
    DISPUTE = "dispute"
    CHECKOUT_SESSION = "checkout.session"
    OTHER = "other"
    """Any kind idempay does not read."""


# Most specific prefix first: `charge.dispute.` and `charge.refund.` before `charge.`.
# (`charge.refunded` is a Charge event: its prefix is `charge.`, not `charge.refund.`.)
_EXPECTED_KIND: Final[tuple[tuple[str, ObjectType], ...]] = (
    ("payment_intent.", ObjectType.PAYMENT_INTENT),
    ("charge.dispute.", ObjectType.DISPUTE),
    ("charge.refund.", ObjectType.REFUND),
    ("refund.", ObjectType.REFUND),
    ("charge.", ObjectType.CHARGE),
    ("checkout.session.", ObjectType.CHECKOUT_SESSION),
)


def _frozen_metadata(metadata: Mapping[str, str]) -> Mapping[str, str]:
    # Copy before wrapping: a proxy over the caller's dict would still change with it.
    return MappingProxyType(dict(metadata))


@dataclass(frozen=True, slots=True)
class PaymentIntentSnapshot:
    """A PaymentIntent as embedded in an event (its state when the event was created).

    ``metadata`` is read-only; amounts are in the currency's smallest unit.
    """

    id: str
    status: str
    amount: int
    amount_received: int
    currency: str
    livemode: bool
    metadata: Mapping[str, str]
    last_payment_error_code: str | None
    client_secret: str | None = None
    """What the customer's browser needs to confirm the payment (Stripe.js); not a secret key."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", _frozen_metadata(self.metadata))

    def __hash__(self) -> int:
        # A mapping is not hashable; hash its items so that equal snapshots hash equally.
        return hash(
            (
                self.id,
                self.status,
                self.amount,
                self.amount_received,
                self.currency,
                self.livemode,
                frozenset(self.metadata.items()),
                self.last_payment_error_code,
                self.client_secret,
            )
        )


@dataclass(frozen=True, slots=True)
class ChargeSnapshot:
    """A Charge as embedded in an event. ``amount_refunded`` is cumulative over all refunds."""

    id: str
    payment_intent_id: str | None
    amount: int
    amount_refunded: int
    currency: str
    refunded: bool
    status: str


@dataclass(frozen=True, slots=True)
class DisputeSnapshot:
    """A Dispute as embedded in an event."""

    id: str
    charge_id: str | None
    payment_intent_id: str | None
    amount: int
    currency: str
    status: str


@dataclass(frozen=True, slots=True)
class CheckoutSessionSnapshot:
    """A Checkout Session as embedded in an event. ``metadata`` is read-only."""

    id: str
    payment_intent_id: str | None
    payment_status: str
    amount_total: int | None
    currency: str | None
    metadata: Mapping[str, str]
    client_reference_id: str | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", _frozen_metadata(self.metadata))

    def __hash__(self) -> int:
        return hash(
            (
                self.id,
                self.payment_intent_id,
                self.payment_status,
                self.amount_total,
                self.currency,
                frozenset(self.metadata.items()),
                self.client_reference_id,
            )
        )


EventObject: TypeAlias = (
    PaymentIntentSnapshot | ChargeSnapshot | DisputeSnapshot | CheckoutSessionSnapshot | None
)
"""The parsed ``data.object`` of an event, or ``None`` for kinds idempay does not read."""


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """A Stripe snapshot event, checked field by field.

    Attributes:
        id: the event id (``evt_...``), unique per event: the deduplication key.
        type: the event type (``payment_intent.succeeded``).
        created: when Stripe created the event, in Unix seconds.
        livemode: ``True`` for live mode, ``False`` for test mode.
        api_version: the API version the object was rendered with, if any.
        account: the Connect account (``acct_...``) the event belongs to; ``None`` for the
            platform's own events.
        request_id: the API request that caused the event, if any.
        request_idempotency_key: the idempotency key of that request, if any.
        object_type: the kind of ``data.object``.
        object_id: the id of ``data.object``, if it has one.
        object: the parsed snapshot for the kinds idempay acts on, else ``None``.
    """

    id: str
    type: str
    created: int
    livemode: bool
    api_version: str | None
    account: str | None
    request_id: str | None
    request_idempotency_key: str | None
    object_type: ObjectType
    object_id: str | None
    object: EventObject

    @property
    def payment_intent_id(self) -> str | None:
        """The PaymentIntent this event concerns, whatever its object; ``None`` if unknown."""
        match self.object:
            case PaymentIntentSnapshot(id=pi_id):
                return pi_id
            case ChargeSnapshot() | DisputeSnapshot() | CheckoutSessionSnapshot():
                return self.object.payment_intent_id
            case None:
                return None
            case _:
                assert_never(self.object)

    @property
    def order_id(self) -> str | None:
        """``metadata["order_id"]`` of the PaymentIntent or Checkout Session, if present."""
        match self.object:
            case PaymentIntentSnapshot() | CheckoutSessionSnapshot():
                return self.object.metadata.get("order_id")
            case ChargeSnapshot() | DisputeSnapshot() | None:
                return None
            case _:
                assert_never(self.object)


def parse_event(
    raw: bytes, *, limits: JSONLimits = DEFAULT_LIMITS, livemode: bool | None = None
) -> StripeEvent:
    """Parse the raw body of a Stripe snapshot event into a :class:`StripeEvent`.

    Call it only on a body whose signature was verified. The envelope is always checked:
    ``object`` is ``"event"``, ``id`` starts with ``evt_``, ``type`` is 1 to 100 characters of
    ``[a-z0-9_.]``, ``created`` is an integer >= 0, ``livemode`` a boolean, ``account`` (if
    any) starts with ``acct_``, ``request`` is absent, ``null``, a request id, or an object with
    an optional ``id`` and ``idempotency_key`` (1 to 255 printable ASCII characters), and
    ``data.object`` is an object with a string ``object`` field and, if present, an ``id``.

    For event types idempay acts on (``payment_intent.*``, ``charge.*``, ``charge.dispute.*``,
    ``charge.refund.*``, ``refund.*``, ``checkout.session.*``) the object's kind must match the
    type and must carry an ``id``; PaymentIntents, Charges, Disputes and Checkout Sessions are
    then read into snapshots. Refund events keep ``object`` ``None``: idempay reads refunds
    from ``charge.refunded``, whose Charge carries the cumulative ``amount_refunded``. Other
    event types are accepted with ``object`` ``None``.

    Args:
        raw: the request body exactly as received.
        limits: size and depth limits for the JSON body.
        livemode: the endpoint's mode; when given, an event of the other mode is refused.

    Raises:
        PayloadTooLargeError: the body is larger than ``limits.max_bytes``.
        MalformedJSONError: the body is not strict JSON.
        InvalidFieldError: a field is missing, of the wrong type or out of its domain; its
            ``pointer`` names the field, and the message never contains the value.
        LivemodeMismatchError: ``livemode`` is given and differs from the event's.
    """
    event = ObjectReader(loads_object(raw, limits=limits))
    event.choice("object", ("event",))
    event_id = event.identifier("id", prefix="evt_")
    event_type = event.string("type", max_length=100)
    if not _EVENT_TYPE.fullmatch(event_type):
        raise InvalidFieldError(
            event.child_pointer("type"),
            "must contain only lowercase letters, digits, '_' and '.'",
        )
    created = event.integer("created", minimum=0)
    event_livemode = event.boolean("livemode")
    if livemode is not None and event_livemode != livemode:
        endpoint, received = ("live", "test") if livemode else ("test", "live")
        raise LivemodeMismatchError(f"a {received}-mode event reached a {endpoint}-mode endpoint")
    api_version = event.optional_string("api_version", max_length=100)
    account = event.optional_identifier("account", prefix="acct_")
    request_id, idempotency_key = _request(event)

    obj = event.object("data").object("object")
    kind = _object_type(obj.string("object", max_length=100))
    expected = _expected_kind(event_type)
    if expected is not None and kind is not expected:
        raise InvalidFieldError(obj.child_pointer("object"), "does not match the event type")
    object_id, snapshot = _read_object(obj, expected)
    return StripeEvent(
        id=event_id,
        type=event_type,
        created=created,
        livemode=event_livemode,
        api_version=api_version,
        account=account,
        request_id=request_id,
        request_idempotency_key=idempotency_key,
        object_type=kind,
        object_id=object_id,
        object=snapshot,
    )


def _object_type(kind: str) -> ObjectType:
    try:
        return ObjectType(kind)
    except ValueError:
        return ObjectType.OTHER


def _expected_kind(event_type: str) -> ObjectType | None:
    for prefix, kind in _EXPECTED_KIND:
        if event_type.startswith(prefix):
            return kind
    return None


def _request(event: ObjectReader) -> tuple[str | None, str | None]:
    value = event.data.get("request")
    if value is None:
        return None, None
    if isinstance(value, str):
        # Older API versions sent the request id as a plain string.
        return event.identifier("request"), None
    request = event.object("request")
    return request.optional_identifier("id"), _idempotency_key(request)


def _idempotency_key(request: ObjectReader) -> str | None:
    # The same rule as idempay's own keys: a key is an arbitrary client string, so it is
    # bounded and limited to printable ASCII before it is stored or correlated.
    key = request.optional_string(
        "idempotency_key", min_length=1, max_length=_IDEMPOTENCY_KEY_MAX_LENGTH
    )
    if key is not None and not all(" " <= char <= "~" for char in key):
        raise InvalidFieldError(
            request.child_pointer("idempotency_key"),
            "must contain only printable ASCII characters",
        )
    return key


def _read_object(obj: ObjectReader, kind: ObjectType | None) -> tuple[str | None, EventObject]:
    snapshot: EventObject
    match kind:
        case ObjectType.PAYMENT_INTENT:
            snapshot = _payment_intent(obj)
        case ObjectType.CHARGE:
            snapshot = _charge(obj)
        case ObjectType.DISPUTE:
            snapshot = _dispute(obj)
        case ObjectType.CHECKOUT_SESSION:
            snapshot = _checkout_session(obj)
        case ObjectType.REFUND:
            return _prefixed_id(obj, "id", _REFUND_PREFIXES), None
        case ObjectType.OTHER | None:
            # An event type idempay does not act on: read only what identifies the object,
            # so that a field idempay never uses cannot get the event refused.
            return obj.optional_identifier("id"), None
        case _:
            assert_never(kind)
    return snapshot.id, snapshot


def _prefixed_id(reader: ObjectReader, name: str, prefixes: tuple[str, ...]) -> str:
    value = reader.identifier(name)
    if not value.startswith(prefixes):
        # The prefixes are ours, not the request's: safe to name.
        raise InvalidFieldError(
            reader.child_pointer(name), f"must start with {' or '.join(map(repr, prefixes))}"
        )
    return value


def _related_id(reader: ObjectReader, name: str, prefixes: tuple[str, ...]) -> str | None:
    # A reference is an id, null, or the expanded object when the request asked for it.
    value = reader.data.get(name)
    if value is None:
        return None
    if isinstance(value, dict):
        return _prefixed_id(reader.object(name), "id", prefixes)
    return _prefixed_id(reader, name, prefixes)


def _amount(reader: ObjectReader, name: str) -> int:
    return reader.integer(name, minimum=0)


def _metadata(reader: ObjectReader) -> Mapping[str, str]:
    # Errors point at the metadata object, never at a member: a key is body content too.
    metadata = reader.optional_object("metadata")
    if metadata is None:
        return MappingProxyType({})
    pointer = metadata.pointer
    if len(metadata.data) > MAX_METADATA_ENTRIES:
        raise InvalidFieldError(pointer, f"must have at most {MAX_METADATA_ENTRIES} entries")
    result: dict[str, str] = {}
    for key, value in metadata.data.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY_LENGTH:
            raise InvalidFieldError(
                pointer, f"keys must be 1 to {MAX_METADATA_KEY_LENGTH} characters long"
            )
        if not isinstance(value, str):
            raise InvalidFieldError(pointer, "values must be strings")
        if len(value) > MAX_METADATA_VALUE_LENGTH:
            raise InvalidFieldError(
                pointer, f"values must be at most {MAX_METADATA_VALUE_LENGTH} characters long"
            )
        result[key] = value
    return MappingProxyType(result)


def read_payment_intent(data: Mapping[str, JSONValue]) -> PaymentIntentSnapshot:
    """Read a PaymentIntent object (an API response, once made plain JSON) strictly.

    The same rules as for the PaymentIntent inside an event; a field out of its domain raises
    InvalidFieldError with the field's pointer.
    """
    return _payment_intent(ObjectReader(data))


def _payment_intent(obj: ObjectReader) -> PaymentIntentSnapshot:
    error = obj.optional_object("last_payment_error")
    return PaymentIntentSnapshot(
        id=_prefixed_id(obj, "id", _PAYMENT_INTENT_PREFIXES),
        status=obj.choice("status", PAYMENT_INTENT_STATUSES),
        amount=_amount(obj, "amount"),
        # Informational only (decisions use ``amount``); some Stripe fakes leave it out.
        amount_received=obj.optional_integer("amount_received", minimum=0) or 0,
        currency=obj.currency("currency"),
        livemode=obj.boolean("livemode"),
        metadata=_metadata(obj),
        last_payment_error_code=(
            None if error is None else error.optional_string("code", max_length=255)
        ),
        client_secret=obj.optional_identifier("client_secret", max_length=500),
    )


def _charge(obj: ObjectReader) -> ChargeSnapshot:
    return ChargeSnapshot(
        id=_prefixed_id(obj, "id", _CHARGE_PREFIXES),
        payment_intent_id=_related_id(obj, "payment_intent", _PAYMENT_INTENT_PREFIXES),
        amount=_amount(obj, "amount"),
        amount_refunded=_amount(obj, "amount_refunded"),
        currency=obj.currency("currency"),
        refunded=obj.boolean("refunded"),
        status=obj.string("status", max_length=100),
    )


def _dispute(obj: ObjectReader) -> DisputeSnapshot:
    return DisputeSnapshot(
        id=_prefixed_id(obj, "id", _DISPUTE_PREFIXES),
        charge_id=_related_id(obj, "charge", _CHARGE_PREFIXES),
        payment_intent_id=_related_id(obj, "payment_intent", _PAYMENT_INTENT_PREFIXES),
        amount=_amount(obj, "amount"),
        currency=obj.currency("currency"),
        status=obj.string("status", max_length=100),
    )


def _checkout_session(obj: ObjectReader) -> CheckoutSessionSnapshot:
    return CheckoutSessionSnapshot(
        id=_prefixed_id(obj, "id", _CHECKOUT_SESSION_PREFIXES),
        payment_intent_id=_related_id(obj, "payment_intent", _PAYMENT_INTENT_PREFIXES),
        payment_status=obj.string("payment_status", max_length=100),
        amount_total=obj.optional_integer("amount_total", minimum=0),
        currency=None if obj.data.get("currency") is None else obj.currency("currency"),
        metadata=_metadata(obj),
        client_reference_id=obj.optional_string("client_reference_id", max_length=200),
    )
