"""The exception tree: one root, HTTP statuses and stable codes, problem+json rendering."""

from __future__ import annotations

import inspect
import json
import re

import pytest

from idempay import errors
from idempay.errors import (
    PROBLEM_CONTENT_TYPE,
    ConfigurationError,
    FingerprintMismatchError,
    IdempayError,
    IdempotencyKeyError,
    InvalidFieldError,
    MalformedJSONError,
    MethodNotAllowedError,
    MissingDependencyError,
    MissingIdempotencyKeyError,
    OrderNotFoundError,
    PayloadTooLargeError,
    RequestError,
    RequestInFlightError,
    ServiceUnavailableError,
    SignatureVerificationError,
    TransientStoreError,
)

PUBLIC_CLASSES = [
    obj
    for name, obj in vars(errors).items()
    if inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
]


def test_every_exception_has_the_one_root() -> None:
    assert PUBLIC_CLASSES
    for cls in PUBLIC_CLASSES:
        assert issubclass(cls, IdempayError), cls


def test_the_tree_in_the_docstring_names_every_class() -> None:
    doc = errors.__doc__ or ""
    tree = doc[doc.index("IdempayError") :]
    drawn = set(re.findall(r"^[\s│├└─]*([A-Z][A-Za-z]+Error)\b", tree, flags=re.MULTILINE))
    assert drawn == {cls.__name__ for cls in PUBLIC_CLASSES}


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__, key=lambda n: (not n.isupper(), n))
    exported = {name for name in errors.__all__ if name != "PROBLEM_CONTENT_TYPE"}
    assert exported == {cls.__name__ for cls in PUBLIC_CLASSES}


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (MissingIdempotencyKeyError(), 400, "missing_idempotency_key"),
        (IdempotencyKeyError("too long"), 400, "invalid_idempotency_key"),
        (RequestInFlightError(retry_after=3), 409, "request_in_flight"),
        (FingerprintMismatchError(), 422, "idempotency_key_reused"),
        (MalformedJSONError(reason="duplicate_key"), 400, "malformed_json"),
        (PayloadTooLargeError(limit=10), 413, "payload_too_large"),
        (InvalidFieldError("/amount", "must be an integer"), 400, "invalid_field"),
        (SignatureVerificationError(reason="no_match"), 400, "invalid_signature"),
        (MethodNotAllowedError(), 405, "method_not_allowed"),
        (OrderNotFoundError(), 404, "order_not_found"),
        (ServiceUnavailableError(retry_after=5), 503, "service_unavailable"),
    ],
)
def test_http_errors_render_as_problem_json(error: RequestError, status: int, code: str) -> None:
    assert (error.status, error.code) == (status, code)
    problem = json.loads(error.problem_json(instance="/checkout"))
    assert problem["status"] == status
    assert problem["code"] == code
    assert problem["type"] == f"urn:idempay:problem:{code}"
    assert problem["instance"] == "/checkout"
    assert problem["title"] == error.title
    assert problem["detail"]
    assert PROBLEM_CONTENT_TYPE == "application/problem+json"


def test_problem_members_and_headers() -> None:
    assert RequestInFlightError(retry_after=3).headers() == {"Retry-After": "3"}
    assert ServiceUnavailableError().headers() == {"Retry-After": "1"}
    assert MethodNotAllowedError(allowed=("GET", "POST")).headers() == {"Allow": "GET, POST"}
    assert IdempotencyKeyError().headers() == {}
    assert InvalidFieldError("/a/b", "is required").to_problem()["pointer"] == "/a/b"
    assert str(InvalidFieldError("", "expected a JSON object")) == "/: expected a JSON object"
    assert MalformedJSONError(reason="too_deep").to_problem()["reason"] == "too_deep"
    assert PayloadTooLargeError(limit=64).to_problem()["limit"] == 64
    assert SignatureVerificationError(reason="no_match").to_problem()["reason"] == "no_match"
    assert "instance" not in IdempotencyKeyError().to_problem()
    assert IdempotencyKeyError().detail == IdempotencyKeyError.title


def test_negative_retry_after_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        RequestInFlightError(retry_after=-1)


def test_dependency_and_store_errors_carry_their_facts() -> None:
    missing = MissingDependencyError("redis", "redis")
    assert isinstance(missing, ImportError)
    assert "pip install 'idempay[redis]'" in str(missing)
    assert isinstance(ConfigurationError("x"), ValueError)
    transient = TransientStoreError("deadlock", attempts=5)
    assert transient.attempts == 5
    assert "5 attempts" in str(transient)
