from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempay.core.events import (
    MAX_METADATA_ENTRIES,
    MAX_METADATA_KEY_LENGTH,
    MAX_METADATA_VALUE_LENGTH,
    PAYMENT_INTENT_STATUSES,
    ChargeSnapshot,
    CheckoutSessionSnapshot,
    DisputeSnapshot,
    ObjectType,
    PaymentIntentSnapshot,
    StripeEvent,
    parse_event,
)
from idempay.core.strictjson import JSONLimits
from idempay.errors import (
    InvalidFieldError,
    LivemodeMismatchError,
    MalformedJSONError,
    PayloadTooLargeError,
)

# Factories: plain dicts shaped like Stripe's, serialised to the bytes a webhook would carry.

_ABSENT = object()


def payment_intent(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "pi_3Pabc",
        "object": "payment_intent",
        "amount": 2000,
        "amount_received": 2000,
        "currency": "usd",
        "livemode": False,
        "status": "succeeded",
        "metadata": {"order_id": "ord_42", "cart": "c-1"},
        "last_payment_error": None,
        "customer": None,
        "latest_charge": "ch_3Pabc",
    }
    return _apply(obj, overrides)


def charge(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "ch_3Pabc",
        "object": "charge",
        "amount": 2000,
        "amount_refunded": 500,
        "currency": "eur",
        "refunded": False,
        "status": "succeeded",
        "payment_intent": "pi_3Pabc",
        "metadata": {},
    }
    return _apply(obj, overrides)


def dispute(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "dp_1Pabc",
        "object": "dispute",
        "amount": 2000,
        "currency": "usd",
        "status": "needs_response",
        "charge": "ch_3Pabc",
        "payment_intent": "pi_3Pabc",
        "reason": "fraudulent",
    }
    return _apply(obj, overrides)


def checkout_session(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "cs_test_a1b2",
        "object": "checkout.session",
        "payment_intent": "pi_3Pabc",
        "payment_status": "paid",
        "amount_total": 2000,
        "currency": "usd",
        "metadata": {"order_id": "ord_7"},
        "client_reference_id": "user-9",
        "mode": "payment",
    }
    return _apply(obj, overrides)


def refund(**overrides: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": "re_1Pabc",
        "object": "refund",
        "amount": 500,
        "charge": "ch_3Pabc",
        "currency": "usd",
        "status": "succeeded",
    }
    return _apply(obj, overrides)


def event(
    event_type: str = "payment_intent.succeeded", obj: Any = _ABSENT, **overrides: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "evt_1Pabc",
        "object": "event",
        "api_version": "2024-06-20",
        "created": 1_700_000_000,
        "data": {"object": payment_intent() if obj is _ABSENT else obj},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": "req_abc", "idempotency_key": "checkout:ord_42:1"},
        "type": event_type,
    }
    return _apply(body, overrides)


def _apply(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    for name, value in overrides.items():
        if value is _ABSENT:
            base.pop(name, None)
        else:
            base[name] = value
    return base


def raw(body: Any) -> bytes:
    return json.dumps(body).encode()


def refused(body: Any, **kwargs: Any) -> InvalidFieldError:
    with pytest.raises(InvalidFieldError) as excinfo:
        parse_event(raw(body), **kwargs)
    return excinfo.value


# Valid events of each kind


def test_payment_intent_event() -> None:
    parsed = parse_event(raw(event()))
    assert parsed == StripeEvent(
        id="evt_1Pabc",
        type="payment_intent.succeeded",
        created=1_700_000_000,
        livemode=False,
        api_version="2024-06-20",
        account=None,
        request_id="req_abc",
        request_idempotency_key="checkout:ord_42:1",
        object_type=ObjectType.PAYMENT_INTENT,
        object_id="pi_3Pabc",
        object=PaymentIntentSnapshot(
            id="pi_3Pabc",
            status="succeeded",
            amount=2000,
            amount_received=2000,
            currency="usd",
            livemode=False,
            metadata={"order_id": "ord_42", "cart": "c-1"},
            last_payment_error_code=None,
        ),
    )
    assert parsed.payment_intent_id == "pi_3Pabc"
    assert parsed.order_id == "ord_42"


def test_payment_failed_event_keeps_the_error_code() -> None:
    obj = payment_intent(
        status="requires_payment_method",
        amount_received=0,
        last_payment_error={"code": "card_declined", "message": "Your card was declined."},
    )
    parsed = parse_event(raw(event("payment_intent.payment_failed", obj)))
    assert isinstance(parsed.object, PaymentIntentSnapshot)
    assert parsed.object.last_payment_error_code == "card_declined"
    assert parsed.object.status == "requires_payment_method"


def test_payment_error_without_a_code() -> None:
    obj = payment_intent(last_payment_error={"type": "api_error"})
    parsed = parse_event(raw(event("payment_intent.payment_failed", obj)))
    assert isinstance(parsed.object, PaymentIntentSnapshot)
    assert parsed.object.last_payment_error_code is None


@pytest.mark.parametrize("status", sorted(PAYMENT_INTENT_STATUSES))
def test_every_payment_intent_status_is_accepted(status: str) -> None:
    parsed = parse_event(raw(event("payment_intent.created", payment_intent(status=status))))
    assert isinstance(parsed.object, PaymentIntentSnapshot)
    assert parsed.object.status == status


def test_charge_event() -> None:
    parsed = parse_event(raw(event("charge.refunded", charge(refunded=True))))
    assert parsed.object_type is ObjectType.CHARGE
    assert parsed.object_id == "ch_3Pabc"
    assert parsed.object == ChargeSnapshot(
        id="ch_3Pabc",
        payment_intent_id="pi_3Pabc",
        amount=2000,
        amount_refunded=500,
        currency="eur",
        refunded=True,
        status="succeeded",
    )
    assert parsed.payment_intent_id == "pi_3Pabc"
    assert parsed.order_id is None


def test_charge_with_a_py_id_and_no_payment_intent() -> None:
    obj = charge(id="py_1Pabc", payment_intent=None)
    parsed = parse_event(raw(event("charge.succeeded", obj)))
    assert isinstance(parsed.object, ChargeSnapshot)
    assert parsed.object.id == "py_1Pabc"
    assert parsed.payment_intent_id is None


def test_charge_with_an_expanded_payment_intent() -> None:
    obj = charge(payment_intent=payment_intent(id="pi_expanded"))
    parsed = parse_event(raw(event("charge.succeeded", obj)))
    assert parsed.payment_intent_id == "pi_expanded"


def test_charge_without_a_payment_intent_field() -> None:
    parsed = parse_event(raw(event("charge.succeeded", charge(payment_intent=_ABSENT))))
    assert parsed.payment_intent_id is None


@pytest.mark.parametrize("dispute_id", ["dp_1Pabc", "du_1Pabc", "pdp_1Pabc"])
def test_dispute_event(dispute_id: str) -> None:
    parsed = parse_event(raw(event("charge.dispute.created", dispute(id=dispute_id))))
    assert parsed.object_type is ObjectType.DISPUTE
    assert parsed.object == DisputeSnapshot(
        id=dispute_id,
        charge_id="ch_3Pabc",
        payment_intent_id="pi_3Pabc",
        amount=2000,
        currency="usd",
        status="needs_response",
    )
    assert parsed.payment_intent_id == "pi_3Pabc"
    assert parsed.order_id is None


def test_dispute_with_expanded_charge_and_null_payment_intent() -> None:
    obj = dispute(charge=charge(id="py_9"), payment_intent=None)
    parsed = parse_event(raw(event("charge.dispute.closed", obj)))
    assert isinstance(parsed.object, DisputeSnapshot)
    assert parsed.object.charge_id == "py_9"
    assert parsed.payment_intent_id is None


def test_checkout_session_event() -> None:
    parsed = parse_event(raw(event("checkout.session.completed", checkout_session())))
    assert parsed.object_type is ObjectType.CHECKOUT_SESSION
    assert parsed.object == CheckoutSessionSnapshot(
        id="cs_test_a1b2",
        payment_intent_id="pi_3Pabc",
        payment_status="paid",
        amount_total=2000,
        currency="usd",
        metadata={"order_id": "ord_7"},
        client_reference_id="user-9",
    )
    assert parsed.payment_intent_id == "pi_3Pabc"
    assert parsed.order_id == "ord_7"


def test_checkout_session_with_nulls() -> None:
    obj = checkout_session(
        payment_intent=None,
        payment_status="unpaid",
        amount_total=None,
        currency=None,
        metadata=None,
        client_reference_id=None,
    )
    parsed = parse_event(raw(event("checkout.session.async_payment_failed", obj)))
    assert parsed.object == CheckoutSessionSnapshot(
        id="cs_test_a1b2",
        payment_intent_id=None,
        payment_status="unpaid",
        amount_total=None,
        currency=None,
        metadata={},
        client_reference_id=None,
    )
    assert parsed.order_id is None
    assert parsed.payment_intent_id is None


def test_checkout_session_without_optional_fields() -> None:
    obj = checkout_session(currency=_ABSENT, metadata=_ABSENT, amount_total=_ABSENT)
    parsed = parse_event(raw(event("checkout.session.expired", obj)))
    assert isinstance(parsed.object, CheckoutSessionSnapshot)
    assert parsed.object.currency is None
    assert parsed.object.amount_total is None
    assert dict(parsed.object.metadata) == {}


@pytest.mark.parametrize(
    "event_type", ["refund.created", "refund.updated", "charge.refund.updated"]
)
@pytest.mark.parametrize("refund_id", ["re_1Pabc", "pyr_1Pabc"])
def test_refund_events_keep_no_snapshot(event_type: str, refund_id: str) -> None:
    parsed = parse_event(raw(event(event_type, refund(id=refund_id))))
    assert parsed.object_type is ObjectType.REFUND
    assert parsed.object_id == refund_id
    assert parsed.object is None
    assert parsed.payment_intent_id is None
    assert parsed.order_id is None


def test_refund_event_with_a_foreign_id_is_refused() -> None:
    error = refused(event("refund.created", refund(id="ch_1")))
    assert error.pointer == "/data/object/id"


def test_unknown_event_type_is_accepted_without_a_snapshot() -> None:
    obj = {"id": "in_1", "object": "invoice", "amount_due": "not read", "total": -5}
    parsed = parse_event(raw(event("invoice.paid", obj)))
    assert parsed.type == "invoice.paid"
    assert parsed.object_type is ObjectType.OTHER
    assert parsed.object_id == "in_1"
    assert parsed.object is None
    assert parsed.payment_intent_id is None
    assert parsed.order_id is None


def test_unknown_event_type_with_a_known_object_kind_is_not_read() -> None:
    obj = payment_intent(amount="not read", status="future_status")
    parsed = parse_event(raw(event("radar.early_fraud_warning.created", obj)))
    assert parsed.object_type is ObjectType.PAYMENT_INTENT
    assert parsed.object_id == "pi_3Pabc"
    assert parsed.object is None


def test_unknown_event_type_whose_object_has_no_id() -> None:
    obj = {"object": "balance", "available": [{"amount": 1, "currency": "usd"}]}
    parsed = parse_event(raw(event("balance.available", obj)))
    assert parsed.object_type is ObjectType.OTHER
    assert parsed.object_id is None


def test_unknown_event_type_still_checks_the_object_id() -> None:
    obj = {"id": "in 1", "object": "invoice"}
    assert refused(event("invoice.paid", obj)).pointer == "/data/object/id"


def test_an_object_calling_itself_other_is_other() -> None:
    parsed = parse_event(raw(event("thing.happened", {"id": "x_1", "object": "other"})))
    assert parsed.object_type is ObjectType.OTHER


# Envelope


def test_connect_event_keeps_its_account() -> None:
    parsed = parse_event(raw(event(account="acct_1Conn")))
    assert parsed.account == "acct_1Conn"


def test_live_event_and_null_api_version() -> None:
    parsed = parse_event(raw(event(livemode=True, api_version=None)), livemode=True)
    assert parsed.livemode is True
    assert parsed.api_version is None


def test_request_as_an_object() -> None:
    parsed = parse_event(raw(event(request={"id": "req_1", "idempotency_key": "k-1"})))
    assert (parsed.request_id, parsed.request_idempotency_key) == ("req_1", "k-1")


def test_request_object_with_null_members() -> None:
    parsed = parse_event(raw(event(request={"id": None, "idempotency_key": None})))
    assert (parsed.request_id, parsed.request_idempotency_key) == (None, None)


def test_request_object_may_be_empty() -> None:
    parsed = parse_event(raw(event(request={})))
    assert (parsed.request_id, parsed.request_idempotency_key) == (None, None)


def test_request_as_a_string() -> None:
    parsed = parse_event(raw(event(request="req_old")))
    assert (parsed.request_id, parsed.request_idempotency_key) == ("req_old", None)


def test_request_null() -> None:
    parsed = parse_event(raw(event(request=None)))
    assert (parsed.request_id, parsed.request_idempotency_key) == (None, None)


def test_request_absent() -> None:
    parsed = parse_event(raw(event(request=_ABSENT)))
    assert (parsed.request_id, parsed.request_idempotency_key) == (None, None)


def test_idempotency_key_may_contain_spaces_and_punctuation() -> None:
    key = " ~!a b:c/d" + "x" * 245
    assert len(key) == 255
    parsed = parse_event(raw(event(request={"id": "req_1", "idempotency_key": key})))
    assert parsed.request_idempotency_key == key


@pytest.mark.parametrize(
    "key",
    ["", "x" * 256, "caf\u00e9", "a\x00b", "tab\there", "line\n", "\x7f", 42, True, ["k"]],
)
def test_bad_idempotency_keys_are_refused(key: Any) -> None:
    error = refused(event(request={"id": "req_1", "idempotency_key": key}))
    assert error.pointer == "/request/idempotency_key"


@pytest.mark.parametrize("request_value", [42, True, [], "", "req with space"])
def test_bad_request_values_are_refused(request_value: Any) -> None:
    assert refused(event(request=request_value)).pointer == "/request"


def test_bad_request_id_is_refused() -> None:
    assert refused(event(request={"id": 5})).pointer == "/request/id"


@pytest.mark.parametrize(
    ("overrides", "pointer"),
    [
        ({"object": "v2.core.event"}, "/object"),
        ({"object": _ABSENT}, "/object"),
        ({"id": "ev_1"}, "/id"),
        ({"id": "evt_ 1"}, "/id"),
        ({"id": 1}, "/id"),
        ({"id": _ABSENT}, "/id"),
        ({"type": ""}, "/type"),
        ({"type": "Payment_intent.succeeded"}, "/type"),
        ({"type": "payment_intent succeeded"}, "/type"),
        ({"type": "payment-intent.succeeded"}, "/type"),
        ({"type": "a" * 101}, "/type"),
        ({"type": 5}, "/type"),
        ({"created": -1}, "/created"),
        ({"created": 1.5}, "/created"),
        ({"created": "1700000000"}, "/created"),
        ({"created": True}, "/created"),
        ({"livemode": "false"}, "/livemode"),
        ({"livemode": 0}, "/livemode"),
        ({"livemode": _ABSENT}, "/livemode"),
        ({"api_version": 2024}, "/api_version"),
        ({"account": "acc_1"}, "/account"),
        ({"account": 7}, "/account"),
        ({"data": _ABSENT}, "/data"),
        ({"data": []}, "/data"),
        ({"data": {}}, "/data/object"),
        ({"data": {"object": "pi_1"}}, "/data/object"),
    ],
)
def test_envelope_refusals(overrides: dict[str, Any], pointer: str) -> None:
    assert refused(event(**overrides)).pointer == pointer


def test_data_object_needs_an_object_field() -> None:
    obj = payment_intent(object=_ABSENT)
    assert refused(event(obj=obj)).pointer == "/data/object/object"
    obj = payment_intent(object=3)
    assert refused(event(obj=obj)).pointer == "/data/object/object"


def test_body_must_be_a_json_object() -> None:
    with pytest.raises(InvalidFieldError) as excinfo:
        parse_event(b"[]")
    assert excinfo.value.pointer == ""


def test_malformed_json_is_refused() -> None:
    with pytest.raises(MalformedJSONError):
        parse_event(b'{"id": "evt_1", "id": "evt_2"}')
    with pytest.raises(MalformedJSONError):
        parse_event(b"{not json")


def test_limits_are_applied() -> None:
    body = raw(event())
    with pytest.raises(PayloadTooLargeError):
        parse_event(body, limits=JSONLimits(max_bytes=len(body) - 1))
    assert parse_event(body, limits=JSONLimits(max_bytes=len(body))).id == "evt_1Pabc"
    with pytest.raises(MalformedJSONError):
        parse_event(body, limits=JSONLimits(max_depth=2))


# Livemode


def test_test_mode_event_on_a_live_endpoint_is_refused() -> None:
    with pytest.raises(LivemodeMismatchError) as excinfo:
        parse_event(raw(event(livemode=False)), livemode=True)
    assert "test-mode event reached a live-mode endpoint" in str(excinfo.value)


def test_live_event_on_a_test_endpoint_is_refused() -> None:
    with pytest.raises(LivemodeMismatchError) as excinfo:
        parse_event(raw(event(livemode=True)), livemode=False)
    assert "live-mode event reached a test-mode endpoint" in str(excinfo.value)


def test_matching_modes_and_no_mode_are_accepted() -> None:
    assert parse_event(raw(event(livemode=False)), livemode=False).livemode is False
    assert parse_event(raw(event(livemode=True))).livemode is True
    assert parse_event(raw(event(livemode=False))).livemode is False


# Object kind versus event type


@pytest.mark.parametrize(
    ("event_type", "obj"),
    [
        ("payment_intent.succeeded", charge()),
        ("charge.succeeded", payment_intent()),
        ("charge.refunded", refund()),
        ("charge.dispute.created", charge()),
        ("charge.refund.updated", charge()),
        ("refund.created", charge()),
        ("checkout.session.completed", payment_intent()),
        ("payment_intent.succeeded", {"id": "pi_1", "object": "invoice"}),
        ("charge.succeeded", {"id": "ch_1", "object": "other"}),
    ],
)
def test_object_that_does_not_match_its_event_type(event_type: str, obj: Any) -> None:
    error = refused(event(event_type, obj))
    assert error.pointer == "/data/object/object"
    assert error.problem == "does not match the event type"


# Snapshot fields


BAD_AMOUNTS = ["2000", 2000.0, 20.5, True, -1, None, [2000]]
AMOUNT_FIELDS = [
    ("payment_intent.succeeded", payment_intent, "amount"),
    ("payment_intent.succeeded", payment_intent, "amount_received"),
    ("charge.refunded", charge, "amount"),
    ("charge.refunded", charge, "amount_refunded"),
    ("charge.dispute.created", dispute, "amount"),
]


@pytest.mark.parametrize(
    ("event_type", "factory", "field", "amount"),
    [
        (*where, amount)
        for where in AMOUNT_FIELDS
        for amount in BAD_AMOUNTS
        # amount_received may be null: it is informational (see the test below).
        if not (where[2] == "amount_received" and amount is None)
    ],
)
def test_bad_amounts_are_refused(event_type: str, factory: Any, field: str, amount: Any) -> None:
    error = refused(event(event_type, factory(**{field: amount})))
    assert error.pointer == f"/data/object/{field}"


def test_amount_received_is_informational_and_may_be_absent() -> None:
    # Decisions use ``amount``; some Stripe fakes leave amount_received out.
    obj = payment_intent()
    del obj["amount_received"]
    parsed = parse_event(raw(event("payment_intent.created", obj)))
    assert isinstance(parsed.object, PaymentIntentSnapshot)
    assert parsed.object.amount_received == 0


@pytest.mark.parametrize("amount", ["2000", 2000.0, True, -1])
def test_bad_session_amount_total_is_refused(amount: Any) -> None:
    error = refused(event("checkout.session.completed", checkout_session(amount_total=amount)))
    assert error.pointer == "/data/object/amount_total"


def test_zero_amounts_are_accepted() -> None:
    obj = payment_intent(amount=0, amount_received=0)
    parsed = parse_event(raw(event("payment_intent.created", obj)))
    assert isinstance(parsed.object, PaymentIntentSnapshot)
    assert (parsed.object.amount, parsed.object.amount_received) == (0, 0)


@pytest.mark.parametrize("currency", ["USD", "us", "xxx", "", 840, None])
@pytest.mark.parametrize(
    ("event_type", "factory"),
    [
        ("payment_intent.succeeded", payment_intent),
        ("charge.succeeded", charge),
        ("charge.dispute.created", dispute),
    ],
)
def test_bad_currencies_are_refused(event_type: str, factory: Any, currency: Any) -> None:
    error = refused(event(event_type, factory(currency=currency)))
    assert error.pointer == "/data/object/currency"


@pytest.mark.parametrize("currency", ["USD", "xxx", 840])
def test_bad_session_currency_is_refused(currency: Any) -> None:
    error = refused(event("checkout.session.completed", checkout_session(currency=currency)))
    assert error.pointer == "/data/object/currency"


@pytest.mark.parametrize(
    ("event_type", "factory", "bad_id"),
    [
        ("payment_intent.succeeded", payment_intent, "ch_1"),
        ("payment_intent.succeeded", payment_intent, "pi 1"),
        ("payment_intent.succeeded", payment_intent, None),
        ("charge.succeeded", charge, "pi_1"),
        ("charge.succeeded", charge, 12),
        ("charge.dispute.created", dispute, "ch_1"),
        ("checkout.session.completed", checkout_session, "pi_1"),
    ],
)
def test_ids_need_their_prefix(event_type: str, factory: Any, bad_id: Any) -> None:
    error = refused(event(event_type, factory(id=bad_id)))
    assert error.pointer == "/data/object/id"


@pytest.mark.parametrize(
    ("event_type", "factory", "field", "value"),
    [
        ("charge.succeeded", charge, "payment_intent", "ch_1"),
        ("charge.succeeded", charge, "payment_intent", 5),
        ("charge.dispute.created", dispute, "payment_intent", "pi bad"),
        ("charge.dispute.created", dispute, "charge", "pi_1"),
        ("checkout.session.completed", checkout_session, "payment_intent", "cs_1"),
    ],
)
def test_related_ids_need_their_prefix(
    event_type: str, factory: Any, field: str, value: Any
) -> None:
    error = refused(event(event_type, factory(**{field: value})))
    assert error.pointer == f"/data/object/{field}"


def test_expanded_related_object_needs_its_id() -> None:
    obj = charge(payment_intent={"object": "payment_intent"})
    assert refused(event("charge.succeeded", obj)).pointer == "/data/object/payment_intent/id"
    obj = dispute(charge={"id": "pi_1", "object": "charge"})
    assert refused(event("charge.dispute.created", obj)).pointer == "/data/object/charge/id"


@pytest.mark.parametrize("status", ["Succeeded", "paid", "", None, 1])
def test_payment_intent_status_must_be_known(status: Any) -> None:
    error = refused(event(obj=payment_intent(status=status)))
    assert error.pointer == "/data/object/status"


@pytest.mark.parametrize(
    ("field", "value"),
    [("livemode", "false"), ("livemode", None), ("last_payment_error", "card_declined")],
)
def test_payment_intent_field_types(field: str, value: Any) -> None:
    error = refused(event(obj=payment_intent(**{field: value})))
    assert error.pointer == f"/data/object/{field}"


def test_payment_error_code_must_be_a_string() -> None:
    error = refused(event(obj=payment_intent(last_payment_error={"code": 402})))
    assert error.pointer == "/data/object/last_payment_error/code"


@pytest.mark.parametrize(
    ("field", "value"), [("refunded", "true"), ("refunded", None), ("status", 1), ("status", "")]
)
def test_charge_field_types(field: str, value: Any) -> None:
    error = refused(event("charge.succeeded", charge(**{field: value})))
    assert error.pointer == f"/data/object/{field}"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("payment_status", None),
        ("payment_status", 1),
        ("client_reference_id", 5),
        ("client_reference_id", "x" * 201),
    ],
)
def test_session_field_types(field: str, value: Any) -> None:
    error = refused(event("checkout.session.completed", checkout_session(**{field: value})))
    assert error.pointer == f"/data/object/{field}"


def test_dispute_status_must_be_a_string() -> None:
    error = refused(event("charge.dispute.updated", dispute(status=None)))
    assert error.pointer == "/data/object/status"


# Metadata


def test_metadata_at_its_limits_is_accepted() -> None:
    metadata = {
        f"k{n:0>{MAX_METADATA_KEY_LENGTH - 1}}": "v" * MAX_METADATA_VALUE_LENGTH
        for n in range(MAX_METADATA_ENTRIES)
    }
    metadata["k" + "0" * (MAX_METADATA_KEY_LENGTH - 1)] = ""
    assert len(metadata) == MAX_METADATA_ENTRIES
    parsed = parse_event(raw(event(obj=payment_intent(metadata=metadata))))
    assert isinstance(parsed.object, PaymentIntentSnapshot)
    assert dict(parsed.object.metadata) == metadata
    assert parsed.order_id is None


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{n}": "v" for n in range(MAX_METADATA_ENTRIES + 1)},
        {"": "v"},
        {"k" * (MAX_METADATA_KEY_LENGTH + 1): "v"},
        {"order_id": "v" * (MAX_METADATA_VALUE_LENGTH + 1)},
        {"order_id": 42},
        {"order_id": None},
        {"order_id": {"nested": "x"}},
        "order_id=42",
        ["order_id"],
    ],
)
@pytest.mark.parametrize(
    ("event_type", "factory"),
    [
        ("payment_intent.succeeded", payment_intent),
        ("checkout.session.completed", checkout_session),
    ],
)
def test_bad_metadata_is_refused(event_type: str, factory: Any, metadata: Any) -> None:
    error = refused(event(event_type, factory(metadata=metadata)))
    assert error.pointer == "/data/object/metadata"


def test_snapshot_metadata_is_read_only_and_detached() -> None:
    source = {"order_id": "ord_1"}
    snapshot = PaymentIntentSnapshot(
        id="pi_1",
        status="succeeded",
        amount=1,
        amount_received=1,
        currency="usd",
        livemode=False,
        metadata=source,
        last_payment_error_code=None,
    )
    source["order_id"] = "ord_2"
    assert snapshot.metadata["order_id"] == "ord_1"
    with pytest.raises(TypeError):
        cast("Any", snapshot.metadata)["order_id"] = "ord_3"
    parsed = parse_event(raw(event("checkout.session.completed", checkout_session())))
    assert isinstance(parsed.object, CheckoutSessionSnapshot)
    with pytest.raises(TypeError):
        cast("Any", parsed.object.metadata)["order_id"] = "x"


def test_events_and_snapshots_are_hashable_and_equal_by_value() -> None:
    for body in (
        event(),
        event("checkout.session.completed", checkout_session()),
        event("charge.refunded", charge()),
    ):
        first, second = parse_event(raw(body)), parse_event(raw(body))
        assert first == second
        assert hash(first) == hash(second)
        assert len({first, second}) == 1
    other = parse_event(raw(event(obj=payment_intent(metadata={"order_id": "other"}))))
    assert other != parse_event(raw(event()))


# Nothing from the body reaches an error message

SECRET_MARK = "Zq9SECRETzq9"


@pytest.mark.parametrize(
    "body",
    [
        event(id=f"evt {SECRET_MARK}"),
        event(type=f"{SECRET_MARK}.Bad"),
        event(account=SECRET_MARK),
        event(request={"idempotency_key": f"{SECRET_MARK}\u00e9"}),
        event(request=f"req {SECRET_MARK}"),
        event(obj=payment_intent(id=SECRET_MARK)),
        event(obj=payment_intent(status=SECRET_MARK)),
        event(obj=payment_intent(currency=SECRET_MARK)),
        event(obj=payment_intent(amount=SECRET_MARK)),
        event(obj=payment_intent(metadata={SECRET_MARK * 4: "v"})),
        event(obj=payment_intent(metadata={"k": SECRET_MARK * 50})),
        event(obj=payment_intent(metadata={SECRET_MARK: 1})),
        event("charge.succeeded", charge(payment_intent=f"pi {SECRET_MARK}")),
        event("charge.succeeded", {"id": "ch_1", "object": SECRET_MARK}),
    ],
)
def test_refusals_never_echo_the_body(body: dict[str, Any]) -> None:
    error = refused(body)
    assert SECRET_MARK not in str(error)
    assert SECRET_MARK not in error.pointer
    assert SECRET_MARK.encode() not in error.problem_json()


# Properties

_amounts = st.integers(min_value=0, max_value=10**12)
_ids = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)
_metadata = st.dictionaries(
    st.text(min_size=1, max_size=MAX_METADATA_KEY_LENGTH),
    st.text(max_size=MAX_METADATA_VALUE_LENGTH),
    max_size=MAX_METADATA_ENTRIES,
)


@given(
    suffix=_ids,
    amounts=st.tuples(_amounts, _amounts),
    status=st.sampled_from(sorted(PAYMENT_INTENT_STATUSES)),
    metadata=_metadata,
    livemode=st.booleans(),
)
def test_payment_intent_round_trip(
    suffix: str,
    amounts: tuple[int, int],
    status: str,
    metadata: dict[str, str],
    livemode: bool,
) -> None:
    amount, received = amounts
    created = amount
    obj = payment_intent(
        id=f"pi_{suffix}",
        amount=amount,
        amount_received=received,
        status=status,
        metadata=metadata,
        livemode=livemode,
    )
    body = event(obj=obj, livemode=livemode, created=created, id=f"evt_{suffix}")
    parsed = parse_event(raw(body), livemode=livemode)
    assert parsed.id == f"evt_{suffix}"
    assert parsed.created == created
    assert parsed.object == PaymentIntentSnapshot(
        id=f"pi_{suffix}",
        status=status,
        amount=amount,
        amount_received=received,
        currency="usd",
        livemode=livemode,
        metadata=metadata,
        last_payment_error_code=None,
    )
    assert parsed.order_id == metadata.get("order_id")


@given(
    amount=st.one_of(
        st.integers(max_value=-1),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(),
        st.booleans(),
    )
)
def test_no_non_integer_or_negative_amount_is_ever_accepted(amount: Any) -> None:
    error = refused(event("charge.succeeded", charge(amount=amount)))
    assert error.pointer == "/data/object/amount"


@given(event_type=st.from_regex(r"[a-z][a-z0-9_]{0,20}(\.[a-z0-9_]{1,20}){0,3}", fullmatch=True))
def test_types_outside_idempay_are_never_refused_for_their_object(event_type: str) -> None:
    body = event(event_type, {"id": "obj_1", "object": "thing", "anything": [1, None, {"x": 2.5}]})
    prefixes = ("payment_intent.", "charge.", "refund.", "checkout.session.")
    if event_type.startswith(prefixes):
        assert refused(body).pointer == "/data/object/object"
    else:
        parsed = parse_event(raw(body))
        assert parsed.object is None
        assert parsed.object_type is ObjectType.OTHER
        assert parsed.object_id == "obj_1"
