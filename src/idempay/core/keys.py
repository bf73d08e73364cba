"""Idempotency keys, their scope, and the fingerprint of the request they protect.

A key is accepted exactly as the client sent it or refused: it is never truncated, stripped,
case-folded or otherwise merged with another key. A :class:`Scope` says whose key it is, so that
the same key from another tenant, user or operation is a different key. A request fingerprint
tells a retry (same key, same request) from a reuse (same key, different request), which is
refused with 422.

Digests and fingerprints hash length-prefixed fields under a versioned label, so no two
different inputs share an encoding and a future format cannot collide with this one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

from idempay.core.strictjson import JSONValue
from idempay.errors import (
    ConfigurationError,
    IdempotencyKeyError,
    MalformedJSONError,
    MissingIdempotencyKeyError,
)

__all__ = [
    "MAX_KEY_LENGTH",
    "Scope",
    "canonical_json",
    "key_digest",
    "parse_key_header",
    "request_fingerprint",
    "validate_key",
]

MAX_KEY_LENGTH: Final = 255
"""The longest idempotency key accepted, in characters (Stripe's limit)."""

_MAX_SCOPE_COMPONENT: Final = 255
_KEY_DIGEST_LABEL: Final = b"idempay/key-digest/v1"
_FINGERPRINT_LABEL: Final = b"idempay/request-fingerprint/v1"


def validate_key(key: str | None) -> str:
    """Return ``key`` unchanged if it is an acceptable idempotency key.

    Acceptable: 1 to :data:`MAX_KEY_LENGTH` characters, each printable ASCII (0x20-0x7E), not
    starting or ending with a space (HTTP trims those, so they would be ambiguous). Keys that
    differ only in case are different keys.

    Raises:
        MissingIdempotencyKeyError: ``key`` is ``None``.
        IdempotencyKeyError: any other rule is broken; the detail names the rule (and the
            1-based position of a bad character), never the key.
    """
    if key is None:
        raise MissingIdempotencyKeyError("an idempotency key is required")
    if not key:
        raise IdempotencyKeyError("the idempotency key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyError(f"the idempotency key is longer than {MAX_KEY_LENGTH} characters")
    problem = _character_problem(key)
    if problem is not None:
        raise IdempotencyKeyError(f"the idempotency key has {problem}")
    if key.startswith(" "):
        raise IdempotencyKeyError("the idempotency key starts with a space")
    if key.endswith(" "):
        raise IdempotencyKeyError("the idempotency key ends with a space")
    return key


def parse_key_header(value: str | None) -> str:
    """Return the key carried by a raw ``Idempotency-Key`` header value.

    Two forms are accepted: Stripe's bare token (``abc-123``) and the IETF draft's RFC 8941
    sf-string (``"abc-123"``), which is unwrapped; in it ``\\"`` and ``\\\\`` are the only
    escapes. The value is not trimmed (HTTP servers already remove surrounding whitespace).
    The key is then checked by :func:`validate_key`.

    Raises:
        MissingIdempotencyKeyError: ``value`` is ``None`` or empty.
        IdempotencyKeyError: a malformed quoted string (an unknown escape, no closing quote,
            anything after it) or a key that :func:`validate_key` refuses.
    """
    if not value:
        raise MissingIdempotencyKeyError("the Idempotency-Key header is missing or empty")
    if value.startswith('"'):
        return validate_key(_unquote(value))
    return validate_key(value)


def _unquote(value: str) -> str:
    chars: list[str] = []
    index = 1
    end = len(value)
    while index < end:
        char = value[index]
        if char == "\\":
            if index + 1 == end or value[index + 1] not in '"\\':
                raise IdempotencyKeyError(
                    'the quoted idempotency key has an escape other than \\" or \\\\'
                )
            chars.append(value[index + 1])
            index += 2
        elif char == '"':
            if index + 1 != end:
                raise IdempotencyKeyError(
                    "the Idempotency-Key header has data after the closing quote"
                )
            return "".join(chars)
        else:
            chars.append(char)
            index += 1
    raise IdempotencyKeyError("the quoted idempotency key has no closing quote")


@dataclass(frozen=True, slots=True)
class Scope:
    """Whom and what an idempotency key belongs to.

    The same key under two different scopes is two different keys: one tenant or user can
    never receive another's stored response. The components come from the application, not
    from the client.

    Attributes:
        operation: what the key protects (``"checkout"``); 1 to 255 characters.
        tenant: the tenant, or ``""`` for none; at most 255 characters.
        user: the user, or ``""`` for none; at most 255 characters.

    Raises:
        ConfigurationError: a component is not a string, is too long, ``operation`` is empty,
            or a character is not printable ASCII (0x20-0x7E).
    """

    operation: str
    tenant: str = ""
    user: str = ""

    def __post_init__(self) -> None:
        _check_scope_component("operation", self.operation, required=True)
        _check_scope_component("tenant", self.tenant, required=False)
        _check_scope_component("user", self.user, required=False)

    def encode(self) -> str:
        """Return the canonical text of this scope, ``"8:checkout|4:acme|3:u42"``.

        Each component is prefixed by its length, so two different scopes never encode to the
        same text, whatever characters the components contain.
        """
        return "|".join(
            f"{len(component)}:{component}"
            for component in (self.operation, self.tenant, self.user)
        )


def _check_scope_component(name: str, value: object, *, required: bool) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"Scope.{name} must be a string")
    if required and not value:
        raise ConfigurationError(f"Scope.{name} must not be empty")
    if len(value) > _MAX_SCOPE_COMPONENT:
        raise ConfigurationError(
            f"Scope.{name} must be at most {_MAX_SCOPE_COMPONENT} characters long"
        )
    problem = _character_problem(value)
    if problem is not None:
        raise ConfigurationError(f"Scope.{name} has {problem}")


def key_digest(scope: Scope, key: str) -> str:
    """Return the hex SHA-256 of ``key`` within ``scope``, to record instead of the key.

    Equal (scope, key) pairs give equal digests; a different scope or a key differing in any
    character (case included) gives a different one. The key is not validated, so a refused
    key can be audited too; any string is accepted.
    """
    return _digest(_KEY_DIGEST_LABEL, scope.encode(), key)


def canonical_json(value: JSONValue) -> bytes:
    """Return the canonical UTF-8 JSON encoding of ``value``.

    Object keys are sorted by code point, there is no insignificant whitespace, non-ASCII
    characters are written as UTF-8 (only ``"``, ``\\`` and control characters are escaped),
    integers are written as integers and floats in Python's shortest round-tripping form
    (``repr``). Values equal as JSON give equal bytes whatever the order of their keys;
    ``1`` and ``1.0`` differ, as they do on the wire. The encoder does not recurse, so the
    depth of ``value`` is not limited by the stack.

    Raises:
        MalformedJSONError: a float is not finite (``reason="non_finite_number"``), an
            integer has more digits than Python converts (``"number_too_large"``), or a
            string holds a lone surrogate (``"invalid_string"``).
        ConfigurationError: ``value`` holds something that is not a JSON value (a tuple, a
            non-string key, ...) or contains itself.
    """
    parts: list[str] = []
    # Containers being encoded, by identity: meeting one again means a cycle.
    open_containers: set[int] = set()
    # A stack of values still to encode and of _Emit texts, popped from the end.
    pending: list[object] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, _Emit):
            parts.append(item.text)
            if item.closes is not None:
                open_containers.discard(item.closes)
        elif isinstance(item, list | dict):
            identity = id(item)
            if identity in open_containers:
                raise ConfigurationError("a JSON value cannot contain itself")
            open_containers.add(identity)
            if isinstance(item, list):
                parts.append("[")
                pending.append(_Emit("]", closes=identity))
                pending.extend(_reversed_items(item))
            else:
                parts.append("{")
                pending.append(_Emit("}", closes=identity))
                pending.extend(_reversed_members(item))
        else:
            parts.append(_scalar_text(item))
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedJSONError(
            "a string contains an unpaired UTF-16 surrogate", reason="invalid_string"
        ) from None


@dataclass(frozen=True, slots=True)
class _Emit:
    """Text for :func:`canonical_json` to write when popped, closing a container if said."""

    text: str
    closes: int | None = None


_COMMA: Final = _Emit(",")


def _reversed_items(items: list[object]) -> list[object]:
    tokens: list[object] = []
    for index in range(len(items) - 1, -1, -1):
        tokens.append(items[index])
        if index:
            tokens.append(_COMMA)
    return tokens


def _reversed_members(members: dict[object, object]) -> list[object]:
    names: list[str] = []
    for name in members:
        if not isinstance(name, str):
            # json.dumps would write 1 as "1": two different dicts, one encoding.
            raise ConfigurationError(
                f"a JSON object key must be a str, not a {type(name).__name__}"
            )
        names.append(name)
    names.sort(reverse=True)
    tokens: list[object] = []
    for index, name in enumerate(names):
        if index:
            tokens.append(_COMMA)
        tokens.append(members[name])
        tokens.append(_Emit(json.dumps(name, ensure_ascii=False) + ":"))
    return tokens


def _scalar_text(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return _integer_text(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    raise ConfigurationError(f"a {type(value).__name__} is not a JSON value")


def _integer_text(number: int) -> str:
    try:
        # int.__repr__: an IntEnum member is written as its number, not its name.
        return int.__repr__(number)
    except ValueError:
        raise MalformedJSONError(
            "an integer has too many digits", reason="number_too_large"
        ) from None


def _float_text(number: float) -> str:
    text = float.__repr__(number)
    if text in ("nan", "inf", "-inf"):
        raise MalformedJSONError(
            "NaN and Infinity are not JSON numbers", reason="non_finite_number"
        )
    return text


def request_fingerprint(
    method: str, route: str, body: JSONValue, *, ignore: Collection[str] = ()
) -> str:
    """Return the hex SHA-256 that identifies a request for idempotency purposes.

    It covers the method (upper-cased), the route exactly as given and the
    :func:`canonical_json` of the body, without the top-level members named in ``ignore``
    when the body is an object (for client timestamps and other fields that may change
    between retries of one request). Two requests with the same fingerprint are the same
    request; a key reused with a different fingerprint is refused.

    Raises:
        ConfigurationError: ``method`` is not a token of ASCII letters, ``route`` does not
            start with ``/``, ``ignore`` is a single string, or the body holds a non-JSON
            value.
        MalformedJSONError: as :func:`canonical_json`.
    """
    if not (method.isascii() and method.isalpha()):
        raise ConfigurationError("the HTTP method must be a token of ASCII letters")
    if not route.startswith("/"):
        raise ConfigurationError("the route must start with '/'")
    if isinstance(ignore, str):
        # A string is a collection of its characters: almost certainly a mistake.
        raise ConfigurationError("ignore must be a collection of member names, not a string")
    if isinstance(body, dict) and ignore:
        body = {name: member for name, member in body.items() if name not in ignore}
    return _digest(_FINGERPRINT_LABEL, method.upper(), route, canonical_json(body))


def _digest(label: bytes, *fields: str | bytes) -> str:
    digest = hashlib.sha256()
    for field in (label, *fields):
        # surrogatepass: any str hashes, and distinct strs still give distinct bytes.
        data = field if isinstance(field, bytes) else field.encode("utf-8", "surrogatepass")
        digest.update(b"%d:" % len(data))
        digest.update(data)
    return digest.hexdigest()


def _character_problem(value: str) -> str | None:
    for position, char in enumerate(value, start=1):
        code = ord(char)
        if code < 0x20 or code == 0x7F:
            return f"a control character at position {position}"
        if code > 0x7F:
            return f"a non-ASCII character at position {position}"
    return None
