"""Strict JSON for webhook and checkout bodies, and typed readers for the fields inside.

Python's :mod:`json` accepts text that is not JSON (``NaN``, ``Infinity``), silently keeps the
last of two duplicate keys, lets lone UTF-16 surrogates through, turns ``1e400`` into infinity
and can exhaust the stack on deep nesting. :func:`loads` turns each of those into a typed
:class:`~idempay.errors.MalformedJSONError` (or :class:`~idempay.errors.PayloadTooLargeError`),
so that a body either is unambiguous JSON or is refused with a 4xx.

:class:`ObjectReader` then reads fields with exact types (an amount of ``"100"``, ``100.0`` or
``true`` is not ``100``) and reports every failure as an
:class:`~idempay.errors.InvalidFieldError` carrying the field's RFC 6901 pointer. No error
message ever contains the refused value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from idempay.errors import (
    ConfigurationError,
    InvalidFieldError,
    MalformedJSONError,
    PayloadTooLargeError,
)

__all__ = [
    "CURRENCIES",
    "DEFAULT_LIMITS",
    "MAX_INTEGER_DIGITS",
    "JSONLimits",
    "JSONValue",
    "ObjectReader",
    "loads",
    "loads_object",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
"""A JSON document as Python values: objects are ``dict`` with ``str`` keys, arrays ``list``."""

MAX_INTEGER_DIGITS: Final = 4300
"""Integers with more digits than this are refused (``reason="number_too_large"``).

This is CPython's default ``int`` conversion limit, fixed here so that what a body may contain
does not depend on a process-wide :func:`sys.set_int_max_str_digits` setting; a lower process
limit still applies.
"""


@dataclass(frozen=True, slots=True)
class JSONLimits:
    """Bounds on the bodies :func:`loads` accepts.

    Attributes:
        max_bytes: the largest body, in bytes. A larger body is refused before it is decoded.
        max_depth: the deepest nesting of arrays and objects; a top-level array or object is at
            depth 1, a scalar at depth 0.

    Raises:
        ConfigurationError: if either bound is not an integer of at least 1.
    """

    max_bytes: int = 262_144
    max_depth: int = 32

    def __post_init__(self) -> None:
        for name, value in (("max_bytes", self.max_bytes), ("max_depth", self.max_depth)):
            # type() rather than isinstance(): True is not a limit of 1.
            if type(value) is not int or value < 1:
                raise ConfigurationError(f"JSONLimits.{name} must be an integer of at least 1")


DEFAULT_LIMITS: Final = JSONLimits()
"""256 KiB and 32 levels: far above any Stripe event or checkout body."""

_BOM: Final = "\ufeff"

# One token per match: a complete string (escapes consumed pairwise, so an escaped quote
# never ends it), a bracket, or a quote that opens a string never closed. Possessive
# quantifiers keep a failed match on an unterminated string linear.
_STRUCTURE: Final = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"|[\[\]{}]|"', re.DOTALL)

# The body is valid UTF-8 when this runs, so an unpaired surrogate can only come from a
# \uD800-\uDFFF escape; without one in the text, the walk over the result is skipped.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89abcdefABCDEF]")
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def loads(raw: bytes, *, limits: JSONLimits = DEFAULT_LIMITS) -> JSONValue:
    """Parse ``raw`` as strict JSON (RFC 8259) and return the value.

    Guarantees: the result has ``str`` keys only, no duplicate keys were present in any
    object, every float is finite, every string and key is valid Unicode (no lone surrogate),
    and no array or object is nested deeper than ``limits.max_depth``. The stack depth used
    does not depend on the body: a million ``[`` is refused by a linear scan, not by recursion.

    Raises:
        PayloadTooLargeError: ``len(raw) > limits.max_bytes`` (checked before anything else).
        MalformedJSONError: with ``reason`` set to ``"encoding"`` (not strict UTF-8, or a
            byte order mark), ``"syntax"`` (empty, invalid, truncated, trailing data),
            ``"non_finite_number"`` (``NaN``, ``Infinity``, or a number overflowing to
            infinity), ``"number_too_large"`` (an integer with too many digits),
            ``"duplicate_key"``, ``"invalid_string"`` (a lone surrogate escape) or
            ``"too_deep"``. The detail never quotes the body.
    """
    if len(raw) > limits.max_bytes:
        raise PayloadTooLargeError(limit=limits.max_bytes)
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSONError(
            f"the body is not valid UTF-8 (byte {exc.start})", reason="encoding"
        ) from None
    if text.startswith(_BOM):
        raise MalformedJSONError("the body starts with a byte order mark", reason="encoding")
    _check_depth(text, limits.max_depth)
    try:
        value: JSONValue = json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except json.JSONDecodeError as exc:
        # The json module's messages are fixed phrases ("Expecting value"), never content.
        raise MalformedJSONError(
            f"{exc.msg} (line {exc.lineno}, column {exc.colno})", reason="syntax"
        ) from None
    except RecursionError:
        # Only reachable when max_depth is configured above what the interpreter's stack
        # allows; the scan above has already refused anything deeper than max_depth.
        raise MalformedJSONError(
            "the body is nested too deeply to parse", reason="too_deep"
        ) from None
    if _SURROGATE_ESCAPE.search(text) is not None:
        _check_strings(value)
    return value


def loads_object(raw: bytes, *, limits: JSONLimits = DEFAULT_LIMITS) -> dict[str, JSONValue]:
    """Parse ``raw`` like :func:`loads` and require a JSON object at the top level.

    Raises:
        PayloadTooLargeError, MalformedJSONError: as :func:`loads`.
        InvalidFieldError: the top level is not an object (pointer ``""``).
    """
    value = loads(raw, limits=limits)
    if not isinstance(value, dict):
        raise InvalidFieldError("", "expected a JSON object")
    return value


def _check_depth(text: str, max_depth: int) -> None:
    depth = 0
    for match in _STRUCTURE.finditer(text):
        start = match.start()
        char = text[start]
        if char == '"':
            if match.end() - start == 1:
                # An unterminated string: the rest is its content; the parser reports it.
                return
            continue
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise MalformedJSONError(
                    f"the body is nested deeper than {max_depth} levels", reason="too_deep"
                )
        else:
            depth -= 1
            if depth < 0:
                # An unbalanced closer is a syntax error the parser stops at, before any
                # nesting that follows it.
                return


def _object_without_duplicates(pairs: list[tuple[str, JSONValue]]) -> dict[str, JSONValue]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedJSONError("an object has a duplicate key", reason="duplicate_key")
    return result


def _refuse_constant(_name: str) -> float:
    raise MalformedJSONError("NaN and Infinity are not JSON numbers", reason="non_finite_number")


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise MalformedJSONError(
            "a number is too large to be represented", reason="non_finite_number"
        )
    return number


def _bounded_int(literal: str) -> int:
    if len(literal) - literal.startswith("-") > MAX_INTEGER_DIGITS:
        raise _integer_too_large()
    try:
        return int(literal)
    except ValueError:
        # The process-wide digit limit may be set lower than ours.
        raise _integer_too_large() from None


def _integer_too_large() -> MalformedJSONError:
    return MalformedJSONError("an integer has too many digits", reason="number_too_large")


def _check_strings(value: JSONValue) -> None:
    # Iterative: the depth of the value is bounded by configuration, not by the stack.
    pending: list[JSONValue] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _check_string(item)
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key)
                pending.append(child)


def _check_string(text: str) -> None:
    if _SURROGATE.search(text) is not None:
        raise MalformedJSONError(
            "a string contains an unpaired UTF-16 surrogate", reason="invalid_string"
        )


# ISO 4217 codes of circulating currencies, lowercase as Stripe sends them. Left out on
# purpose: fund and accounting units (BOV, CHE, CHW, CLF, COU, MXV, USN, UYI, UYW), precious
# metals, bond-market units and the SDR (XAG, XAU, XBA-XBD, XDR, XPD, XPT, XSU, XUA), and the
# codes for testing and "no currency" (XTS, XXX). ANG is kept while it is replaced by XCG.
CURRENCIES: Final[frozenset[str]] = frozenset(
    {
        "aed", "afn", "all", "amd", "ang", "aoa", "ars", "aud", "awg", "azn",
        "bam", "bbd", "bdt", "bgn", "bhd", "bif", "bmd", "bnd", "bob", "brl",
        "bsd", "btn", "bwp", "byn", "bzd",
        "cad", "cdf", "chf", "clp", "cny", "cop", "crc", "cup", "cve", "czk",
        "djf", "dkk", "dop", "dzd",
        "egp", "ern", "etb", "eur",
        "fjd", "fkp",
        "gbp", "gel", "ghs", "gip", "gmd", "gnf", "gtq", "gyd",
        "hkd", "hnl", "htg", "huf",
        "idr", "ils", "inr", "iqd", "irr", "isk",
        "jmd", "jod", "jpy",
        "kes", "kgs", "khr", "kmf", "kpw", "krw", "kwd", "kyd", "kzt",
        "lak", "lbp", "lkr", "lrd", "lsl", "lyd",
        "mad", "mdl", "mga", "mkd", "mmk", "mnt", "mop", "mru", "mur", "mvr",
        "mwk", "mxn", "myr", "mzn",
        "nad", "ngn", "nio", "nok", "npr", "nzd",
        "omr",
        "pab", "pen", "pgk", "php", "pkr", "pln", "pyg",
        "qar",
        "ron", "rsd", "rub", "rwf",
        "sar", "sbd", "scr", "sdg", "sek", "sgd", "shp", "sle", "sos", "srd",
        "ssp", "stn", "svc", "syp", "szl",
        "thb", "tjs", "tmt", "tnd", "top", "try", "ttd", "twd", "tzs",
        "uah", "ugx", "usd", "uyu", "uzs",
        "ved", "ves", "vnd", "vuv",
        "wst",
        "xaf", "xcd", "xcg", "xof", "xpf",
        "yer",
        "zar", "zmw", "zwg",
    }
)  # fmt: skip
"""Lowercase ISO 4217 codes of the currencies in circulation; :meth:`ObjectReader.currency`
accepts exactly these."""


class ObjectReader:
    """Read the fields of one JSON object with exact types.

    Every reader raises :class:`~idempay.errors.InvalidFieldError` whose ``pointer`` is the
    field's full RFC 6901 pointer (``/data/object/amount``) and whose ``problem`` is a short
    phrase (``"is required"``, ``"must be an integer"``); the received value is never part of
    it. For the required readers a missing field and ``null`` are both ``"is required"``; the
    ``optional_*`` readers return ``None`` for either and still check a present value.
    Positions in problems count characters from 1. Options that make no sense (a minimum
    above the maximum) raise :class:`~idempay.errors.ConfigurationError`.
    """

    __slots__ = ("_data", "_pointer")

    def __init__(self, data: Mapping[str, JSONValue], pointer: str = "") -> None:
        self._data = data
        self._pointer = pointer

    @property
    def pointer(self) -> str:
        """The RFC 6901 pointer of this object (``""`` for the document root)."""
        return self._pointer

    @property
    def data(self) -> Mapping[str, JSONValue]:
        """The object's members, as given."""
        return self._data

    def child_pointer(self, name: str) -> str:
        """The pointer of member ``name``, escaping ``~`` as ``~0`` and ``/`` as ``~1``."""
        return f"{self._pointer}/{name.replace('~', '~0').replace('/', '~1')}"

    def string(self, name: str, *, min_length: int = 1, max_length: int = 5000) -> str:
        """A string of ``min_length`` to ``max_length`` code points."""
        return self._string(name, self._required(name), min_length, max_length)

    def optional_string(
        self, name: str, *, min_length: int = 1, max_length: int = 5000
    ) -> str | None:
        """Like :meth:`string`, or ``None`` when absent or ``null``."""
        value = self._data.get(name)
        if value is None:
            return None
        return self._string(name, value, min_length, max_length)

    def identifier(self, name: str, *, prefix: str | None = None, max_length: int = 255) -> str:
        """An id (``evt_...``, ``pi_...``, ``ord-42``) that is safe to store and to log.

        1 to ``max_length`` characters, each printable ASCII without space (0x21-0x7E): no
        NUL or other control character (some databases store NUL, others refuse it), no
        non-ASCII look-alike. With ``prefix``, the id must start with it.
        """
        return self._identifier(name, self._required(name), prefix, max_length)

    def optional_identifier(
        self, name: str, *, prefix: str | None = None, max_length: int = 255
    ) -> str | None:
        """Like :meth:`identifier`, or ``None`` when absent or ``null``."""
        value = self._data.get(name)
        if value is None:
            return None
        return self._identifier(name, value, prefix, max_length)

    def integer(self, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
        """An integer within the bounds; ``true``, ``10.0`` and ``"10"`` are not integers."""
        return self._integer(name, self._required(name), minimum, maximum)

    def optional_integer(
        self, name: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        """Like :meth:`integer`, or ``None`` when absent or ``null``."""
        value = self._data.get(name)
        if value is None:
            return None
        return self._integer(name, value, minimum, maximum)

    def boolean(self, name: str) -> bool:
        """``true`` or ``false``; no other value stands for a boolean."""
        return self._boolean(name, self._required(name))

    def optional_boolean(self, name: str) -> bool | None:
        """Like :meth:`boolean`, or ``None`` when absent or ``null``."""
        value = self._data.get(name)
        if value is None:
            return None
        return self._boolean(name, value)

    def currency(self, name: str) -> str:
        """A lowercase ISO 4217 code in :data:`CURRENCIES` (``"usd"``; ``"USD"`` is refused)."""
        value = self._required(name)
        if not isinstance(value, str):
            raise self._invalid(name, "must be a string")
        if value not in CURRENCIES:
            if value.lower() in CURRENCIES:
                raise self._invalid(name, "must be a lowercase currency code")
            raise self._invalid(name, "must be a supported ISO 4217 currency code")
        return value

    def choice(self, name: str, choices: Collection[str]) -> str:
        """A string that is one of ``choices``."""
        if isinstance(choices, str):
            # A string is a collection of its characters: almost certainly a mistake.
            raise ConfigurationError("choices must be a collection of strings, not a string")
        value = self._required(name)
        if not isinstance(value, str):
            raise self._invalid(name, "must be a string")
        if value not in choices:
            raise self._invalid(name, "must be one of the allowed values")
        return value

    def object(self, name: str) -> ObjectReader:
        """A nested object, as a reader whose pointer continues this one."""
        return self._object(name, self._required(name))

    def optional_object(self, name: str) -> ObjectReader | None:
        """Like :meth:`object`, or ``None`` when absent or ``null``."""
        value = self._data.get(name)
        if value is None:
            return None
        return self._object(name, value)

    def array(self, name: str) -> list[JSONValue]:
        """An array, returned as is (its items are not checked)."""
        value = self._required(name)
        if not isinstance(value, list):
            raise self._invalid(name, "must be an array")
        return value

    def _invalid(self, name: str, problem: str) -> InvalidFieldError:
        return InvalidFieldError(self.child_pointer(name), problem)

    def _required(self, name: str) -> JSONValue:
        value = self._data.get(name)
        if value is None:
            raise self._invalid(name, "is required")
        return value

    def _string(self, name: str, value: JSONValue, min_length: int, max_length: int) -> str:
        if min_length < 0 or max_length < min_length:
            raise ConfigurationError("string lengths need 0 <= min_length <= max_length")
        if not isinstance(value, str):
            raise self._invalid(name, "must be a string")
        if len(value) < min_length:
            raise self._invalid(name, f"must be at least {min_length} characters long")
        if len(value) > max_length:
            raise self._invalid(name, f"must be at most {max_length} characters long")
        return value

    def _identifier(self, name: str, value: JSONValue, prefix: str | None, max_length: int) -> str:
        if max_length < 1:
            raise ConfigurationError("identifier max_length must be at least 1")
        if not isinstance(value, str):
            raise self._invalid(name, "must be a string")
        if not value:
            raise self._invalid(name, "must not be empty")
        if len(value) > max_length:
            raise self._invalid(name, f"must be at most {max_length} characters long")
        problem = _identifier_problem(value)
        if problem is not None:
            raise self._invalid(name, problem)
        if prefix is not None and not value.startswith(prefix):
            # The prefix comes from the application, not from the request: safe to name.
            raise self._invalid(name, f"must start with {prefix!r}")
        return value

    def _integer(
        self, name: str, value: JSONValue, minimum: int | None, maximum: int | None
    ) -> int:
        if minimum is not None and maximum is not None and maximum < minimum:
            raise ConfigurationError("integer bounds need minimum <= maximum")
        # bool is a subclass of int; True is not 1 here.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._invalid(name, "must be an integer")
        if minimum is not None and value < minimum:
            raise self._invalid(name, f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise self._invalid(name, f"must be at most {maximum}")
        return value

    def _boolean(self, name: str, value: JSONValue) -> bool:
        if not isinstance(value, bool):
            raise self._invalid(name, "must be a boolean")
        return value

    def _object(self, name: str, value: JSONValue) -> ObjectReader:
        if not isinstance(value, dict):
            raise self._invalid(name, "must be an object")
        return ObjectReader(value, self.child_pointer(name))


def _identifier_problem(value: str) -> str | None:
    for position, char in enumerate(value, start=1):
        code = ord(char)
        if code == 0x20:
            return f"must not contain a space (position {position})"
        if code < 0x20 or code == 0x7F:
            return f"must not contain a control character (position {position})"
        if code > 0x7F:
            return f"must contain only ASCII characters (position {position})"
    return None
