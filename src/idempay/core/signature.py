"""Stripe webhook signatures: a strict parser for ``Stripe-Signature`` and a constant-time check.

Stripe signs ``f"{t}.".encode() + raw_body`` with HMAC-SHA256, keyed by the endpoint secret
(``whsec_...``) taken as its UTF-8 bytes, and sends the hex digest in a header of the form
``t=1700000000,v1=<64 hex>[,v1=<64 hex>...][,v0=...]``. While a rolled secret and its
replacement are both active, the header carries one ``v1`` entry per active secret.

This module is stricter than Stripe's own libraries, on purpose:

* the header has a fixed grammar (no whitespace, ``t`` is 1 to 12 ASCII digits, ``v1`` is
  exactly 64 lowercase hex digits) and a bounded size, so odd input is refused with a
  :class:`~idempay.errors.SignatureVerificationError` instead of leaking a ``TypeError``;
* only ``v1`` counts: any other scheme (``v0``, future ones) is ignored, so a downgrade to a
  weaker scheme is impossible;
* the time window is symmetric: a timestamp too far in the past *or* in the future is refused,
  and a zero tolerance is a configuration error rather than "no check";
* the body is hashed exactly as received, never decoded nor re-serialised.

Every refusal carries a stable ``reason`` and a message that never contains the header, the
body or a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from idempay.errors import ConfigurationError, SignatureVerificationError

__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_SIGNATURE_HEADER_LENGTH",
    "MAX_SIGNATURE_ITEMS",
    "MAX_TIMESTAMP",
    "SignatureHeader",
    "VerifiedSignature",
    "compute_signature",
    "parse_signature_header",
    "sign_payload",
    "verify_signature",
]

DEFAULT_TOLERANCE: Final = 300
"""Seconds a signature timestamp may differ from the current time, in either direction."""

MAX_SIGNATURE_HEADER_LENGTH: Final = 4096
"""Longest ``Stripe-Signature`` header accepted, in characters."""

MAX_SIGNATURE_ITEMS: Final = 32
"""Most signature items (every item except ``t``: ``v1``, ``v0``, unknown schemes) accepted."""

MAX_TIMESTAMP: Final = 999_999_999_999
"""Largest timestamp the header grammar can carry (12 digits)."""

_SCHEME: Final = re.compile(r"[a-z][a-z0-9]*")
_TIMESTAMP: Final = re.compile(r"[0-9]{1,12}")
_V1: Final = re.compile(r"[0-9a-f]{64}")
# Values of schemes idempay ignores must still be plain header text: printable ASCII, no space
# (whitespace is refused everywhere) and no comma (the item separator).
_OTHER_VALUE: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]+")

_HEADER: Final = "Stripe-Signature header"


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    """A parsed ``Stripe-Signature`` header.

    Attributes:
        timestamp: the signed ``t`` value, in Unix seconds.
        signatures: the ``v1`` values, lowercase hex, in the order of the header.
    """

    timestamp: int
    signatures: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class VerifiedSignature:
    """The outcome of a successful :func:`verify_signature`.

    Attributes:
        timestamp: the signed ``t`` value, in Unix seconds.
        secret_index: the position, in the configured secrets, of the first secret that
            matched; useful to see when an old secret can be retired after a rotation.
    """

    timestamp: int
    secret_index: int


def _refuse(reason: str, detail: str) -> SignatureVerificationError:
    return SignatureVerificationError(detail, reason=reason)


def _parse_item(position: int, item: str) -> tuple[str, str]:
    scheme, separator, value = item.partition("=")
    if not separator or not _SCHEME.fullmatch(scheme) or not value:
        raise _refuse("malformed_header", f"item {position} of the {_HEADER} is not 'scheme=value'")
    if scheme == "t":
        if not _TIMESTAMP.fullmatch(value):
            raise _refuse(
                "malformed_header", f"the 't' item of the {_HEADER} must be 1 to 12 ASCII digits"
            )
    elif scheme == "v1":
        if not _V1.fullmatch(value):
            raise _refuse(
                "malformed_header",
                f"a 'v1' item of the {_HEADER} must be 64 lowercase hex digits",
            )
    elif not _OTHER_VALUE.fullmatch(value):
        raise _refuse(
            "malformed_header",
            f"item {position} of the {_HEADER} has characters outside printable ASCII",
        )
    return scheme, value


def parse_signature_header(header: str) -> SignatureHeader:
    """Parse a ``Stripe-Signature`` header value with a strict grammar.

    The grammar: items separated by ``,``, no whitespace anywhere; each item is
    ``scheme=value`` with ``scheme`` matching ``[a-z][a-z0-9]*`` and a non-empty value of
    printable ASCII; exactly one ``t`` item whose value is 1 to 12 ASCII digits; ``v1`` values
    are exactly 64 lowercase hex digits. Other schemes are accepted and ignored, but count
    towards :data:`MAX_SIGNATURE_ITEMS`.

    Raises:
        SignatureVerificationError: with ``reason`` ``missing_header`` (empty),
            ``malformed_header`` (too long or outside the grammar), ``too_many_signatures``
            (more than :data:`MAX_SIGNATURE_ITEMS` items besides ``t``) or ``no_signatures``
            (no ``v1`` item).
    """
    if not header:
        raise _refuse("missing_header", f"the {_HEADER} is missing")
    if len(header) > MAX_SIGNATURE_HEADER_LENGTH:
        raise _refuse(
            "malformed_header",
            f"the {_HEADER} is longer than {MAX_SIGNATURE_HEADER_LENGTH} characters",
        )
    items = header.split(",")
    # A valid header has exactly one `t`, so every other item is a signature: counting the raw
    # items bounds the signatures before any of them is parsed.
    if len(items) > MAX_SIGNATURE_ITEMS + 1:
        raise _refuse(
            "too_many_signatures",
            f"the {_HEADER} has more than {MAX_SIGNATURE_ITEMS} signatures",
        )
    timestamp: int | None = None
    signatures: list[str] = []
    for position, item in enumerate(items, start=1):
        scheme, value = _parse_item(position, item)
        if scheme == "t":
            if timestamp is not None:
                raise _refuse("malformed_header", f"the {_HEADER} has more than one 't' item")
            timestamp = int(value)
        elif scheme == "v1":
            signatures.append(value)
    if timestamp is None:
        raise _refuse("malformed_header", f"the {_HEADER} has no 't' item")
    if not signatures:
        raise _refuse("no_signatures", f"the {_HEADER} has no 'v1' signature")
    return SignatureHeader(timestamp=timestamp, signatures=tuple(signatures))


def _check_payload(payload: object) -> None:
    # A str body means something upstream already decoded it: signing or checking that would
    # hash different bytes from the ones Stripe signed, so refuse the wiring outright.
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ConfigurationError("the payload must be the raw body as bytes")


def _check_timestamp(timestamp: object) -> int:
    if (
        not isinstance(timestamp, int)
        or isinstance(timestamp, bool)
        or not 0 <= timestamp <= MAX_TIMESTAMP
    ):
        raise ConfigurationError(f"timestamp must be an integer from 0 to {MAX_TIMESTAMP}")
    return timestamp


def _check_tolerance(tolerance: object) -> int:
    # Zero (or less) is refused rather than read as "no check": a disabled replay window must
    # never come from a default or a typo.
    if not isinstance(tolerance, int) or isinstance(tolerance, bool) or tolerance <= 0:
        raise ConfigurationError("tolerance must be a positive number of seconds")
    return tolerance


def _check_now(now: object) -> float:
    # NaN compares false against every bound and would silently turn the window off.
    if not isinstance(now, int | float) or isinstance(now, bool) or not math.isfinite(now):
        raise ConfigurationError("now must be a finite Unix time in seconds")
    return now


def _secret_key(secret: object) -> bytes:
    if not isinstance(secret, str) or not secret:
        raise ConfigurationError("every webhook secret must be a non-empty string")
    try:
        return secret.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be the UTF-8 of anything Stripe issued.
        raise ConfigurationError("a webhook secret is not valid Unicode text") from None


def _secret_keys(secrets: object) -> tuple[bytes, ...]:
    # A bare str is itself a Sequence[str]: iterating it would turn every character into a
    # "secret", so it is refused where a sequence is expected.
    if isinstance(secrets, str) or not isinstance(secrets, Sequence):
        raise ConfigurationError("secrets must be a sequence of strings, not a single string")
    if not secrets:
        raise ConfigurationError("at least one webhook secret is required")
    return tuple(_secret_key(secret) for secret in secrets)


def _digest(payload: bytes, key: bytes, timestamp: int) -> str:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(f"{timestamp}.".encode("ascii"))
    # Hash the body as received; concatenating first would copy a possibly large body.
    mac.update(payload)
    return mac.hexdigest()


def compute_signature(payload: bytes, secret: str, *, timestamp: int) -> str:
    """Return Stripe's ``v1`` signature of ``payload`` at ``timestamp``: 64 lowercase hex digits.

    The signed message is ``f"{timestamp}.".encode() + payload``; the key is the UTF-8 encoding
    of ``secret``.

    Raises:
        ConfigurationError: ``payload`` is not bytes, ``secret`` is empty or not a string, or
            ``timestamp`` is outside 0 to :data:`MAX_TIMESTAMP`.
    """
    _check_payload(payload)
    return _digest(payload, _secret_key(secret), _check_timestamp(timestamp))


def sign_payload(payload: bytes, secrets: str | Sequence[str], *, timestamp: int) -> str:
    """Build a valid ``Stripe-Signature`` header for ``payload``, as Stripe would send it.

    One ``v1`` item per secret, in the order given (a single string is one secret). Meant for
    tests and for the Stripe simulator; :func:`verify_signature` accepts what it returns.

    Raises:
        ConfigurationError: ``payload`` is not bytes, no secret or an empty one, more than
            :data:`MAX_SIGNATURE_ITEMS` secrets, or ``timestamp`` outside 0 to
            :data:`MAX_TIMESTAMP`.
    """
    _check_payload(payload)
    checked = _check_timestamp(timestamp)
    keys = (_secret_key(secrets),) if isinstance(secrets, str) else _secret_keys(secrets)
    if len(keys) > MAX_SIGNATURE_ITEMS:
        raise ConfigurationError(f"at most {MAX_SIGNATURE_ITEMS} secrets can sign one payload")
    items = [f"t={checked}"]
    items.extend(f"v1={_digest(payload, key, checked)}" for key in keys)
    return ",".join(items)


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    now: float,
    tolerance: int = DEFAULT_TOLERANCE,
) -> VerifiedSignature:
    """Check that ``payload`` was signed by Stripe with one of ``secrets``, recently.

    ``payload`` must be the raw body exactly as received. The header is parsed by
    :func:`parse_signature_header`. The signature matches when the expected signature of any
    configured secret equals any ``v1`` entry; every (secret, entry) pair is compared in
    constant time, without stopping at the first mismatch or match. Only then is the time
    checked: the delivery is refused when ``abs(now - t) > tolerance`` (a difference of exactly
    ``tolerance`` is accepted), which stops both old replays and pre-dated headers.

    Args:
        payload: the raw request body.
        header: the ``Stripe-Signature`` header value, or ``None`` when absent.
        secrets: the endpoint's active secrets, current first; at least one.
        now: the current Unix time in seconds (the caller's clock).
        tolerance: the allowed difference in seconds; must be positive.

    Returns:
        The verified timestamp and the index of the first configured secret that matched.

    Raises:
        ConfigurationError: no secret, an empty secret, a single string instead of a sequence,
            a tolerance that is not a positive integer, ``now`` not finite, or a payload that
            is not bytes. Checked before the request is looked at.
        SignatureVerificationError: ``reason`` ``missing_header``, ``malformed_header``,
            ``no_signatures``, ``too_many_signatures``, ``no_match`` or
            ``timestamp_outside_tolerance``.
    """
    keys = _secret_keys(secrets)
    window = _check_tolerance(tolerance)
    current = _check_now(now)
    _check_payload(payload)
    if header is None:
        raise _refuse("missing_header", f"the {_HEADER} is missing")
    parsed = parse_signature_header(header)

    matched: int | None = None
    for index, key in enumerate(keys):
        expected = _digest(payload, key, parsed.timestamp).encode("ascii")
        for candidate in parsed.signatures:
            # compare_digest runs for every pair: the loop's duration does not depend on
            # where, or whether, a match occurs.
            if hmac.compare_digest(expected, candidate.encode("ascii")) and matched is None:
                matched = index
    if matched is None:
        raise _refuse("no_match", "no signature matches the configured webhook secrets")
    # Checked after the signature so that a forged header learns nothing about the window.
    if abs(current - parsed.timestamp) > window:
        raise _refuse(
            "timestamp_outside_tolerance",
            f"the signature timestamp is more than {window} seconds from the current time",
        )
    return VerifiedSignature(timestamp=parsed.timestamp, secret_index=matched)
