"""IdempayError.fingerprint: one stable grouping key per cause, whatever the request."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import pytest

from idempay import errors
from idempay.core.keys import validate_key
from idempay.core.strictjson import loads
from idempay.errors import (
    IdempayError,
    IdempotencyKeyError,
    InvalidFieldError,
    MalformedJSONError,
    MissingDependencyError,
    PayloadTooLargeError,
    RequestError,
    SignatureVerificationError,
    TransientStoreError,
)

# How to make each error that needs arguments; the others take a message or nothing.
MAKERS: dict[type[IdempayError], Callable[[], IdempayError]] = {
    MissingDependencyError: lambda: MissingDependencyError("redis", "redis"),
    InvalidFieldError: lambda: InvalidFieldError("/amount", "must be an integer"),
    PayloadTooLargeError: lambda: PayloadTooLargeError(limit=1024),
    SignatureVerificationError: lambda: SignatureVerificationError(reason="no_match"),
    TransientStoreError: lambda: TransientStoreError("deadlock", attempts=3),
}

CLASSES = sorted(
    (
        obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, IdempayError) and not name.startswith("_")
    ),
    key=lambda cls: cls.__name__,
)


def make(cls: type[IdempayError]) -> IdempayError:
    maker = MAKERS.get(cls)
    return maker() if maker is not None else cls("something went wrong")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_error_has_a_fingerprint_of_short_constant_strings(cls: type[IdempayError]) -> None:
    fingerprint = make(cls).fingerprint
    assert fingerprint[:2] == ("idempay", cls.__name__)
    assert all(isinstance(part, str) for part in fingerprint)
    if issubclass(cls, RequestError):
        assert fingerprint[2] == cls.code
    else:
        assert fingerprint[2:] == ("",)


def test_different_classes_never_share_a_fingerprint() -> None:
    fingerprints = [make(cls).fingerprint for cls in CLASSES]
    assert len(set(fingerprints)) == len(CLASSES)


def test_the_fingerprint_ignores_what_the_request_carried() -> None:
    # Two keys refused for the same rule at different positions: one issue.
    with pytest.raises(IdempotencyKeyError) as first:
        validate_key("abc\x01")
    with pytest.raises(IdempotencyKeyError) as second:
        validate_key("a\x01bcdefgh")
    assert str(first.value) != str(second.value)
    assert first.value.fingerprint == second.value.fingerprint
    # Two bodies broken at different places: one issue per rule broken.
    with pytest.raises(MalformedJSONError) as early:
        loads(b'{"a": }')
    with pytest.raises(MalformedJSONError) as late:
        loads(b'{"a": 1, "b": [1, 2,, 3]}')
    with pytest.raises(MalformedJSONError) as duplicate:
        loads(b'{"a": 1, "a": 2}')
    assert early.value.fingerprint == late.value.fingerprint
    assert early.value.fingerprint == ("idempay", "MalformedJSONError", "malformed_json", "syntax")
    assert duplicate.value.fingerprint[-1] == "duplicate_key"


def test_a_signature_failure_is_grouped_by_its_reason() -> None:
    missing = SignatureVerificationError(reason="missing_header").fingerprint
    forged = SignatureVerificationError("another detail", reason="no_match").fingerprint
    assert missing == (
        "idempay",
        "SignatureVerificationError",
        "invalid_signature",
        "missing_header",
    )
    assert forged[-1] == "no_match"
    assert missing != forged


def test_a_too_large_body_is_refused_with_a_constant_message() -> None:
    small, large = PayloadTooLargeError(limit=10), PayloadTooLargeError(limit=10_000)
    assert str(small) == str(large)
    assert small.to_problem()["limit"] == 10
