"""The Lua scripts of the Redis backends, and the key and record layout they share with Python.

Every operation that reads and then writes is one script, so Redis runs it as one indivisible
step against every other client. Nothing here does I/O: the async module and its generated
sync twin both use these definitions.

Layout:

- a lock is the string key ``<prefix>:lock:{<tag>}`` holding its owner's random token, with a
  millisecond expiry; its fencing counter is ``<prefix>:fence:{<tag>}``, which never expires.
  The braces are a Redis Cluster hash tag, so both keys live in one slot. ``<tag>`` is the
  lock name itself, or a digest of it (followed by ``:<name>``) when the name has braces or is
  empty, which would otherwise break the tag.
- an idempotency record is the hash ``<prefix>:idem:{<digest of scope and key>}`` with the
  fields of :data:`RECORD_FIELDS`; times are integer microseconds since the Unix epoch.

Time: when the caller passes no ``now`` (an empty string) a script reads ``TIME`` on the Redis
server, so every process agrees on when a lease ran out. Redis 5 and later replicate a
script's effects rather than its text, which is what allows ``TIME`` before a write.

Numbers: Redis formats a Lua number passed to ``redis.call`` with 17 significant digits, so
microsecond timestamps (16 digits, below 2**53) are stored exactly; scripts never build such
numbers with ``tostring``, which would round them to 14 digits.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Final

from idempay._lazy import require
from idempay.core.records import IdempotencyRecord, Lease, RecordState, StoredResponse
from idempay.errors import ConfigurationError, IdempayError, StoreError

if TYPE_CHECKING:
    from redis import exceptions as redis_exceptions
else:
    redis_exceptions = require("redis.exceptions", extra="redis")

__all__ = [
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
    "scope",
    "key",
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
of pairs) once completed. Every value is text, so clients decoding responses work too."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_RECORD_DIGEST_LABEL: Final = b"idempay/redis-record/v1"
_LOCK_DIGEST_LABEL: Final = b"idempay/redis-lock/v1"
_GLOB_SPECIALS: Final = frozenset("*?[]\\")

# --- Lua -------------------------------------------------------------------------------------

_NOW: Final = """
local function now_us(arg)
  if arg ~= '' then
    return tonumber(arg)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

LOCK_ACQUIRE: Final = (
    _NOW
    + """
-- KEYS: lock, fence. ARGV: token, ttl in ms.
-- Returns {fence, now in us} on success, else {0, the holder's remaining ms}.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  return {fence, now_us('')}
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
  return now_us('')
end
return false
"""
)

_RECORD_HELPERS: Final = (
    _NOW
    + """
local function owned(key, token, fence)
  local f = redis.call('HMGET', key, 'state', 'token', 'fence')
  return f[1] == 'in_progress' and f[2] == token and f[3] == fence
end

local function keep_until(key, expires, now, margin)
  redis.call('PEXPIRE', key, math.ceil((expires - now) / 1000) + tonumber(margin))
end
"""
)

RECORD_CLAIM: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: scope, key, fingerprint, token, lease_for us, retain_for us, now us or '',
-- margin ms. Returns {'claimed' | 'resumed' | 'existing', the record's fields}.
local key = KEYS[1]
local now = now_us(ARGV[7])
local lease_for = tonumber(ARGV[5])
local f = redis.call('HMGET', key, 'fp', 'state', 'fence', 'expires', 'lease_exp')
if not f[4] or tonumber(f[4]) <= now then
  local fence = 1
  if f[3] then
    fence = tonumber(f[3]) + 1
  end
  local expires = now + math.max(tonumber(ARGV[6]), lease_for)
  redis.call('DEL', key)
  redis.call('HSET', key, 'scope', ARGV[1], 'key', ARGV[2], 'fp', ARGV[3],
    'state', 'in_progress', 'fence', fence, 'created', now, 'expires', expires,
    'token', ARGV[4], 'lease_exp', now + lease_for)
  keep_until(key, expires, now, ARGV[8])
  return {'claimed', redis.call('HGETALL', key)}
end
local stale = f[2] == 'unknown'
  or (f[2] == 'in_progress' and (not f[5] or tonumber(f[5]) <= now))
if f[1] == ARGV[3] and stale then
  local expires = math.max(tonumber(f[4]), now + lease_for)
  redis.call('HSET', key, 'state', 'in_progress', 'fence', tonumber(f[3]) + 1,
    'token', ARGV[4], 'lease_exp', now + lease_for, 'expires', expires)
  keep_until(key, expires, now, ARGV[8])
  return {'resumed', redis.call('HGETALL', key)}
end
return {'existing', redis.call('HGETALL', key)}
"""
)

RECORD_CHECKPOINT: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, recovery point, '1' to set the resource id or '0', resource id.
if not owned(KEYS[1], ARGV[1], ARGV[2]) then
  return 0
end
redis.call('HSET', KEYS[1], 'rp', ARGV[3])
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'rid', ARGV[5])
end
return 1
"""
)

RECORD_EXTEND: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, lease_for us, now us or '', margin ms.
-- Returns the new lease expiry in us, or false if the lease was lost.
local key = KEYS[1]
if not owned(key, ARGV[1], ARGV[2]) then
  return false
end
local now = now_us(ARGV[4])
local lease_exp = now + tonumber(ARGV[3])
local expires = math.max(tonumber(redis.call('HGET', key, 'expires')), lease_exp)
redis.call('HSET', key, 'lease_exp', lease_exp, 'expires', expires)
keep_until(key, expires, now, ARGV[5])
return lease_exp
"""
)

RECORD_COMPLETE: Final = (
    _RECORD_HELPERS
    + """
-- KEYS: record. ARGV: token, fence, state, status, content type, body (base64), headers (JSON).
-- Returns the record's fields, or false if the lease was lost. Valid past the lease's expiry as
-- long as nobody took over: the fence and token still match then.
local key = KEYS[1]
if not owned(key, ARGV[1], ARGV[2]) then
  return false
end
redis.call('HSET', key, 'state', ARGV[3], 'status', ARGV[4], 'ctype', ARGV[5], 'body', ARGV[6],
  'headers', ARGV[7])
redis.call('HDEL', key, 'token', 'lease_exp')
return redis.call('HGETALL', key)
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
    _NOW
    + """
-- KEYS: record. ARGV: now us or ''. Returns the fields, or an empty list if absent or expired.
local expires = redis.call('HGET', KEYS[1], 'expires')
if not expires or tonumber(expires) <= now_us(ARGV[1]) then
  return {}
end
return redis.call('HGETALL', KEYS[1])
"""
)

RECORD_PURGE: Final = (
    _NOW
    + """
-- KEYS: record. ARGV: now us or ''. Deletes the record if it has expired; returns 1 if it did.
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
    material = hashlib.sha256(_RECORD_DIGEST_LABEL)
    for part in (scope.encode(), key.encode()):
        material.update(len(part).to_bytes(8, "big"))
        material.update(part)
    return f"{prefix}:idem:{{{material.hexdigest()}}}"


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
    if value <= timedelta(0):
        raise ConfigurationError(f"{name} must be positive")


def to_micros(value: datetime | timedelta) -> int:
    """Return a time as microseconds since the Unix epoch, or a duration in microseconds."""
    if isinstance(value, datetime):
        return (value - _EPOCH) // _MICROSECOND
    return value // _MICROSECOND


def from_micros(value: int) -> datetime:
    """Return the UTC time ``value`` microseconds after the Unix epoch."""
    return _EPOCH + timedelta(microseconds=value)


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
        json.dumps([list(pair) for pair in response.headers], separators=(",", ":")),
    ]


def _headers(raw: str) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    for item in json.loads(raw):
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError("a stored header is not a pair of strings")
        pairs.append((name, value))
    return tuple(pairs)


def decode_record(reply: Sequence[bytes | str]) -> IdempotencyRecord:
    """Build a record from the flat field/value list a script returned.

    Raises:
        StoreError: the hash does not hold a well-formed record.
    """
    try:
        it: Iterator[bytes | str] = iter(reply)
        fields = {text(name): text(value) for name, value in zip(it, it, strict=True)}
        fence = int(fields["fence"])
        lease = None
        if "token" in fields:
            lease = Lease(fields["token"], fence, from_micros(int(fields["lease_exp"])))
        response = None
        if "status" in fields:
            response = StoredResponse(
                status=int(fields["status"]),
                body=base64.b64decode(fields["body"], validate=True),
                content_type=fields["ctype"],
                headers=_headers(fields["headers"]),
            )
        return IdempotencyRecord(
            scope=fields["scope"],
            key=fields["key"],
            fingerprint=fields["fp"],
            state=RecordState(fields["state"]),
            fence=fence,
            created_at=from_micros(int(fields["created"])),
            expires_at=from_micros(int(fields["expires"])),
            lease=lease,
            recovery_point=fields.get("rp"),
            resource_id=fields.get("rid"),
            response=response,
        )
    except (KeyError, ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise StoreError("an idempotency record in Redis is malformed") from exc


@contextmanager
def translate_errors(error: type[IdempayError], action: str) -> Iterator[None]:
    """Turn a Redis or network failure inside the block into ``error`` (chained).

    The message names the action only: never a key, a token or a payload.
    """
    try:
        yield
    except (redis_exceptions.RedisError, OSError) as exc:
        raise error(f"Redis failed to {action} ({type(exc).__name__})") from exc
