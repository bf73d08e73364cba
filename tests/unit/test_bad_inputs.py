"""The catalogue of bad inputs (design/SCENARIOS.md, "Bad input") that the core can see.

Each case goes through the path a real webhook takes, signature check then strict parsing, and
must end in its typed error: a 4xx, never a crash, and never a message that echoes the input.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from idempay.core.events import StripeEvent, parse_event
from idempay.core.keys import Scope, parse_key_header, request_fingerprint, validate_key
from idempay.core.signature import sign_payload, verify_signature
from idempay.errors import (
    IdempotencyKeyError,
    InvalidFieldError,
    LivemodeMismatchError,
    MalformedJSONError,
    MissingIdempotencyKeyError,
    PayloadTooLargeError,
    RequestError,
    SignatureVerificationError,
)

SECRET = "whsec_catalogue"
NOW = 1_767_225_600


def pi_event(**object_fields: Any) -> dict[str, Any]:
    obj = {
        "id": "pi_1",
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 1999,
        "amount_received": 1999,
        "currency": "eur",
        "livemode": False,
        "metadata": {"order_id": "o1"},
    } | object_fields
    return {
        "id": "evt_1",
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": NOW,
        "livemode": False,
        "data": {"object": obj},
    }


def receive(raw: bytes, header: str | None = "sign", *, live: bool = False) -> StripeEvent:
    """What a webhook endpoint does before anything is written."""
    if header == "sign":
        header = sign_payload(raw, SECRET, timestamp=NOW)
    verify_signature(raw, header, [SECRET], now=NOW)
    return parse_event(raw, livemode=live)


def body(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


VALID = body(pi_event())
T = f"t={NOW}"
V1 = "v1=" + "a" * 64

CASES: list[tuple[str, Callable[[], object], type[RequestError], str | None]] = [
    ("malformed JSON", lambda: receive(b"{not json}"), MalformedJSONError, "syntax"),
    ("truncated body", lambda: receive(VALID[:-7]), MalformedJSONError, "syntax"),
    ("trailing garbage", lambda: receive(VALID + b"}{"), MalformedJSONError, "syntax"),
    (
        "NaN",
        lambda: receive(VALID.replace(b'"amount": 1999', b'"amount": NaN')),
        MalformedJSONError,
        "non_finite_number",
    ),
    (
        "Infinity",
        lambda: receive(VALID.replace(b'"amount": 1999', b'"amount": -Infinity')),
        MalformedJSONError,
        "non_finite_number",
    ),
    (
        "duplicate keys",
        lambda: receive(VALID.replace(b'"amount": 1999', b'"amount": 1999, "amount": 1')),
        MalformedJSONError,
        "duplicate_key",
    ),
    ("deeply nested", lambda: receive(b"[" * 5000 + b"]" * 5000), MalformedJSONError, "too_deep"),
    (
        "not UTF-8, validly signed",
        lambda: receive(VALID.replace(b"o1", b"o\xff")),
        MalformedJSONError,
        "encoding",
    ),
    (
        "missing signature",
        lambda: receive(VALID, None),
        SignatureVerificationError,
        "missing_header",
    ),
    ("empty signature", lambda: receive(VALID, ""), SignatureVerificationError, "missing_header"),
    (
        "malformed signature",
        lambda: receive(VALID, "garbage"),
        SignatureVerificationError,
        "malformed_header",
    ),
    (
        "only unknown schemes",
        lambda: receive(VALID, f"{T},v0={'a' * 64},v9=zz"),
        SignatureVerificationError,
        "no_signatures",
    ),
    (
        "absurd number of signatures",
        lambda: receive(VALID, ",".join([T] + [V1] * 40)),
        SignatureVerificationError,
        "too_many_signatures",
    ),
    (
        "absurdly long signature header",
        lambda: receive(VALID, ",".join([T] + [V1] * 1000)),
        SignatureVerificationError,
        "malformed_header",
    ),
    (
        "timestamp not digits only",
        lambda: receive(VALID, f"t=+{NOW},{V1}"),
        SignatureVerificationError,
        "malformed_header",
    ),
    (
        "timestamp in other digits",
        lambda: receive(VALID, f"t=\u0661\u0662\u0663,{V1}"),
        SignatureVerificationError,
        "malformed_header",
    ),
    (
        "replayed after the tolerance window",
        lambda: verify_signature(
            VALID, sign_payload(VALID, SECRET, timestamp=NOW - 301), [SECRET], now=NOW
        ),
        SignatureVerificationError,
        "timestamp_outside_tolerance",
    ),
    (
        "body too large",
        lambda: receive(b'{"pad":"' + b"x" * 300_000 + b'"}'),
        PayloadTooLargeError,
        None,
    ),
    (
        "missing required field",
        lambda: receive(body({k: v for k, v in pi_event().items() if k != "type"})),
        InvalidFieldError,
        None,
    ),
    ("amount as a string", lambda: receive(body(pi_event(amount="1999"))), InvalidFieldError, None),
    ("amount as a float", lambda: receive(body(pi_event(amount=19.99))), InvalidFieldError, None),
    ("negative amount", lambda: receive(body(pi_event(amount=-1))), InvalidFieldError, None),
    ("amount as a boolean", lambda: receive(body(pi_event(amount=True))), InvalidFieldError, None),
    ("unknown currency", lambda: receive(body(pi_event(currency="xyz"))), InvalidFieldError, None),
    (
        "object not what its type says",
        lambda: receive(body(pi_event(object="charge"))),
        InvalidFieldError,
        None,
    ),
    (
        "test-mode event on a live endpoint",
        lambda: receive(VALID, live=True),
        LivemodeMismatchError,
        None,
    ),
    (
        "live event on a test endpoint",
        lambda: receive(body(pi_event() | {"livemode": True})),
        LivemodeMismatchError,
        None,
    ),
    ("id with NUL", lambda: receive(body(pi_event(id="pi_1\x00"))), InvalidFieldError, None),
    (
        "id with a control character",
        lambda: receive(body(pi_event(id="pi_\n1"))),
        InvalidFieldError,
        None,
    ),
    (
        "id with a non-ASCII look-alike",
        lambda: receive(body(pi_event(id="pi_\u0430bc"))),  # Cyrillic a
        InvalidFieldError,
        None,
    ),
    ("missing idempotency key", lambda: parse_key_header(None), MissingIdempotencyKeyError, None),
    ("empty idempotency key", lambda: parse_key_header('""'), IdempotencyKeyError, None),
    ("idempotency key over 255", lambda: validate_key("k" * 256), IdempotencyKeyError, None),
    ("control character in a key", lambda: validate_key("k\x07ey"), IdempotencyKeyError, None),
]


@pytest.mark.parametrize(
    ("what", "attempt", "error", "reason"), CASES, ids=[case[0] for case in CASES]
)
def test_bad_input_gets_its_typed_client_error(
    what: str, attempt: Callable[[], object], error: type[RequestError], reason: str | None
) -> None:
    with pytest.raises(error) as caught:
        attempt()
    assert 400 <= caught.value.status < 500, what
    if reason is not None:
        assert getattr(caught.value, "reason", None) == reason
    rendered = caught.value.problem_json().decode()
    for secret_or_value in (SECRET, "1999", "o\xff", "xyz"):
        assert secret_or_value not in rendered


def test_the_valid_event_passes_the_same_path() -> None:
    event = receive(VALID)
    assert (event.id, event.payment_intent_id, event.order_id) == ("evt_1", "pi_1", "o1")


def test_keys_differing_only_in_case_stay_different() -> None:
    assert validate_key("Order-1") != validate_key("order-1")
    scope = Scope(operation="checkout")
    assert scope.encode() == Scope(operation="checkout").encode()


def test_client_supplied_status_and_timestamps_do_not_change_the_decision() -> None:
    base = {"order_id": "o1", "amount": 1999, "currency": "eur"}
    noisy = base | {"status": "paid", "created_at": "2020-01-01T00:00:00Z"}
    ignore = ("status", "created_at")
    assert request_fingerprint("POST", "/checkout", base, ignore=ignore) == request_fingerprint(
        "POST", "/checkout", noisy, ignore=ignore
    )
    # A change that matters (the amount) still changes the fingerprint.
    assert request_fingerprint(
        "POST", "/checkout", base | {"amount": 1}, ignore=ignore
    ) != request_fingerprint("POST", "/checkout", base, ignore=ignore)
