from __future__ import annotations

import dataclasses
import json
import random
import string
from enum import IntEnum, StrEnum

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempay.core.keys import (
    MAX_KEY_LENGTH,
    Scope,
    canonical_json,
    key_digest,
    parse_key_header,
    request_fingerprint,
    validate_key,
)
from idempay.core.strictjson import JSONLimits, JSONValue, loads
from idempay.errors import (
    ConfigurationError,
    IdempotencyKeyError,
    MalformedJSONError,
    MissingIdempotencyKeyError,
)

SECRET = "s3cr3t-key"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def key_error(value: str | None, *, header: bool = False) -> IdempotencyKeyError:
    parse = parse_key_header if header else validate_key
    with pytest.raises(IdempotencyKeyError) as info:
        parse(value)
    assert info.value.status == 400
    return info.value


# --- validate_key -------------------------------------------------------------------------


def test_missing_key() -> None:
    error = key_error(None)
    assert isinstance(error, MissingIdempotencyKeyError)
    assert error.code == "missing_idempotency_key"


def test_empty_key_is_invalid_not_missing() -> None:
    error = key_error("")
    assert not isinstance(error, MissingIdempotencyKeyError)
    assert error.code == "invalid_idempotency_key"
    assert "empty" in error.detail


def test_longest_key_is_accepted_unchanged() -> None:
    key = "k" * MAX_KEY_LENGTH
    assert MAX_KEY_LENGTH == 255
    assert validate_key(key) is key


def test_too_long_key_is_refused_not_truncated() -> None:
    error = key_error("k" * (MAX_KEY_LENGTH + 1))
    assert "255" in error.detail
    assert "longer" in error.detail


@pytest.mark.parametrize(
    ("key", "position"),
    [
        ("\x00abc", 1),
        ("ab\x00c", 3),
        ("abc\x00", 4),
        ("\tabc", 1),
        ("ab\tc", 3),
        ("abc\n", 4),
        ("a\r\nb", 2),
        ("ab\x1bc", 3),
        ("\x7fabc", 1),
        ("abc\x7f", 4),
    ],
)
def test_control_characters_are_refused(key: str, position: int) -> None:
    error = key_error(key)
    assert error.detail == f"the idempotency key has a control character at position {position}"


@pytest.mark.parametrize(
    ("key", "position"),
    [
        ("caf\u00e9", 4),
        ("\u0430bc", 1),  # Cyrillic a
        ("ab\uff43", 3),  # fullwidth c
        ("a\u00a0b", 2),  # no-break space
        ("a\u200bb", 2),  # zero-width space
        ("key-\U0001f600", 5),
        ("\x80", 1),
    ],
)
def test_non_ascii_characters_are_refused(key: str, position: int) -> None:
    error = key_error(key)
    assert error.detail == f"the idempotency key has a non-ASCII character at position {position}"


@pytest.mark.parametrize(("key", "where"), [(" abc", "starts"), ("abc ", "ends"), (" ", "starts")])
def test_leading_and_trailing_spaces_are_refused(key: str, where: str) -> None:
    assert key_error(key).detail == f"the idempotency key {where} with a space"


def test_printable_ascii_with_inner_spaces_is_accepted() -> None:
    key = PRINTABLE.strip()
    assert validate_key(key) == key
    assert validate_key("a b") == "a b"
    assert validate_key("!") == "!"


def test_case_is_preserved() -> None:
    assert validate_key("AbC-123") == "AbC-123"
    assert validate_key("abc-123") == "abc-123"


def test_detail_never_contains_the_key() -> None:
    for key in (f"{SECRET}\x00", f"{SECRET}é", SECRET * 30, f" {SECRET}"):
        error = key_error(key)
        assert SECRET not in error.detail
        assert SECRET.encode() not in error.problem_json()


valid_keys = st.text(alphabet=PRINTABLE, min_size=1, max_size=MAX_KEY_LENGTH).filter(
    lambda k: k == k.strip(" ")
)


@given(valid_keys)
def test_valid_keys_come_back_unchanged(key: str) -> None:
    assert validate_key(key) == key


@given(st.text(min_size=1, max_size=MAX_KEY_LENGTH), st.characters())
def test_keys_with_a_character_outside_printable_ascii_are_refused(key: str, bad: str) -> None:
    if " " <= bad <= "~":
        bad = "\x00"
    with pytest.raises(IdempotencyKeyError):
        validate_key(key[: len(key) // 2] + bad + key[len(key) // 2 :])


# --- parse_key_header ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, ""])
def test_missing_header(value: str | None) -> None:
    assert isinstance(key_error(value, header=True), MissingIdempotencyKeyError)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("abc-123", "abc-123"),
        ('"abc-123"', "abc-123"),
        ('"a\\"b"', 'a"b'),
        ('"a\\\\b"', "a\\b"),
        ('"\\\\"', "\\"),
        ('"a b"', "a b"),
        ('ab"c', 'ab"c'),
        ('abc"', 'abc"'),
        ("a\\b", "a\\b"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
    ],
)
def test_header_forms(value: str, key: str) -> None:
    assert parse_key_header(value) == key


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('"abc', "no closing quote"),
        ('"', "no closing quote"),
        ('"abc\\"', "no closing quote"),
        ('"abc\\', "escape"),
        ('"a\\nb"', "escape"),
        ('"a\\u0041"', "escape"),
        ('"abc"x', "after the closing quote"),
        ('"abc" ', "after the closing quote"),
        ('"a""b"', "after the closing quote"),
    ],
)
def test_malformed_quoted_header(value: str, fragment: str) -> None:
    assert fragment in key_error(value, header=True).detail


def test_quoted_header_is_validated_after_unwrapping() -> None:
    assert parse_key_header('"' + "k" * 255 + '"') == "k" * 255
    assert "longer" in key_error('"' + "k" * 256 + '"', header=True).detail
    assert "empty" in key_error('""', header=True).detail
    assert "control" in key_error('"a\tb"', header=True).detail
    assert "non-ASCII" in key_error('"caf\u00e9"', header=True).detail
    assert "starts with a space" in key_error('" abc"', header=True).detail


def test_bare_header_is_validated_and_not_trimmed() -> None:
    assert "starts with a space" in key_error(" abc", header=True).detail
    assert "control" in key_error("abc\x00", header=True).detail
    assert "longer" in key_error("k" * 256, header=True).detail


@given(valid_keys)
def test_quoting_a_key_gives_the_same_key(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_key_header(quoted) == key
    if not key.startswith('"'):
        assert parse_key_header(key) == key


# --- Scope --------------------------------------------------------------------------------


def test_scope_encoding() -> None:
    assert Scope("checkout", "acme", "u42").encode() == "8:checkout|4:acme|3:u42"
    assert Scope("checkout").encode() == "8:checkout|0:|0:"
    assert Scope(operation="op", user="u").encode() == "2:op|0:|1:u"


def test_scope_is_frozen() -> None:
    scope = Scope("checkout")
    with pytest.raises(dataclasses.FrozenInstanceError):
        scope.tenant = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"operation": ""}, "Scope.operation must not be empty"),
        ({"operation": "o" * 256}, "Scope.operation must be at most 255"),
        ({"operation": "op", "tenant": "t" * 256}, "Scope.tenant must be at most 255"),
        ({"operation": "op", "user": "u" * 256}, "Scope.user must be at most 255"),
        ({"operation": "op\x00"}, "Scope.operation has a control character at position 3"),
        ({"operation": "op", "tenant": "\nt"}, "Scope.tenant has a control character"),
        ({"operation": "op", "user": "\u0430"}, "Scope.user has a non-ASCII character"),
        ({"operation": 1}, "Scope.operation must be a string"),
        ({"operation": "op", "tenant": None}, "Scope.tenant must be a string"),
        ({"operation": "op", "user": b"u"}, "Scope.user must be a string"),
    ],
)
def test_scope_validation(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        Scope(**kwargs)  # type: ignore[arg-type]


def test_scope_limits_are_inclusive() -> None:
    scope = Scope("o" * 255, "t" * 255, "u" * 255)
    assert scope.encode().startswith("255:")


# A small alphabet full of the separators makes colliding candidates likely.
components = st.text(alphabet="1:|a ", max_size=8)
scopes = st.builds(Scope, components.filter(bool), components, components)


@given(scopes, scopes)
def test_scope_encoding_is_injective(first: Scope, second: Scope) -> None:
    assert (first.encode() == second.encode()) == (first == second)


# --- key_digest ---------------------------------------------------------------------------


def test_key_digest_is_a_stable_hex_sha256() -> None:
    digest = key_digest(Scope("checkout"), "abc")
    assert len(digest) == 64
    assert set(digest) <= set(string.hexdigits.lower())
    assert digest == key_digest(Scope("checkout"), "abc")
    assert "abc" not in digest


def test_key_digest_separates_case_scope_and_boundaries() -> None:
    digests = {
        key_digest(Scope("checkout"), "abc"),
        key_digest(Scope("checkout"), "ABC"),
        key_digest(Scope("checkout"), "Abc"),
        key_digest(Scope("checkout", "acme"), "abc"),
        key_digest(Scope("checkout", "", "acme"), "abc"),
        key_digest(Scope("refund"), "abc"),
        key_digest(Scope("checkout", "a"), "bc"),
        key_digest(Scope("checkout", "", "a"), "bc"),
    }
    assert len(digests) == 8


def test_key_digest_accepts_any_string() -> None:
    # Refused keys are audited by digest too.
    assert len(key_digest(Scope("checkout"), "caf\u00e9\x00\ud800")) == 64
    assert key_digest(Scope("c"), "\ud800") != key_digest(Scope("c"), "\udc00")


@given(scopes, st.text(max_size=6), scopes, st.text(max_size=6))
def test_key_digest_is_injective(s1: Scope, k1: str, s2: Scope, k2: str) -> None:
    assert (key_digest(s1, k1) == key_digest(s2, k2)) == ((s1, k1) == (s2, k2))


# --- canonical_json -----------------------------------------------------------------------


class Color(StrEnum):
    RED = "red"


class Level(IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-12, b"-12"),
        (10**30, b"1000000000000000000000000000000"),
        (1.0, b"1.0"),
        (0.1, b"0.1"),
        (-0.0, b"-0.0"),
        (1e16, b"1e+16"),
        (1.5e-7, b"1.5e-07"),
        ("", b'""'),
        ("caf\u00e9 \U0001f600", '"caf\u00e9 \U0001f600"'.encode()),
        ('q"b\\s/\n\t\x00\x1f\x7f\u2028', b'"q\\"b\\\\s/\\n\\t\\u0000\\u001f\x7f\xe2\x80\xa8"'),
        ([], b"[]"),
        ({}, b"{}"),
        ([1, [2, [3]], {}], b"[1,[2,[3]],{}]"),
        (
            {"b": 1, "a": [True, None], "A": {"z": 0, "y": ""}},
            b'{"A":{"y":"","z":0},"a":[true,null],"b":1}',
        ),
        (
            {"\u00e9": 1, "z": 2, "\U0001f600": 3, "Z": 4},
            '{"Z":4,"z":2,"\u00e9":1,"\U0001f600":3}'.encode(),
        ),
        (Color.RED, b'"red"'),
        (Level.HIGH, b"3"),
        ({"c": Color.RED, "l": [Level.HIGH]}, b'{"c":"red","l":[3]}'),
    ],
)
def test_canonical_json_bytes(value: JSONValue, expected: bytes) -> None:
    assert canonical_json(value) == expected


def test_canonical_json_keeps_int_and_float_apart() -> None:
    assert canonical_json(1) != canonical_json(1.0)
    assert canonical_json(1) != canonical_json(True)
    assert canonical_json({"amount": 100}) != canonical_json({"amount": "100"})


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), [1, {"a": float("nan")}]],
)
def test_canonical_json_refuses_non_finite_floats(value: JSONValue) -> None:
    with pytest.raises(MalformedJSONError) as info:
        canonical_json(value)
    assert info.value.reason == "non_finite_number"


def test_canonical_json_refuses_huge_integers() -> None:
    with pytest.raises(MalformedJSONError) as info:
        canonical_json([10**5000])
    assert info.value.reason == "number_too_large"


@pytest.mark.parametrize("value", ["\ud800", {"\udc00": 1}, ["ok", "a\udfffb"]])
def test_canonical_json_refuses_lone_surrogates(value: JSONValue) -> None:
    with pytest.raises(MalformedJSONError) as info:
        canonical_json(value)
    assert info.value.reason == "invalid_string"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ((1, 2), "tuple is not a JSON value"),
        ({"a": {1, 2}}, "set is not a JSON value"),
        ([b"bytes"], "bytes is not a JSON value"),
        ({1: "a"}, "key must be a str, not a int"),
        ({"a": {None: 1}}, "key must be a str, not a NoneType"),
    ],
)
def test_canonical_json_refuses_non_json_values(value: object, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        canonical_json(value)  # type: ignore[arg-type]


def test_canonical_json_refuses_cycles() -> None:
    items: list[JSONValue] = [1]
    items.append(items)
    with pytest.raises(ConfigurationError, match="contain itself"):
        canonical_json(items)
    members: dict[str, JSONValue] = {}
    members["self"] = {"again": members}
    with pytest.raises(ConfigurationError, match="contain itself"):
        canonical_json(members)


def test_canonical_json_allows_shared_non_cyclic_values() -> None:
    shared: list[JSONValue] = [1]
    assert canonical_json([shared, shared, {"a": shared}]) == b'[[1],[1],{"a":[1]}]'


def test_canonical_json_handles_deep_values_without_recursion() -> None:
    value: JSONValue = []
    for _ in range(100_000):
        value = [value]
    encoded = canonical_json(value)
    assert encoded == b"[" * 100_001 + b"]" * 100_001


finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5)
    ),
    max_leaves=30,
)


def shuffled(value: JSONValue, rng: random.Random) -> JSONValue:
    if isinstance(value, list):
        return [shuffled(item, rng) for item in value]
    if isinstance(value, dict):
        names = list(value)
        rng.shuffle(names)
        return {name: shuffled(value[name], rng) for name in names}
    return value


@given(finite_json, st.randoms(use_true_random=False))
def test_canonical_json_ignores_key_order(value: JSONValue, rng: random.Random) -> None:
    assert canonical_json(shuffled(value, rng)) == canonical_json(value)


@given(finite_json)
def test_canonical_json_round_trips_through_loads(value: JSONValue) -> None:
    encoded = canonical_json(value)
    decoded = loads(encoded, limits=JSONLimits(max_bytes=10**7, max_depth=1000))
    assert decoded == value
    assert canonical_json(decoded) == encoded


@given(finite_json)
def test_canonical_json_is_compact_sorted_json(value: JSONValue) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical_json(value) == expected.encode()


# --- request_fingerprint ------------------------------------------------------------------

BODY: dict[str, JSONValue] = {"order_id": "ord-42", "amount": 1000, "currency": "usd"}


def test_fingerprint_is_stable_hex() -> None:
    fingerprint = request_fingerprint("POST", "/checkout", BODY)
    assert len(fingerprint) == 64
    assert set(fingerprint) <= set(string.hexdigits.lower())
    assert fingerprint == request_fingerprint("POST", "/checkout", dict(reversed(BODY.items())))


def test_fingerprint_upper_cases_the_method() -> None:
    assert request_fingerprint("post", "/checkout", BODY) == request_fingerprint(
        "POST", "/checkout", BODY
    )
    assert request_fingerprint("PUT", "/checkout", BODY) != request_fingerprint(
        "POST", "/checkout", BODY
    )


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/checkout/", BODY),
        ("/Checkout", BODY),
        ("/checkout?x=1", BODY),
        ("/checkout", {**BODY, "amount": 1001}),
        ("/checkout", {**BODY, "amount": 1000.0}),
        ("/checkout", {**BODY, "amount": "1000"}),
        ("/checkout", {**BODY, "order_id": "ORD-42"}),
        ("/checkout", {**BODY, "extra": None}),
        ("/checkout", None),
        ("/checkout", [BODY]),
    ],
)
def test_fingerprint_changes_with_any_difference(route: str, body: JSONValue) -> None:
    assert request_fingerprint("POST", route, body) != request_fingerprint(
        "POST", "/checkout", BODY
    )


def test_fingerprint_fields_are_unambiguous() -> None:
    assert request_fingerprint("POST", "/a", "b") != request_fingerprint("POS", "/a", "b")
    assert request_fingerprint("GET", "/ab", None) != request_fingerprint("GET", "/a", "b")


def test_ignore_drops_top_level_members_only() -> None:
    base = request_fingerprint("POST", "/checkout", BODY)
    with_timestamp = {**BODY, "client_time": "2024-01-01T00:00:00Z"}
    assert request_fingerprint("POST", "/checkout", with_timestamp, ignore={"client_time"}) == base
    assert request_fingerprint("POST", "/checkout", with_timestamp) != base
    assert request_fingerprint("POST", "/checkout", BODY, ignore=["client_time"]) == base
    nested: dict[str, JSONValue] = {**BODY, "meta": {"client_time": 1}}
    assert request_fingerprint(
        "POST", "/checkout", nested, ignore=("client_time",)
    ) != request_fingerprint("POST", "/checkout", {**BODY, "meta": {}}, ignore=("client_time",))


def test_ignore_has_no_effect_on_non_objects() -> None:
    assert request_fingerprint("POST", "/x", ["a"], ignore={"a"}) == request_fingerprint(
        "POST", "/x", ["a"]
    )


def test_ignore_does_not_modify_the_body() -> None:
    body: dict[str, JSONValue] = {"a": 1, "t": 2}
    request_fingerprint("POST", "/x", body, ignore={"t"})
    assert body == {"a": 1, "t": 2}


@pytest.mark.parametrize(
    ("method", "route", "fragment"),
    [
        ("", "/x", "method"),
        ("PO ST", "/x", "method"),
        ("GET1", "/x", "method"),
        ("M-SEARCH", "/x", "method"),
        ("G\u00cbT", "/x", "method"),
        ("POST", "", "route"),
        ("POST", "checkout", "route"),
        ("POST", " /checkout", "route"),
    ],
)
def test_fingerprint_configuration_errors(method: str, route: str, fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        request_fingerprint(method, route, BODY)


def test_fingerprint_refuses_a_string_as_ignore() -> None:
    with pytest.raises(ConfigurationError, match="ignore"):
        request_fingerprint("POST", "/x", BODY, ignore="amount")


def test_fingerprint_refuses_non_finite_bodies() -> None:
    with pytest.raises(MalformedJSONError):
        request_fingerprint("POST", "/x", {"amount": float("nan")})
