"""The Lua scripts of the Redis backends, and the key and record layout they share with Python.

Every operation that reads and then writes is one script, so Redis runs it as one indivisible
step against every other client. Nothing here does I/O: the async module and its generated
sync twin both use these definitions.

Layout:

- a lock is the string key ``<prefix>:lock:{<tag>}`` holding its owner's random token, with a
  millisecond expiry; its fencing counter is ``<prefix>:fence:{<tag>}``, kept for
  :data:`FENCE_RETENTION_MS` (a week) after the last acquire, or the lock's ttl if longer, so
  that a lock name used once (one per PaymentIntent, one per idempotency key) does not hold
  memory for ever. A counter that expired restarts, as after a Redis restart: every write that
  matters is fenced again in the database.
  The braces are a Redis Cluster hash tag, so both keys live in one slot. ``<tag>`` is the
  lock name itself, or a digest of it (followed by ``:<name>``) when the name has braces or is
  empty, which would otherwise break the tag.
- an idempotency record is the hash ``<prefix>:idem:{<digest of scope and key>}`` with the
  fields of :data:`RECORD_FIELDS`; times are integer microseconds since the Unix epoch.

Time: when the caller passes no ``now`` (the argument is left out) a script reads ``TIME`` on
the Redis server, so every process agrees on when a lease ran out. Redis 5 and later replicate
a script's effects rather than its text, which is what allows ``TIME`` before a write.

Numbers: Redis formats a Lua number passed to ``redis.call`` with 17 significant digits, and
``string.format('%d')`` prints all of a 64-bit integer, so microsecond timestamps (16 digits,
below 2**53) are stored and returned exactly; scripts never build such numbers with
``tostring`` or ``cjson``, which round them to 14 digits (``cjson`` only ever sees the hash's
own text values).

Replies are small on purpose: redis-py's pure-Python parser pays for every RESP element it
reads, so a script answers with a status line or one string, never an array of fields, and
leaves out what the caller already knows (see ``decode_claim`` and ``decode_completed``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from idempay._lazy import require
from idempay.core.records import (
    Claimed,
    ClaimResult,
    Existing,
    IdempotencyRecord,
    Lease,
    RecordState,
    StoredResponse,
)
from idempay.errors import ConfigurationError, IdempayError, StoreError

if TYPE_CHECKING:
    from redis import exceptions as redis_exceptions
else:
    redis_exceptions = require("redis.exceptions", extra="redis")

__all__ = [
    "FENCE_RETENTION_MS",
    "LOCK_ACQUIRE",
    "LOCK_EXTEND",
    "LOCK_RELEASE",
    "PHYSICAL_MARGIN_MS",
    "RECORD_CHECKPOINT",
    "RECORD_CLAIM",
    "RECORD_COMPLETE",
    "RECORD_EXTEND",
    "RECORD_FIELDS",
    "RECORD_GET",
    "RECORD_PURGE",
    "RECORD_RELEASE",
    "check_positive",
    "check_prefix",
    "decode_claim",
    "decode_completed",
    "decode_record",
    "from_micros",
    "lock_keys",
    "milliseconds",
    "new_token",
    "record_key",
    "record_pattern",
    "response_args",
    "text",
    "to_micros",
    "translate_errors",
]

PHYSICAL_MARGIN_MS: Final = 60_000
"""How long a record's Redis key outlives its logical expiry.

The logical expiry (the ``expires`` field) decides what ``get`` and ``claim`` see; the key's
own TTL only lets Redis free the memory by itself, a little later, even if nobody purges.
"""

RECORD_FIELDS: Final = (
    "fp",
    "state",
    "fence",
    "created",
    "expires",
    "token",
    "lease_exp",
    "rp",
    "rid",
    "status",
    "ctype",
    "body",
    "headers",
)
"""The hash fields of a record. ``token``/``lease_exp`` exist while a lease does; ``rp`` and
``rid`` once checkpointed; ``status``, ``ctype``, ``body`` (base64) and ``headers`` (a JSON list
of pairs) once completed. ``token`` and ``lease_exp`` only count while ``state`` is
``in_progress`` (``complete`` leaves them behind rather than pay for an HDEL). Every value is
text, so clients decoding responses work too.

The scope and the key are not stored: the hash's name is their digest, and every call that
reads a record names them, so Python fills them in (less to send, store and send back)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_ZERO: Final = timedelta(0)
_STATES: Final = {state.value: state for state in RecordState}
_RECORD_DIGEST_LABEL: Final = b"idempay/redis-record/v1"
_LOCK_DIGEST_LABEL: Final = b"idempay/redis-lock/v1"
_GLOB_SPECIALS: Final = frozenset("*?[]\\")

# --- Lua -------------------------------------------------------------------------------------

_NOW: Final = """
local function now_us(arg)
  if arg then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

FENCE_RETENTION_MS: Final = 7 * 24 * 3600 * 1000
"""How long a lock's fencing counter outlives the lock's last acquire."""

LOCK_ACQUIRE: Final = (
    _NOW
    + f"local FENCE_RETENTION_MS = {FENCE_RETENTION_MS}\n"
    + """
-- KEYS: lock, fence. ARGV: token, ttl in ms.
-- Returns {fence, now in us} on success, else {0, the holder's remaining ms}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  redis.call('PEXPIRE', KEYS[2], math.max(tonumber(ARGV[2]), FENCE_RETENTION_MS))
  return {fence, now_us()}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
)

LOCK_RELEASE: Final = """
-- KEYS: lock. ARGV: token. Deletes the lock only if the token still owns it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

LOCK_EXTEND: Final = (
    _NOW
    + """
-- KEYS: lock. ARGV: token, ttl in ms. Returns now in us, or false if the lease was lost.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return now_us()
end
return false
"""
)

# The record scripts read a record with one HMGET of every field, in the order of
# RECORD_FIELDS (absent fields are false), and reply with as little as the caller needs: a
# status line when Python already knows the whole record, else one JSON string (cjson, decoded
# by json.loads in C) rather than a RESP array that redis-py would parse element by element.
_RECORD_HELPERS: Final = (
    _NOW
    + f"""
local FIELDS = {{{", ".join(f"'{name}'" for name in RECORD_FIELDS)}}}
local MARGIN_MS = {PHYSICAL_MARGIN_MS}

local function read(key)
  return redis.call('HMGET', key, unpack(FIELDS))
end

local function owned(key, token, fence)
  local f = redis.call('HMGET', key, 'state', 'token', 'fence')
  return f[1] == 'in_progress' and f[2] == token and f[3] == fence
end

local function keep_until(key, expires, now)
  redis.call('PEXPIRE', key, math.ceil((expires - now) / 1000) + MARGIN_MS)
end
"""
)

RECORD_CLAIM: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: fingerprint, token, lease_for us, retain_for us[, now us].
-- Returns the status 'C<fence>:<now us>' for a new record (the caller knows the rest of it),
-- else 'R' (taken over) or 'E' (existing) followed by the record as a JSON array of its fields.
local key = KEYS[1]
local now = now_us(ARGV[5])
local lease_for = tonumber(ARGV[3])
local r = read(key)
local expires = tonumber(r[5])
if not expires or expires <= now then
  local fence = (tonumber(r[3]) or 0) + 1
  expires = now + math.max(tonumber(ARGV[4]), lease_for)
  -- An expired record is replaced whole (no recovery point or response may survive it).
  for i = 1, #FIELDS do
    if r[i] then
      redis.call('DEL', key)
      break
    end
  end
  redis.call('HSET', key, 'fp', ARGV[1], 'state', 'in_progress', 'fence', fence,
    'created', now, 'expires', expires, 'token', ARGV[2], 'lease_exp', now + lease_for)
  keep_until(key, expires, now)
  -- %d formats the whole 64-bit integer; tostring would round to 14 digits.
  return redis.status_reply(string.format('C%d:%d', fence, now))
end
local lease_exp = tonumber(r[7])
local stale = r[2] == 'unknown'
  or (r[2] == 'in_progress' and (not lease_exp or lease_exp <= now))
if r[1] == ARGV[1] and stale then
  expires = math.max(expires, now + lease_for)
  redis.call('HSET', key, 'state', 'in_progress', 'fence', tonumber(r[3]) + 1,
    'token', ARGV[2], 'lease_exp', now + lease_for, 'expires', expires)
  keep_until(key, expires, now)
  return 'R' .. cjson.encode(read(key))
end
return 'E' .. cjson.encode(r)
"""
)

RECORD_CHECKPOINT: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, recovery point[, resource id]. Returns 1, or 0 if the lease
-- was lost.
if not owned(KEYS[1], ARGV[1], ARGV[2]) then
  return 0
end
if ARGV[4] then
  redis.call('HSET', KEYS[1], 'rp', ARGV[3], 'rid', ARGV[4])
else
  redis.call('HSET', KEYS[1], 'rp', ARGV[3])
end
return 1
"""
)

RECORD_EXTEND: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, lease_for us[, now us].
-- Returns the new lease expiry in us, or false if the lease was lost.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'state', 'token', 'fence', 'expires')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[1] or f[3] ~= ARGV[2] then
  return false
end
local now = now_us(ARGV[4])
local lease_exp = now + tonumber(ARGV[3])
local expires = math.max(tonumber(f[4]), lease_exp)
redis.call('HSET', key, 'lease_exp', lease_exp, 'expires', expires)
keep_until(key, expires, now)
return lease_exp
"""
)

RECORD_COMPLETE: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, state, status, content type, body (base64), headers (JSON).
-- Returns what the caller does not know of the record, as the JSON array [fingerprint, created,
-- expires, recovery point, resource id], or false if the lease was lost. Valid past the lease's
-- expiry as long as nobody took over: the fence and token still match then.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'state', 'token', 'fence', 'fp', 'created', 'expires', 'rp',
  'rid')
if f[1] ~= 'in_progress' or f[2] ~= ARGV[1] or f[3] ~= ARGV[2] then
  return false
end
-- token and lease_exp stay: they only count while the state is in_progress (saves an HDEL).
redis.call('HSET', key, 'state', ARGV[3], 'status', ARGV[4], 'ctype', ARGV[5], 'body', ARGV[6],
  'headers', ARGV[7])
return cjson.encode({f[4], f[5], f[6], f[7], f[8]})
"""
)

RECORD_RELEASE: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, '1' to delete the record or '0' to mark it unknown.
local key = KEYS[1]
if not owned(key, ARGV[1], ARGV[2]) then
  return 0
end
if ARGV[3] == '1' then
  redis.call('DEL', key)
else
  redis.call('HSET', key, 'state', 'unknown')
  redis.call('HDEL', key, 'token', 'lease_exp')
end
return 1
"""
)

RECORD_GET: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: [now us]. Returns the record as a JSON array of its fields, or false if
-- it is absent or expired.
local r = read(KEYS[1])
local expires = tonumber(r[5])
if not expires or expires <= now_us(ARGV[1]) then
  return false
end
return cjson.encode(r)
"""
)

RECORD_PURGE: Final = (
    _NOW
    + """
-- KEYS: record. ARGV: [now us]. Deletes the record if it has expired; returns 1 if it did.
local expires = redis.call('HGET', KEYS[1], 'expires')
if expires and tonumber(expires) <= now_us(ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)

# --- keys ------------------------------------------------------------------------------------


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if keys can be built from it.

    Braces are refused: a ``{`` in the prefix would become the Redis Cluster hash tag of every
    key, and could split a lock from its fence counter across slots.
    """
    if not prefix:
        raise ConfigurationError("the Redis key prefix must be a non-empty string")
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError("the Redis key prefix must not contain braces")
    return prefix


def lock_keys(prefix: str, name: str) -> tuple[str, str]:
    """Return the (lock, fence) keys of lock ``name``; both hash to the same cluster slot.

    Distinct names give distinct keys: a plain name ends its key right after the closing brace,
    a digested one always has ``:<name>`` after it.
    """
    if name and "{" not in name and "}" not in name:
        tag = f"{{{name}}}"
    else:
        digest = hashlib.sha256(_LOCK_DIGEST_LABEL + name.encode()).hexdigest()
        tag = f"{{{digest}}}:{name}"
    return f"{prefix}:lock:{tag}", f"{prefix}:fence:{tag}"


def record_key(prefix: str, scope: str, key: str) -> str:
    """Return the Redis key of the record for (scope, key); the digest is its hash tag.

    The fields are length-prefixed before hashing, so no two (scope, key) pairs share an input.
    """
    scope_bytes, key_bytes = scope.encode(), key.encode()
    material = b"".join(
        (
            _RECORD_DIGEST_LABEL,
            len(scope_bytes).to_bytes(8, "big"),
            scope_bytes,
            len(key_bytes).to_bytes(8, "big"),
            key_bytes,
        )
    )
    return f"{prefix}:idem:{{{hashlib.sha256(material).hexdigest()}}}"


def record_pattern(prefix: str) -> str:
    """Return the SCAN ``MATCH`` pattern of every record under ``prefix``."""
    escaped = "".join(f"\\{c}" if c in _GLOB_SPECIALS else c for c in prefix)
    return f"{escaped}:idem:*"


# --- values ----------------------------------------------------------------------------------


def new_token() -> str:
    """Return a fresh owner token (128 random bits)."""
    return secrets.token_hex(16)


def check_positive(value: timedelta, name: str) -> None:
    """Raise ConfigurationError unless ``value`` is a positive duration."""
    if value <= _ZERO:
        raise ConfigurationError(f"{name} must be positive")


def to_micros(value: datetime | timedelta) -> int:
    """Return a time as microseconds since the Unix epoch, or a duration in microseconds."""
    if isinstance(value, datetime):
        return (value - _EPOCH) // _MICROSECOND
    return value // _MICROSECOND


def from_micros(value: int) -> datetime:
    """Return the UTC time ``value`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(0, 0, value)  # positional: measurably faster on the hot path


def milliseconds(value: timedelta) -> int:
    """Return ``value`` in whole milliseconds, rounded up so that a key outlives its lease."""
    return max(1, math.ceil(value / timedelta(milliseconds=1)))


def text(value: bytes | str) -> str:
    """Return a Redis reply value as text, whether the client decodes responses or not."""
    return value.decode() if isinstance(value, bytes) else value


def response_args(response: StoredResponse) -> list[str]:
    """Return the status, content type, base64 body and JSON headers of a response."""
    return [
        str(response.status),
        response.content_type,
        base64.b64encode(response.body).decode("ascii"),
        json.dumps([list(pair) for pair in response.headers], separators=(",", ":"))
        if response.headers
        else "[]",
    ]


def _headers(raw: str) -> tuple[tuple[str, str], ...]:
    if raw == "[]":
        return ()
    pairs: list[tuple[str, str]] = []
    for item in json.loads(raw):
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("a stored header is not a pair of strings")
        pairs.append((name, value))
    return tuple(pairs)


def _present(*values: object) -> None:
    """Check fields every record (or response) has: the scripts send an absent one as false."""
    if False in values:
        raise TypeError("a required field of the record is missing")


def _optional(value: object) -> str | None:
    return None if value is False else str(value)


# UnicodeDecodeError and binascii.Error are ValueErrors; OverflowError: a time out of range.
_DECODE_ERRORS: Final = (KeyError, ValueError, TypeError, OverflowError)
_MALFORMED: Final = "an idempotency record in Redis is malformed"


def decode_record(reply: bytes | str, scope: str, key: str) -> IdempotencyRecord:
    """Build the record of (scope, key) from the JSON array of its fields, in the order of
    :data:`RECORD_FIELDS`.

    Every element is the hash's text value, or false for an absent field (the script's cjson
    only ever encodes HMGET's reply), so only presence needs checking.

    Raises:
        StoreError: the hash does not hold a well-formed record.
    """
    try:
        # Decoded here (in C): json.loads would detect the encoding of bytes in Python first.
        values = json.loads(text(reply))
        if not isinstance(values, list) or len(values) != len(RECORD_FIELDS):
            raise TypeError("a record is not the list of its fields")
        (
            fingerprint,
            state,
            fence,
            created,
            expires,
            token,
            lease_exp,
            recovery_point,
            resource_id,
            status,
            content_type,
            body,
            headers,
        ) = values
        _present(fingerprint, state, fence, created, expires)
        fence_number = int(fence)
        lease = None
        if token is not False and state == "in_progress":
            _present(lease_exp)
            lease = Lease(token, fence_number, from_micros(int(lease_exp)))
        response = None
        if status is not False:
            _present(content_type, body, headers)
            response = StoredResponse(
                status=int(status),
                body=base64.b64decode(body, validate=True),
                content_type=content_type,
                headers=_headers(headers),
            )
        return IdempotencyRecord(
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            state=_STATES[state],
            fence=fence_number,
            created_at=from_micros(int(created)),
            expires_at=from_micros(int(expires)),
            lease=lease,
            recovery_point=_optional(recovery_point),
            resource_id=_optional(resource_id),
            response=response,
        )
    except _DECODE_ERRORS as exc:
        raise StoreError(_MALFORMED) from exc


def decode_claim(
    reply: bytes | str,
    *,
    scope: str,
    key: str,
    fingerprint: str,
    token: str,
    lease_for: timedelta,
    retain_for: timedelta,
) -> ClaimResult:
    """Build the result of a claim from the script's reply and what the claim sent.

    A new record is built here from the claim's own arguments and the fence and time the
    script used, exactly what the script wrote; a takeover or an existing record comes whole.

    Raises:
        StoreError: the reply is not one the claim script gives.
    """
    # Bytes, or text if the client decodes responses.
    tag, rest = reply[:1], reply[1:]
    if tag in (b"C", "C"):
        try:
            fence_text, _, now_text = text(rest).partition(":")
            fence = int(fence_text)
            now = from_micros(int(now_text))
        except _DECODE_ERRORS as exc:
            raise StoreError("Redis answered a claim with an unexpected reply") from exc
        lease = Lease(token, fence, now + lease_for)
        record = IdempotencyRecord(
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            state=RecordState.IN_PROGRESS,
            fence=fence,
            created_at=now,
            expires_at=now + max(retain_for, lease_for),
            lease=lease,
        )
        return Claimed(record=record, lease=lease)
    if tag in (b"E", "E"):
        return Existing(record=decode_record(rest, scope, key))
    if tag in (b"R", "R"):
        record = decode_record(rest, scope, key)
        if record.lease is None or record.lease.token != token:
            raise StoreError("Redis answered a claim with a record this claim does not own")
        return Claimed(record=record, lease=record.lease, resumed=True)
    raise StoreError("Redis answered a claim with an unexpected reply")


def decode_completed(
    reply: bytes | str,
    *,
    scope: str,
    key: str,
    lease: Lease,
    state: RecordState,
    response: StoredResponse,
) -> IdempotencyRecord:
    """Build the record ``complete`` has just written from what it sent and the script's reply
    (the fields it did not know: fingerprint, creation and expiry, recovery point, resource id).

    Raises:
        StoreError: the reply is not one the complete script gives.
    """
    try:
        # Decoded here (in C): json.loads would detect the encoding of bytes in Python first.
        values = json.loads(text(reply))
        if not isinstance(values, list) or len(values) != 5:
            raise TypeError("the reply is not the list of the record's other fields")
        fingerprint, created, expires, recovery_point, resource_id = values
        _present(fingerprint, created, expires)
        return IdempotencyRecord(
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            state=state,
            fence=lease.fence,
            created_at=from_micros(int(created)),
            expires_at=from_micros(int(expires)),
            recovery_point=_optional(recovery_point),
            resource_id=_optional(resource_id),
            response=response,
        )
    except _DECODE_ERRORS as exc:
        raise StoreError(_MALFORMED) from exc


@contextmanager
def translate_errors(error: type[IdempayError], action: str) -> Iterator[None]:
    """Turn a Redis or network failure inside the block into ``error`` (chained).

    The message names the action only: never a key, a token or a payload.
    """
    try:
        yield
    except (redis_exceptions.RedisError, OSError) as exc:
        raise error(f"Redis failed to {action} ({type(exc).__name__})") from exc
