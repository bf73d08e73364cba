from __future__ import annotations

import json
import string
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from idempay.core.strictjson import (
    CURRENCIES,
    DEFAULT_LIMITS,
    MAX_INTEGER_DIGITS,
    JSONLimits,
    JSONValue,
    ObjectReader,
    loads,
    loads_object,
)
from idempay.errors import (
    ConfigurationError,
    InvalidFieldError,
    MalformedJSONError,
    PayloadTooLargeError,
)

SECRET = "s3cr3t-marker"


def malformed(raw: bytes, *, limits: JSONLimits = DEFAULT_LIMITS) -> MalformedJSONError:
    with pytest.raises(MalformedJSONError) as info:
        loads(raw, limits=limits)
    return info.value


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# --- limits -------------------------------------------------------------------------------


def test_default_limits() -> None:
    assert JSONLimits(max_bytes=262_144, max_depth=32) == DEFAULT_LIMITS


@pytest.mark.parametrize("value", [0, -1, True, False])
def test_limits_must_be_positive_integers(value: int) -> None:
    with pytest.raises(ConfigurationError, match="max_bytes"):
        JSONLimits(max_bytes=value)
    with pytest.raises(ConfigurationError, match="max_depth"):
        JSONLimits(max_depth=value)


def test_smallest_limits_are_accepted() -> None:
    limits = JSONLimits(max_bytes=1, max_depth=1)
    assert loads(b"1", limits=limits) == 1


# --- size ---------------------------------------------------------------------------------


def test_body_at_the_limit_is_accepted() -> None:
    body = b'"' + b"a" * 98 + b'"'
    assert loads(body, limits=JSONLimits(max_bytes=100)) == "a" * 98


def test_oversized_body_is_refused_before_decoding() -> None:
    # Not UTF-8 and not JSON either: the size is checked first.
    with pytest.raises(PayloadTooLargeError) as info:
        loads(b"\xff" * 101, limits=JSONLimits(max_bytes=100))
    assert info.value.limit == 100
    assert info.value.status == 413


def test_default_size_limit() -> None:
    with pytest.raises(PayloadTooLargeError):
        loads(b" " * (DEFAULT_LIMITS.max_bytes + 1))


# --- encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'"\xff"', id="invalid-byte"),
        pytest.param(b"\xff", id="lone-ff"),
        pytest.param(b'"\xc0\xaf"', id="overlong-2"),
        pytest.param(b'"\xe0\x80\xaf"', id="overlong-3"),
        pytest.param(b'"\xf0\x80\x80\xaf"', id="overlong-4"),
        pytest.param(b'"\xed\xa0\x80"', id="encoded-surrogate"),
        pytest.param(b'"\xe2\x82"', id="truncated-sequence"),
        pytest.param(b'"\xf4\x90\x80\x80"', id="above-u10ffff"),
        pytest.param('"é"'.encode("latin-1"), id="latin-1"),
        pytest.param('"x"'.encode("utf-16"), id="utf-16"),
    ],
)
def test_non_utf8_is_refused(raw: bytes) -> None:
    assert malformed(raw).reason == "encoding"


def test_byte_order_mark_is_refused() -> None:
    error = malformed(b"\xef\xbb\xbf{}")
    assert error.reason == "encoding"
    assert "byte order mark" in error.detail


def test_non_ascii_utf8_is_accepted() -> None:
    assert loads('{"name":"Zoë 😀 ж"}'.encode()) == {"name": "Zoë 😀 ж"}


# --- syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b" \t\r\n",
        b"{",
        b'{"a":1',
        b'{"a":',
        b"[1,2",
        b'"abc',
        b'{"a":1} x',
        b"[1] [2]",
        b"nullnull",
        b"{'a':1}",
        b"[1,]",
        b'{"a":1,}',
        b'{"a" 1}',
        b"{1:2}",
        b"01",
        b"+1",
        b".5",
        b"1.",
        b"1e",
        b"0x10",
        b"tru",
        b"True",
        b"None",
        b"undefined",
        b'"a\x01b"',
        b'"a\nb"',
        b'"\\x41"',
        b'"\\u12"',
        b"\x00",
        b"[1]\x00",
        b"\x0c[1]",
        b"\xc2\xa0[1]",
        b"/* c */ 1",
    ],
)
def test_syntax_errors(raw: bytes) -> None:
    error = malformed(raw)
    assert error.reason == "syntax"
    assert "line" in error.detail
    assert "column" in error.detail


def test_syntax_error_detail_does_not_quote_the_body() -> None:
    error = malformed(f'{{"card": "{SECRET}" trailing}}'.encode())
    assert error.reason == "syntax"
    assert SECRET not in error.detail
    assert SECRET.encode() not in error.problem_json()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"null", None),
        (b"true", True),
        (b"false", False),
        (b"0", 0),
        (b"-0", 0),
        (b"12", 12),
        (b"-1.5e3", -1500.0),
        (b"1E-2", 0.01),
        (b"1e-400", 0.0),
        (b'"x"', "x"),
        (b' \n{ "a" : [ 1 , { } , [ ] ] }\r\n\t', {"a": [1, {}, []]}),
        (b'"\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9"', '"\\/\b\f\n\r\té'),
    ],
)
def test_valid_json(raw: bytes, expected: JSONValue) -> None:
    value = loads(raw)
    assert value == expected
    assert type(value) is type(expected)


# --- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"[1, NaN]",
        b'{"amount": Infinity}',
        b'{"a": {"b": [-Infinity]}}',
        b"1e400",
        b"-1e400",
        b"[1.8e308]",
        b'{"amount": 1' + b"0" * 400 + b".0}",
    ],
)
def test_non_finite_numbers_are_refused(raw: bytes) -> None:
    assert malformed(raw).reason == "non_finite_number"


def test_largest_float_is_accepted() -> None:
    assert loads(b"1.7976931348623157e308") == sys.float_info.max


def test_integer_digit_limit() -> None:
    assert loads(b"9" * MAX_INTEGER_DIGITS) == int("9" * MAX_INTEGER_DIGITS)
    assert loads(b"-" + b"9" * MAX_INTEGER_DIGITS) == -int("9" * MAX_INTEGER_DIGITS)
    assert malformed(b"9" * (MAX_INTEGER_DIGITS + 1)).reason == "number_too_large"
    assert malformed(b"[-" + b"9" * (MAX_INTEGER_DIGITS + 1) + b"]").reason == ("number_too_large")


def test_integer_digit_limit_does_not_depend_on_the_process_setting() -> None:
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        error = malformed(b"9" * (MAX_INTEGER_DIGITS + 1))
    finally:
        sys.set_int_max_str_digits(previous)
    assert error.reason == "number_too_large"


def test_a_lower_process_digit_limit_is_reported_as_too_large() -> None:
    previous = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        error = malformed(b"9" * 1000)
    finally:
        sys.set_int_max_str_digits(previous)
    assert error.reason == "number_too_large"


# --- duplicate keys -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a":1,"a":2}',
        b'{"a":1,"a":1}',
        b'{"a":1,"b":2,"a":null}',
        b'{"x":{"id":"a","id":"b"}}',
        b'[{"ok":1},{"k":1,"k":2}]',
        b'{"a":1,"\\u0061":2}',
    ],
)
def test_duplicate_keys_are_refused(raw: bytes) -> None:
    assert malformed(raw).reason == "duplicate_key"


def test_same_key_in_sibling_objects_is_fine() -> None:
    assert loads(b'[{"a":1},{"a":2}]') == [{"a": 1}, {"a": 2}]


# --- strings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'"\\ud800"',
        b'"\\uDFFF"',
        b'"abc\\udbff"',
        b'"\\ud800\\u0041"',
        b'"\\ude00\\ud83d"',
        b'{"\\udc00":1}',
        b'{"a":["ok",{"b":"\\ud800"}]}',
    ],
)
def test_lone_surrogates_are_refused(raw: bytes) -> None:
    assert malformed(raw).reason == "invalid_string"


def test_surrogate_pairs_and_escaped_backslashes_are_accepted() -> None:
    assert loads(b'"\\ud83d\\ude00"') == "😀"
    # An escaped backslash followed by "ud800" is text, not a surrogate escape.
    assert loads(b'{"k":"\\\\ud800","n":[1,true,null]}') == {
        "k": "\\ud800",
        "n": [1, True, None],
    }


# --- depth --------------------------------------------------------------------------------


def test_depth_at_the_limit_is_accepted() -> None:
    value = loads(nested(DEFAULT_LIMITS.max_depth))
    for _ in range(DEFAULT_LIMITS.max_depth - 1):
        assert isinstance(value, list)
        value = value[0]
    assert value == []


def test_depth_over_the_limit_is_refused() -> None:
    error = malformed(nested(DEFAULT_LIMITS.max_depth + 1))
    assert error.reason == "too_deep"
    assert "32" in error.detail


def test_objects_count_towards_depth() -> None:
    limits = JSONLimits(max_depth=3)
    assert loads(b'{"a":[{"b":1}]}', limits=limits) == {"a": [{"b": 1}]}
    assert malformed(b'{"a":[{"b":{}}]}', limits=limits).reason == "too_deep"


def test_a_scalar_has_depth_zero() -> None:
    assert loads(b"7", limits=JSONLimits(max_depth=1)) == 7
    assert loads(b"[]", limits=JSONLimits(max_depth=1)) == []
    assert malformed(b"[[]]", limits=JSONLimits(max_depth=1)).reason == "too_deep"


def test_brackets_inside_strings_do_not_count() -> None:
    limits = JSONLimits(max_depth=1)
    raw = b'["[[[[{{{{", "\\"[[[[", "\\\\", "]]]]"]'
    assert loads(raw, limits=limits) == ["[[[[{{{{", '"[[[[', "\\", "]]]]"]


def test_depth_is_the_maximum_not_the_total() -> None:
    raw = b"[" + b",".join([b"[[]]"] * 1000) + b"]"
    value = loads(raw, limits=JSONLimits(max_depth=3))
    assert isinstance(value, list)
    assert len(value) == 1000


def test_a_million_brackets_are_refused_quickly() -> None:
    raw = b"[" * 1_000_000
    with pytest.raises(PayloadTooLargeError):
        loads(raw)
    limits = JSONLimits(max_bytes=2_000_000)
    started = time.perf_counter()
    error = malformed(raw, limits=limits)
    assert error.reason == "too_deep"
    assert time.perf_counter() - started < 2.0


def test_deep_nesting_inside_an_unterminated_string_is_a_syntax_error() -> None:
    assert malformed(b'["' + b"[" * 100, limits=JSONLimits(max_depth=2)).reason == "syntax"


def test_unbalanced_closers_are_a_syntax_error() -> None:
    assert malformed(b"]]" + nested(10), limits=JSONLimits(max_depth=2)).reason == "syntax"


def test_depth_beyond_the_interpreter_stack_is_refused() -> None:
    # A limit configured above what the stack allows still yields a typed error.
    limits = JSONLimits(max_bytes=1_000_000, max_depth=1_000_000)
    assert malformed(nested(100_000), limits=limits).reason == "too_deep"


def test_a_full_size_body_parses_fast() -> None:
    member = b'{"id":"evt_1","text":"a \\" [{ ] }","n":[1.5,-2,true,null]}'
    raw = b"[" + b",".join([member] * 4000) + b"]"
    assert len(raw) < DEFAULT_LIMITS.max_bytes
    started = time.perf_counter()
    value = loads(raw)
    assert isinstance(value, list)
    assert len(value) == 4000
    assert time.perf_counter() - started < 2.0


# --- loads_object -------------------------------------------------------------------------


def test_loads_object_returns_the_object() -> None:
    assert loads_object(b'{"id":"evt_1"}') == {"id": "evt_1"}


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"1", b"null", b"true"])
def test_loads_object_refuses_other_top_levels(raw: bytes) -> None:
    with pytest.raises(InvalidFieldError) as info:
        loads_object(raw)
    assert info.value.pointer == ""
    assert info.value.problem == "expected a JSON object"


def test_loads_object_applies_the_limits() -> None:
    with pytest.raises(PayloadTooLargeError):
        loads_object(b"{}", limits=JSONLimits(max_bytes=1))
    with pytest.raises(MalformedJSONError):
        loads_object(b'{"a":{}}', limits=JSONLimits(max_depth=1))


# --- property -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(json_values)
def test_loads_reads_what_python_json_writes(value: JSONValue) -> None:
    raw = json.dumps(value, ensure_ascii=False).encode()
    assert loads(raw, limits=JSONLimits(max_bytes=10**7, max_depth=100)) == value


# --- ObjectReader -------------------------------------------------------------------------


def reader(**data: JSONValue) -> ObjectReader:
    return ObjectReader(data, "/data/object")


def invalid(call: object, *args: object, **kwargs: object) -> InvalidFieldError:
    assert callable(call)
    with pytest.raises(InvalidFieldError) as info:
        call(*args, **kwargs)
    return info.value


def test_reader_properties_and_pointers() -> None:
    data: dict[str, JSONValue] = {"a": 1}
    root = ObjectReader(data)
    assert root.pointer == ""
    assert root.data is data
    assert root.child_pointer("a") == "/a"
    assert root.child_pointer("a/b~c") == "/a~1b~0c"
    assert root.child_pointer("~1") == "/~01"
    assert root.child_pointer("") == "/"


def test_nested_readers_carry_the_full_pointer() -> None:
    root = ObjectReader(loads_object(b'{"data":{"object":{"amount":"100"}}}'))
    amount_holder = root.object("data").object("object")
    assert amount_holder.pointer == "/data/object"
    error = invalid(amount_holder.integer, "amount")
    assert error.pointer == "/data/object/amount"
    assert error.problem == "must be an integer"
    assert error.detail == "/data/object/amount: must be an integer"


def test_string() -> None:
    r = reader(name="abc", empty="", number=1, nothing=None)
    assert r.string("name") == "abc"
    assert r.string("empty", min_length=0) == ""
    assert invalid(r.string, "missing").problem == "is required"
    assert invalid(r.string, "nothing").problem == "is required"
    assert invalid(r.string, "number").problem == "must be a string"
    assert invalid(r.string, "empty").problem == "must be at least 1 characters long"
    assert invalid(r.string, "name", min_length=4).problem == "must be at least 4 characters long"
    assert invalid(r.string, "name", max_length=2).problem == "must be at most 2 characters long"
    assert r.string("name", min_length=3, max_length=3) == "abc"


def test_string_length_counts_code_points() -> None:
    assert reader(s="😀é").string("s", max_length=2) == "😀é"


def test_string_options_are_checked() -> None:
    r = reader(name="abc")
    with pytest.raises(ConfigurationError):
        r.string("name", min_length=-1)
    with pytest.raises(ConfigurationError):
        r.string("name", min_length=5, max_length=4)


def test_optional_string() -> None:
    r = reader(name="abc", nothing=None, number=1)
    assert r.optional_string("name") == "abc"
    assert r.optional_string("missing") is None
    assert r.optional_string("nothing") is None
    assert invalid(r.optional_string, "number").problem == "must be a string"
    assert invalid(r.optional_string, "name", max_length=1).pointer == "/data/object/name"


@pytest.mark.parametrize("value", ["evt_1NxYzAbC", "pi_3Abc", "ord-42", "a", "!~{}|"])
def test_identifier_accepts_printable_ascii(value: str) -> None:
    assert reader(id=value).identifier("id") == value


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("evt_\x00", "must not contain a control character (position 5)"),
        ("\x00evt", "must not contain a control character (position 1)"),
        ("evt\t1", "must not contain a control character (position 4)"),
        ("evt\n", "must not contain a control character (position 4)"),
        ("evt\r", "must not contain a control character (position 4)"),
        ("evt\x7f", "must not contain a control character (position 4)"),
        ("evt 1", "must not contain a space (position 4)"),
        (" evt", "must not contain a space (position 1)"),
        ("evt_\u0430bc", "must contain only ASCII characters (position 5)"),  # Cyrillic a
        ("\uff45vt_1", "must contain only ASCII characters (position 1)"),  # fullwidth e
        ("evt_\u00a0", "must contain only ASCII characters (position 5)"),
        ("evt_\u200b", "must contain only ASCII characters (position 5)"),
        ("ord-é", "must contain only ASCII characters (position 5)"),
        ("", "must not be empty"),
    ],
)
def test_identifier_refusals(value: str, problem: str) -> None:
    error = invalid(reader(id=value).identifier, "id")
    assert error.pointer == "/data/object/id"
    assert error.problem == problem


def test_identifier_type_length_and_prefix() -> None:
    r = reader(id="pi_123", number=123)
    assert invalid(r.identifier, "number").problem == "must be a string"
    assert invalid(r.identifier, "missing").problem == "is required"
    assert invalid(r.identifier, "id", max_length=5).problem == "must be at most 5 characters long"
    assert r.identifier("id", max_length=6) == "pi_123"
    assert r.identifier("id", prefix="pi_") == "pi_123"
    assert invalid(r.identifier, "id", prefix="evt_").problem == "must start with 'evt_'"
    assert invalid(r.identifier, "id", prefix="PI_").problem == "must start with 'PI_'"
    assert reader(id="x" * 255).identifier("id") == "x" * 255
    assert invalid(reader(id="x" * 256).identifier, "id").problem == (
        "must be at most 255 characters long"
    )
    with pytest.raises(ConfigurationError):
        r.identifier("id", max_length=0)


def test_optional_identifier() -> None:
    r = reader(id="evt_1", nothing=None, bad="evt 1")
    assert r.optional_identifier("id", prefix="evt_") == "evt_1"
    assert r.optional_identifier("missing") is None
    assert r.optional_identifier("nothing") is None
    assert invalid(r.optional_identifier, "bad").problem == "must not contain a space (position 4)"


def test_integer() -> None:
    r = reader(amount=100, zero=0, negative=-1, big=10**30)
    assert r.integer("amount") == 100
    assert r.integer("zero", minimum=0) == 0
    assert r.integer("amount", minimum=100, maximum=100) == 100
    assert r.integer("big") == 10**30
    assert invalid(r.integer, "negative", minimum=0).problem == "must be at least 0"
    assert invalid(r.integer, "amount", maximum=99).problem == "must be at most 99"
    assert invalid(r.integer, "missing").problem == "is required"
    with pytest.raises(ConfigurationError):
        r.integer("amount", minimum=2, maximum=1)


@pytest.mark.parametrize("value", ["100", 100.0, 1.5, True, False, [100], {"v": 100}])
def test_integer_refuses_other_types(value: JSONValue) -> None:
    error = invalid(reader(amount=value).integer, "amount")
    assert error.problem == "must be an integer"


def test_integer_from_parsed_json() -> None:
    r = ObjectReader(loads_object(b'{"a":"100","b":100.0,"c":true,"d":-1,"e":null}'))
    assert invalid(r.integer, "a").problem == "must be an integer"
    assert invalid(r.integer, "b").problem == "must be an integer"
    assert invalid(r.integer, "c").problem == "must be an integer"
    assert invalid(r.integer, "d", minimum=0).problem == "must be at least 0"
    assert invalid(r.integer, "e").problem == "is required"


def test_optional_integer() -> None:
    r = reader(amount=5, nothing=None, text="5")
    assert r.optional_integer("amount", minimum=0) == 5
    assert r.optional_integer("missing") is None
    assert r.optional_integer("nothing") is None
    assert invalid(r.optional_integer, "text").problem == "must be an integer"
    assert invalid(r.optional_integer, "amount", maximum=4).problem == "must be at most 4"


def test_boolean() -> None:
    r = reader(yes=True, no=False, one=1, text="true", nothing=None)
    assert r.boolean("yes") is True
    assert r.boolean("no") is False
    assert invalid(r.boolean, "one").problem == "must be a boolean"
    assert invalid(r.boolean, "text").problem == "must be a boolean"
    assert invalid(r.boolean, "nothing").problem == "is required"
    assert r.optional_boolean("no") is False
    assert r.optional_boolean("missing") is None
    assert r.optional_boolean("nothing") is None
    assert invalid(r.optional_boolean, "one").problem == "must be a boolean"


@pytest.mark.parametrize("code", ["usd", "eur", "jpy", "gbp", "chf", "xof", "krw", "inr"])
def test_currency_accepts_known_codes(code: str) -> None:
    assert reader(currency=code).currency("currency") == code


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("USD", "must be a lowercase currency code"),
        ("Eur", "must be a lowercase currency code"),
        ("xxx", "must be a supported ISO 4217 currency code"),
        ("xts", "must be a supported ISO 4217 currency code"),
        ("xau", "must be a supported ISO 4217 currency code"),
        ("abc", "must be a supported ISO 4217 currency code"),
        ("us", "must be a supported ISO 4217 currency code"),
        ("usdd", "must be a supported ISO 4217 currency code"),
        ("", "must be a supported ISO 4217 currency code"),
        ("u\u0455d", "must be a supported ISO 4217 currency code"),
        (840, "must be a string"),
        (None, "is required"),
    ],
)
def test_currency_refusals(value: JSONValue, problem: str) -> None:
    error = invalid(reader(currency=value).currency, "currency")
    assert error.pointer == "/data/object/currency"
    assert error.problem == problem


def test_currency_list_is_lowercase_iso_codes() -> None:
    assert len(CURRENCIES) > 150
    assert all(len(c) == 3 and set(c) <= set(string.ascii_lowercase) for c in CURRENCIES)
    assert {"usd", "eur", "jpy", "gbp", "cad", "aud", "cny", "brl", "mxn"} <= CURRENCIES
    assert not {"xxx", "xts", "xau", "xag", "xdr", "usn", "che", "hrk"} & CURRENCIES


def test_choice() -> None:
    r = reader(status="succeeded", number=1)
    assert r.choice("status", {"succeeded", "failed"}) == "succeeded"
    assert r.choice("status", ["succeeded"]) == "succeeded"
    assert invalid(r.choice, "status", {"failed"}).problem == "must be one of the allowed values"
    assert invalid(r.choice, "number", {"1"}).problem == "must be a string"
    assert invalid(r.choice, "missing", {"a"}).problem == "is required"
    with pytest.raises(ConfigurationError):
        r.choice("status", "succeeded")


def test_object_and_optional_object() -> None:
    r = reader(inner={"a": 1}, array=[1], nothing=None)
    inner = r.object("inner")
    assert inner.pointer == "/data/object/inner"
    assert inner.integer("a") == 1
    assert invalid(r.object, "array").problem == "must be an object"
    assert invalid(r.object, "nothing").problem == "is required"
    optional = r.optional_object("inner")
    assert optional is not None
    assert optional.data == {"a": 1}
    assert r.optional_object("missing") is None
    assert r.optional_object("nothing") is None
    assert invalid(r.optional_object, "array").problem == "must be an object"


def test_array() -> None:
    items: list[JSONValue] = [1, "a"]
    r = reader(items=items, inner={"a": 1}, nothing=None)
    assert r.array("items") is items
    assert invalid(r.array, "inner").problem == "must be an array"
    assert invalid(r.array, "nothing").problem == "is required"
    assert invalid(r.array, "missing").pointer == "/data/object/missing"


@pytest.mark.parametrize(
    ("method", "args"),
    [
        ("string", {"max_length": 3}),
        ("identifier", {}),
        ("identifier", {"prefix": "evt_"}),
        ("integer", {}),
        ("boolean", {}),
        ("currency", {}),
        ("choice", {"choices": {"a"}}),
        ("object", {}),
        ("array", {}),
    ],
)
def test_errors_never_contain_the_value(method: str, args: dict[str, object]) -> None:
    r = reader(field=f"{SECRET} \x00 {SECRET}")
    error = invalid(getattr(r, method), "field", **args)
    assert SECRET not in str(error)
    assert SECRET.encode() not in error.problem_json()
