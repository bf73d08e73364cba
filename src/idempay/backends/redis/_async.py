"""Redis lock provider and idempotency-record store (the sync twin is generated from this).

Each operation is one Lua script, so one round trip and one indivisible step in Redis (see
:mod:`idempay.backends.redis._lua` for the key layout). Redis failures are raised as
:class:`~idempay.errors.LockError` by the lock provider and as
:class:`~idempay.errors.StoreError` by the store: a lock provider fails closed, and the caller
decides whether to answer 503 or to carry on with the database guards alone.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from datetime import timedelta
from time import monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

from idempay._lazy import require
from idempay.backends.redis._lua import (
    LOCK_ACQUIRE,
    LOCK_EXTEND,
    LOCK_RELEASE,
    RECORD_CHECKPOINT,
    RECORD_CLAIM,
    RECORD_COMPLETE,
    RECORD_EXTEND,
    RECORD_GET,
    RECORD_PURGE,
    RECORD_RELEASE,
    check_positive,
    check_prefix,
    decode_claim,
    decode_completed,
    decode_record,
    from_micros,
    lock_keys,
    milliseconds,
    new_token,
    record_key,
    record_pattern,
    response_args,
    to_micros,
    translate_errors,
)
from idempay.clock import Clock
from idempay.core.keys import validate_key
from idempay.core.records import ClaimResult, IdempotencyRecord, Lease, RecordState, StoredResponse
from idempay.errors import ConfigurationError, LeaseLostError, LockError, StoreError

if TYPE_CHECKING:
    import redis.asyncio as redis_client
    from redis import backoff as redis_backoff
    from redis import exceptions as redis_exceptions
    from redis.asyncio import retry as redis_retry
    from redis.commands.core import AsyncScript
else:
    redis_client = require("redis.asyncio", extra="redis")
    redis_backoff = require("redis.backoff", extra="redis")
    redis_exceptions = require("redis.exceptions", extra="redis")
    redis_retry = require("redis.asyncio.retry", extra="redis")

__all__ = ["AsyncRedisIdempotencyStore", "AsyncRedisLockProvider"]

_NO_WAIT: Final = timedelta(0)
_FIRST_PAUSE: Final = 0.002
_MAX_PAUSE: Final = 0.05
_SCAN_BATCH: Final = 500
_LOST: Final = "the idempotency record is no longer held by this lease"


def _client_from_url(url: str, socket_timeout: float) -> redis_client.Redis:
    """A client that fails fast: bounded socket timeouts and one immediate reconnect.

    A broken connection is retried once, at once, so that a restarted Redis costs no error
    (the async client only notices a dead pooled connection when it uses it). A timeout is
    never retried: the script may be running, and the caller sees LockError/StoreError. The
    rare double run after a connection broke mid-reply is harmless: every script is
    conditional, so a repeated claim answers Existing and a repeated write LeaseLostError.
    """
    if socket_timeout <= 0:
        raise ConfigurationError("socket_timeout must be positive")
    try:
        return redis_client.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=redis_retry.Retry(
                redis_backoff.NoBackoff(),
                retries=1,
                supported_errors=(redis_exceptions.ConnectionError,),
            ),
        )
    except ValueError as exc:
        raise ConfigurationError("the Redis URL is not valid") from exc


def _pauses() -> Sequence[float]:
    """Growing, jittered pauses between attempts to take a busy lock (then the last one)."""
    pauses = []
    pause = _FIRST_PAUSE
    while pause < _MAX_PAUSE:
        pauses.append(pause * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not secrecy
        pause *= 2
    pauses.append(_MAX_PAUSE * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not secrecy
    return pauses


class AsyncRedisLockProvider:
    """Fenced, expiring locks in one Redis (or one Redis Cluster slot per lock).

    Guarantees: a lock always has an expiry; of concurrent acquirers at most one holds it while
    its key lives; each successful acquire gets a fence greater than every fence handed out
    before for that name, as long as the fence counter key survives (it has no expiry; a Redis
    restarted empty or an eviction resets it, which is why the stores fence writes too);
    release and extend change nothing unless the lease's token still owns the lock.

    Like any Redis lock this is approximate (a failover can lose a lock, a paused holder can
    outlive its lease): it cuts duplicate work, and correctness never rests on it.
    """

    def __init__(self, client: redis_client.Redis, *, prefix: str = "idempay") -> None:
        self._client = client
        self._prefix = check_prefix(prefix)
        self._owns_client = False
        self._acquire: AsyncScript = client.register_script(LOCK_ACQUIRE)
        self._release: AsyncScript = client.register_script(LOCK_RELEASE)
        self._extend: AsyncScript = client.register_script(LOCK_EXTEND)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "idempay", socket_timeout: float = 2.0) -> Self:
        """Connect to ``redis://`` or ``rediss://`` ``url``; :meth:`aclose` closes the client."""
        provider = cls(_client_from_url(url, socket_timeout), prefix=prefix)
        provider._owns_client = True
        return provider

    async def aclose(self) -> None:
        """Close the client if this provider created it (a client passed in stays open)."""
        if self._owns_client:
            with translate_errors(LockError, "close the connection"):
                await self._client.aclose()  # unasync: remove
                # self._client.close()  # unasync: sync-only

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()  # unasync: remove
        # self.close()  # unasync: sync-only

    async def acquire(
        self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT
    ) -> Lease | None:
        """Take lock ``name`` for ``ttl``, retrying up to ``wait``; None if it stays busy.

        Raises:
            ConfigurationError: ``ttl`` is not positive.
            LockError: Redis failed or could not be reached.
        """
        check_positive(ttl, "ttl")
        keys = lock_keys(self._prefix, name)
        ttl_ms = milliseconds(ttl)
        deadline = monotonic() + max(wait, _NO_WAIT).total_seconds()
        pauses = iter(_pauses())
        pause = 0.0
        while True:
            token = new_token()
            with translate_errors(LockError, "acquire a lock"):
                fence, detail = await self._acquire(keys=keys, args=[token, ttl_ms])
            if int(fence) > 0:
                return Lease(
                    token=token, fence=int(fence), expires_at=from_micros(int(detail)) + ttl
                )
            remaining = deadline - monotonic()
            if remaining <= 0:
                return None
            pause = next(pauses, pause)
            # No point waiting past the holder's expiry (``detail`` is its remaining ms).
            holder_left = int(detail) / 1000 if int(detail) > 0 else pause
            await asyncio.sleep(min(remaining, pause, holder_left))

    async def release(self, name: str, lease: Lease) -> bool:
        """Release the lock if ``lease`` still owns it; False (nothing changed) otherwise.

        Raises:
            LockError: Redis failed or could not be reached.
        """
        lock, _ = lock_keys(self._prefix, name)
        with translate_errors(LockError, "release a lock"):
            deleted = await self._release(keys=[lock], args=[lease.token])
        return int(deleted) == 1

    async def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        """Move the expiry to now + ``ttl`` if ``lease`` still owns the lock, else None.

        Raises:
            ConfigurationError: ``ttl`` is not positive.
            LockError: Redis failed or could not be reached.
        """
        check_positive(ttl, "ttl")
        lock, _ = lock_keys(self._prefix, name)
        with translate_errors(LockError, "extend a lock"):
            now = await self._extend(keys=[lock], args=[lease.token, milliseconds(ttl)])
        if now is None:
            return None
        return Lease(token=lease.token, fence=lease.fence, expires_at=from_micros(int(now)) + ttl)


class AsyncRedisIdempotencyStore:
    """Idempotency records in Redis, one hash per (scope, key); the semantics of the protocol.

    Every method is one Lua script. Lease and record times come from the Redis server's clock
    (``TIME``), shared by every process, unless a ``clock`` is given (tests, simulations).
    Scripts reply with as little as the caller needs: the records that :meth:`claim` (for a new
    record) and :meth:`complete` return are built from what they sent plus the few values the
    script read or chose in the same step, so they equal what :meth:`get` reads right after.
    A record's key expires by itself a minute after the record does; until then
    :meth:`purge_expired` can delete it.

    Redis is not a database: a record lost to a failover, a restart without persistence or an
    eviction (use ``maxmemory-policy noeviction``) lets its key run again. Keep the database
    guards (unique orders, fenced writes) when the outcome matters.
    """

    def __init__(
        self,
        client: redis_client.Redis,
        *,
        prefix: str = "idempay",
        clock: Clock | None = None,
    ) -> None:
        self._client = client
        self._prefix = check_prefix(prefix)
        self._clock = clock
        self._owns_client = False
        self._claim: AsyncScript = client.register_script(RECORD_CLAIM)
        self._checkpoint: AsyncScript = client.register_script(RECORD_CHECKPOINT)
        self._extend: AsyncScript = client.register_script(RECORD_EXTEND)
        self._complete: AsyncScript = client.register_script(RECORD_COMPLETE)
        self._release: AsyncScript = client.register_script(RECORD_RELEASE)
        self._get: AsyncScript = client.register_script(RECORD_GET)
        self._purge: AsyncScript = client.register_script(RECORD_PURGE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "idempay",
        clock: Clock | None = None,
        socket_timeout: float = 2.0,
    ) -> Self:
        """Connect to ``redis://`` or ``rediss://`` ``url``; :meth:`aclose` closes the client."""
        store = cls(_client_from_url(url, socket_timeout), prefix=prefix, clock=clock)
        store._owns_client = True
        return store

    async def aclose(self) -> None:
        """Close the client if this store created it (a client passed in stays open)."""
        if self._owns_client:
            with translate_errors(StoreError, "close the connection"):
                await self._client.aclose()  # unasync: remove
                # self._client.close()  # unasync: sync-only

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()  # unasync: remove
        # self.close()  # unasync: sync-only

    def _now(self) -> list[str | int]:
        """The time argument of a script: none for the Redis server's own clock."""
        return [] if self._clock is None else [to_micros(self._clock.now())]

    async def _run(
        self, script: AsyncScript, scope: str, key: str, args: list[str | int], action: str
    ) -> Any:
        """Run ``script`` on the record of (scope, key): one EVALSHA, one round trip.

        Called by SHA1 directly, which skips the Script object's per-call work (an import and
        two tuple copies); the Script object still loads the script when Redis answers
        NOSCRIPT (a restarted Redis, a failover, SCRIPT FLUSH): the script had not run, so
        running it then is safe.
        """
        record = record_key(self._prefix, scope, key)
        # The same translation as translate_errors, inline: this runs on every call, and the
        # generator-based context manager costs about a microsecond each time.
        try:
            try:
                return await self._client.evalsha(script.sha, 1, record, *args)
            except redis_exceptions.NoScriptError:
                return await script(keys=[record], args=args)
        except (redis_exceptions.RedisError, OSError) as exc:
            raise StoreError(f"Redis failed to {action} ({type(exc).__name__})") from exc

    async def claim(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        lease_for: timedelta,
        retain_for: timedelta,
    ) -> ClaimResult:
        validate_key(key)
        check_positive(lease_for, "lease_for")
        check_positive(retain_for, "retain_for")
        token = new_token()
        args: list[str | int] = [
            fingerprint,
            token,
            to_micros(lease_for),
            to_micros(retain_for),
            *self._now(),
        ]
        reply = await self._run(self._claim, scope, key, args, "claim an idempotency record")
        return decode_claim(
            reply,
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            token=token,
            lease_for=lease_for,
            retain_for=retain_for,
        )

    async def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        args: list[str | int] = [lease.token, lease.fence, recovery_point]
        if resource_id is not None:
            args.append(resource_id)
        written = await self._run(
            self._checkpoint, scope, key, args, "checkpoint an idempotency record"
        )
        if int(written) != 1:
            raise LeaseLostError(_LOST)

    async def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        check_positive(lease_for, "lease_for")
        args: list[str | int] = [lease.token, lease.fence, to_micros(lease_for), *self._now()]
        expiry = await self._run(self._extend, scope, key, args, "extend an idempotency lease")
        if expiry is None:
            raise LeaseLostError(_LOST)
        return Lease(token=lease.token, fence=lease.fence, expires_at=from_micros(int(expiry)))

    async def complete(
        self,
        scope: str,
        key: str,
        lease: Lease,
        response: StoredResponse,
        *,
        failed: bool = False,
    ) -> IdempotencyRecord:
        """See :meth:`idempay.protocols.IdempotencyStore.complete`.

        The record returned is built from what this call sent and the fields the script read
        in the same step, so it is exactly what a ``get`` would return right after.
        """
        state = RecordState.FAILED if failed else RecordState.COMPLETED
        args: list[str | int] = [lease.token, lease.fence, state.value, *response_args(response)]
        reply = await self._run(self._complete, scope, key, args, "complete an idempotency record")
        if reply is None:
            raise LeaseLostError(_LOST)
        return decode_completed(
            reply, scope=scope, key=key, lease=lease, state=state, response=response
        )

    async def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        args: list[str | int] = [lease.token, lease.fence, "1" if discard else "0"]
        released = await self._run(self._release, scope, key, args, "release an idempotency record")
        if int(released) != 1:
            raise LeaseLostError(_LOST)

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        reply = await self._run(self._get, scope, key, self._now(), "read an idempotency record")
        return None if reply is None else decode_record(reply, scope, key)

    async def purge_expired(self, *, limit: int = 1000) -> int:
        """Delete up to ``limit`` expired records under this store's prefix; return the count.

        Walks the prefix with SCAN and deletes each expired record with its own conditional
        script, so a record claimed again meanwhile is kept. Redis also drops a record's key by
        itself a minute after the record expires; this only frees memory sooner.
        """
        deleted = 0
        now = self._now()
        pattern = record_pattern(self._prefix)
        cursor = 0
        with translate_errors(StoreError, "purge expired idempotency records"):
            while deleted < limit:
                cursor, batch = await self._client.scan(cursor, match=pattern, count=_SCAN_BATCH)
                for record in batch:
                    deleted += int(await self._purge(keys=[record], args=now))
                    if deleted >= limit:
                        break
                if cursor == 0:
                    break
        return deleted
