"""PostgreSQL advisory locks: fenced, expiring locks that the server itself times out.

Each lease is a transaction-level advisory lock (``pg_try_advisory_xact_lock``) held by an open
transaction on a connection checked out of the pool for the lease's whole life. The same
transaction sets ``idle_in_transaction_session_timeout`` to the lease's ttl, so if the holder
stalls past it the *server* ends the session and the lock goes with it; if the process dies the
connection closes and the lock goes too. No lock ever outlives its expiry by more than a round
trip, whatever the client does.

Names map to 64-bit keys by a stable hash (collisions only cost false contention). Fences come
from the sequence ``idempay_lock_fence`` (created on first use if absent), drawn in the same
statement that takes the lock, so every acquisition gets a fence above all earlier ones.
Expiry times come from the database clock.

Each held lease occupies one pooled connection until it is released: size the engine's pool
for the number of locks held at once, plus one per waiter.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Self

from idempay._lazy import require
from idempay.core.records import Lease
from idempay.errors import ConfigurationError, LockError

require("sqlalchemy", extra="postgres")

import sqlalchemy as sa  # noqa: E402

if TYPE_CHECKING:
    # Imported for real only by the async provider: SQLAlchemy's asyncio layer needs greenlet,
    # which the sync provider does without.
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["AsyncPostgresAdvisoryLockProvider", "PostgresAdvisoryLockProvider"]

logger = logging.getLogger(__name__)

_NO_WAIT: Final = timedelta(0)
_MAX_TIMEOUT_MS: Final = 2**31 - 1  # the server's limit for a timeout setting
_FIRST_PAUSE: Final = 0.005
_MAX_PAUSE: Final = 0.1
_KEY_DOMAIN: Final = b"idempay.lock\x00"
# Serialises concurrent creators of the fence sequence: CREATE ... IF NOT EXISTS alone can
# still fail with a unique violation when two sessions race.
_CREATE_GUARD_KEY: Final = int.from_bytes(
    hashlib.sha256(b"idempay.lock.fence-sequence").digest()[:8], "big", signed=True
)

_SEQUENCE_EXISTS = sa.text("SELECT to_regclass('idempay_lock_fence') IS NOT NULL")
_CREATE_GUARD = sa.text(
    "SELECT set_config('lock_timeout', '10s', true), pg_advisory_xact_lock(CAST(:key AS bigint))"
)
_CREATE_SEQUENCE = sa.text("CREATE SEQUENCE IF NOT EXISTS idempay_lock_fence AS bigint")
# The inner query is evaluated first (OFFSET 0 keeps the planner from merging it), so nextval
# is drawn only once the lock is ours: a later holder always draws a later, larger fence.
_TRY_LOCK = sa.text(
    "SELECT attempt.locked,"
    " CASE WHEN attempt.locked THEN nextval('idempay_lock_fence') END AS fence,"
    " clock_timestamp() AS db_now"
    " FROM (SELECT pg_try_advisory_xact_lock(CAST(:key AS bigint)) AS locked,"
    " set_config('idle_in_transaction_session_timeout', CAST(:timeout AS text), true) AS t"
    " OFFSET 0) AS attempt"
)
_EXTEND = sa.text(
    "SELECT set_config('idle_in_transaction_session_timeout', CAST(:timeout AS text), true),"
    " clock_timestamp()"
)
_NOW = sa.text("SELECT clock_timestamp()")


def _lock_key(name: str) -> int:
    """The advisory lock key of ``name``: stable across processes, versions and platforms."""
    digest = hashlib.sha256(_KEY_DOMAIN + name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _timeout_ms(ttl: timedelta) -> str:
    if ttl <= timedelta(0):
        raise ConfigurationError("ttl must be positive")
    # Rounded up, and never 0 (which would switch the timeout off): the server may end the
    # session slightly after the lease's expiry, never before it.
    millis = max(1, math.ceil(ttl / timedelta(milliseconds=1)))
    if millis > _MAX_TIMEOUT_MS:
        raise ConfigurationError("ttl is longer than PostgreSQL's longest timeout (about 24 days)")
    return str(millis)


def _utc(value: Any) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise LockError("PostgreSQL returned an unexpected clock value")
    return value.astimezone(UTC)


def _pause(attempt: int, remaining: float) -> float:
    # Full-ish jitter spreads waiters out, so they do not retry in lockstep.
    step = min(_MAX_PAUSE, _FIRST_PAUSE * 2**attempt)
    return min(remaining, random.uniform(step / 2, step))  # noqa: S311 - jitter, not secrecy


def _postgres_url(url: str) -> sa.URL:
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        # Not chained: the parse error would repeat the URL, password included.
        raise ConfigurationError("not a valid SQLAlchemy database URL") from None
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError("advisory locks need a postgresql:// URL")
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_driver_name() == "psycopg":
        require("psycopg", extra="postgres")
    return parsed


def _check_engine(engine: sa.Engine | AsyncEngine) -> None:
    if engine.dialect.name != "postgresql":
        raise ConfigurationError("advisory locks need a PostgreSQL engine")


def _new_token() -> str:
    return secrets.token_hex(16)


# --- sync ------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Held:
    name: str
    conn: sa.Connection
    lease: Lease
    done: bool = False
    mutex: threading.Lock = field(default_factory=threading.Lock)


def _close(conn: sa.Connection, *, broken: bool = False) -> None:
    """Return ``conn`` to the pool (its transaction rolled back), or discard it if ``broken``.

    Closing the socket of a broken connection ends its session, and any lock it held.
    """
    try:
        if broken and not conn.invalidated:
            conn.invalidate()
        conn.close()
    except sa.exc.SQLAlchemyError:
        logger.warning("could not return a lock connection to the pool", exc_info=True)


class PostgresAdvisoryLockProvider:
    """Fenced, expiring locks shared by every process using one PostgreSQL database.

    Thread-safe. A lease lives in a transaction on its own pooled connection: the server ends
    that session when the holder has been silent for the lease's ttl, so the lock is freed
    even if this process hangs, and at once if it dies. ``extend`` resets that timer.
    ``release`` and ``extend`` report a lost lease (False, None) and never raise for it.

    Driver failures while acquiring raise :class:`~idempay.errors.LockError`.
    """

    def __init__(self, engine: sa.Engine) -> None:
        _check_engine(engine)
        self._engine = engine
        self._owns_engine = False
        self._held: dict[str, _Held] = {}
        self._guard = threading.Lock()
        self._sequence_ready = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **engine_options: Any) -> Self:
        """Build a provider on a new engine for ``url`` (``postgresql+psycopg://...``).

        ``postgresql://`` means the psycopg driver. The engine checks connections before use
        (``pool_pre_ping``) unless told otherwise; :meth:`close` disposes it.
        """
        engine_options.setdefault("pool_pre_ping", True)
        try:
            engine = sa.create_engine(_postgres_url(url), **engine_options)
        except (sa.exc.ArgumentError, TypeError) as exc:
            raise ConfigurationError("invalid engine options for the lock provider") from exc
        provider = cls(engine)
        provider._owns_engine = True
        return provider

    def acquire(self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT) -> Lease | None:
        """Take the lock for ``ttl``, retrying until ``wait`` has passed; None if still held.

        Waiting polls with short jittered pauses (never an unbounded server-side wait) and
        holds one pooled connection meanwhile.
        """
        timeout = _timeout_ms(ttl)
        key = _lock_key(name)
        deadline = time.monotonic() + max(wait, _NO_WAIT).total_seconds()
        if self._closed:
            raise LockError("the lock provider is closed")
        self._ensure_sequence()
        try:
            conn = self._engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise LockError("could not connect to PostgreSQL to take a lock") from exc
        kept = broken = False
        try:
            # A real transaction whatever the engine's default (AUTOCOMMIT would end the lock
            # with the statement that takes it).
            conn.execution_options(isolation_level="READ COMMITTED")
            attempt = 0
            while True:
                conn.begin()
                row = conn.execute(_TRY_LOCK, {"key": key, "timeout": timeout}).one()
                if row.locked:
                    lease = Lease(
                        token=_new_token(),
                        fence=int(row.fence),
                        expires_at=_utc(row.db_now) + ttl,
                    )
                    with self._guard:
                        if self._closed:
                            raise LockError("the lock provider is closed")
                        self._held[lease.token] = _Held(name, conn, lease)
                    kept = True
                    return lease
                conn.rollback()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                time.sleep(_pause(attempt, remaining))
                attempt += 1
        except sa.exc.SQLAlchemyError as exc:
            broken = True
            raise LockError("PostgreSQL failed while taking an advisory lock") from exc
        except BaseException:
            broken = True
            raise
        finally:
            if not kept:
                _close(conn, broken=broken)

    def release(self, name: str, lease: Lease) -> bool:
        """End the lease; True if it still held the lock, unexpired, until now.

        False, and nothing else happens, if the lease is unknown to this provider, was for
        another name, or was already lost (the server ended its session at the ttl, or the
        lease's expiry has passed; its lock is freed now in that last case).
        """
        with self._guard:
            held = self._held.get(lease.token)
            if held is None or held.name != name:
                return False
            del self._held[lease.token]
        with held.mutex:
            return self._finish(held)

    def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        """Push the expiry to now + ``ttl`` (database clock) and reset the server's timer.

        Returns None if the lease is unknown, for another name, expired or lost; an expired
        lease's lock is then freed.
        """
        timeout = _timeout_ms(ttl)
        with self._guard:
            held = self._held.get(lease.token)
            if held is None or held.name != name:
                return None
        with held.mutex:
            if held.done:
                return None
            try:
                db_now = _utc(held.conn.execute(_EXTEND, {"timeout": timeout}).one()[1])
            except (sa.exc.SQLAlchemyError, LockError):
                logger.info("a lock was lost before its extension (its session had ended)")
                self._forget(held, broken=True)
                return None
            if db_now >= held.lease.expires_at:
                self._forget(held, broken=False)
                return None
            held.lease = replace(held.lease, expires_at=db_now + ttl)
            return held.lease

    def close(self) -> None:
        """Release every lock this provider holds; dispose the engine if it made it."""
        with self._guard:
            self._closed = True
            every = list(self._held.values())
            self._held.clear()
        for held in every:
            with held.mutex:
                if not held.done:
                    self._finish(held)
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _finish(self, held: _Held) -> bool:
        held.done = True
        try:
            db_now = _utc(held.conn.execute(_NOW).scalar_one())
            held.conn.rollback()  # ends the transaction, and with it the lock
        except (sa.exc.SQLAlchemyError, LockError):
            logger.info("a lock's session had ended before its release (its ttl ran out)")
            _close(held.conn, broken=True)
            return False
        except BaseException:
            _close(held.conn, broken=True)
            raise
        _close(held.conn)
        return db_now < held.lease.expires_at

    def _forget(self, held: _Held, *, broken: bool) -> None:
        with self._guard:
            if self._held.get(held.lease.token) is held:
                del self._held[held.lease.token]
        held.done = True
        _close(held.conn, broken=broken)

    def _ensure_sequence(self) -> None:
        if self._sequence_ready:
            return
        try:
            with self._engine.connect() as conn:
                if not conn.execute(_SEQUENCE_EXISTS).scalar_one():
                    conn.execute(_CREATE_GUARD, {"key": _CREATE_GUARD_KEY})
                    conn.execute(_CREATE_SEQUENCE)
                conn.commit()
        except sa.exc.SQLAlchemyError as exc:
            raise LockError("could not prepare the lock fence sequence in PostgreSQL") from exc
        self._sequence_ready = True


# --- async -----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _AsyncHeld:
    name: str
    conn: AsyncConnection
    lease: Lease
    done: bool = False
    mutex: asyncio.Lock = field(default_factory=asyncio.Lock)


async def _aclose(conn: AsyncConnection, *, broken: bool = False) -> None:
    """Async twin of :func:`_close`."""
    try:
        if broken and not conn.invalidated:
            await conn.invalidate()
        await conn.close()
    except sa.exc.SQLAlchemyError:
        logger.warning("could not return a lock connection to the pool", exc_info=True)


class AsyncPostgresAdvisoryLockProvider:
    """Async twin of :class:`PostgresAdvisoryLockProvider` (psycopg's async driver).

    Use one provider per event loop. Waiting sleeps with :func:`asyncio.sleep`; cancelling a
    call never leaves a lock behind (its connection is discarded, which ends the session).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        _check_engine(engine)
        self._engine = engine
        self._owns_engine = False
        self._held: dict[str, _AsyncHeld] = {}
        self._sequence_ready = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **engine_options: Any) -> Self:
        """See :meth:`PostgresAdvisoryLockProvider.from_url`; :meth:`aclose` disposes it."""
        require("greenlet", extra="postgres")
        from sqlalchemy.ext.asyncio import create_async_engine

        engine_options.setdefault("pool_pre_ping", True)
        try:
            engine = create_async_engine(_postgres_url(url), **engine_options)
        except (sa.exc.ArgumentError, sa.exc.InvalidRequestError, TypeError) as exc:
            raise ConfigurationError("invalid engine options for the lock provider") from exc
        provider = cls(engine)
        provider._owns_engine = True
        return provider

    async def acquire(
        self, name: str, *, ttl: timedelta, wait: timedelta = _NO_WAIT
    ) -> Lease | None:
        """See :meth:`PostgresAdvisoryLockProvider.acquire`."""
        timeout = _timeout_ms(ttl)
        key = _lock_key(name)
        deadline = time.monotonic() + max(wait, _NO_WAIT).total_seconds()
        if self._closed:
            raise LockError("the lock provider is closed")
        await self._ensure_sequence()
        try:
            conn = await self._engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise LockError("could not connect to PostgreSQL to take a lock") from exc
        kept = broken = False
        try:
            await conn.execution_options(isolation_level="READ COMMITTED")
            attempt = 0
            while True:
                await conn.begin()
                result = await conn.execute(_TRY_LOCK, {"key": key, "timeout": timeout})
                row = result.one()
                if row.locked:
                    if self._closed:
                        raise LockError("the lock provider is closed")
                    lease = Lease(
                        token=_new_token(),
                        fence=int(row.fence),
                        expires_at=_utc(row.db_now) + ttl,
                    )
                    self._held[lease.token] = _AsyncHeld(name, conn, lease)
                    kept = True
                    return lease
                await conn.rollback()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                await asyncio.sleep(_pause(attempt, remaining))
                attempt += 1
        except sa.exc.SQLAlchemyError as exc:
            broken = True
            raise LockError("PostgreSQL failed while taking an advisory lock") from exc
        except BaseException:
            broken = True
            raise
        finally:
            if not kept:
                # Shielded: a second cancellation must not interrupt the cleanup.
                await asyncio.shield(_aclose(conn, broken=broken))

    async def release(self, name: str, lease: Lease) -> bool:
        """See :meth:`PostgresAdvisoryLockProvider.release`."""
        held = self._held.get(lease.token)
        if held is None or held.name != name:
            return False
        del self._held[lease.token]
        # Shielded: once the lease is taken out of the table, the release runs to its end even
        # if the caller is cancelled.
        return await asyncio.shield(self._finish_locked(held))

    async def extend(self, name: str, lease: Lease, *, ttl: timedelta) -> Lease | None:
        """See :meth:`PostgresAdvisoryLockProvider.extend`."""
        timeout = _timeout_ms(ttl)
        held = self._held.get(lease.token)
        if held is None or held.name != name:
            return None
        async with held.mutex:
            if held.done:
                return None
            try:
                result = await held.conn.execute(_EXTEND, {"timeout": timeout})
                db_now = _utc(result.one()[1])
            except asyncio.CancelledError:
                # The connection's state is unknown mid-statement: give the lock up.
                await asyncio.shield(self._forget(held, broken=True))
                raise
            except (sa.exc.SQLAlchemyError, LockError):
                logger.info("a lock was lost before its extension (its session had ended)")
                await self._forget(held, broken=True)
                return None
            if db_now >= held.lease.expires_at:
                await self._forget(held, broken=False)
                return None
            held.lease = replace(held.lease, expires_at=db_now + ttl)
            return held.lease

    async def aclose(self) -> None:
        """See :meth:`PostgresAdvisoryLockProvider.close`."""
        self._closed = True
        every = list(self._held.values())
        self._held.clear()
        for held in every:
            await asyncio.shield(self._finish_locked(held))
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _finish_locked(self, held: _AsyncHeld) -> bool:
        async with held.mutex:
            if held.done:
                return False
            held.done = True
            try:
                db_now = _utc((await held.conn.execute(_NOW)).scalar_one())
                await held.conn.rollback()  # ends the transaction, and with it the lock
            except (sa.exc.SQLAlchemyError, LockError):
                logger.info("a lock's session had ended before its release (its ttl ran out)")
                await _aclose(held.conn, broken=True)
                return False
            await _aclose(held.conn)
            return db_now < held.lease.expires_at

    async def _forget(self, held: _AsyncHeld, *, broken: bool) -> None:
        if self._held.get(held.lease.token) is held:
            del self._held[held.lease.token]
        held.done = True
        await _aclose(held.conn, broken=broken)

    async def _ensure_sequence(self) -> None:
        if self._sequence_ready:
            return
        try:
            async with self._engine.connect() as conn:
                if not (await conn.execute(_SEQUENCE_EXISTS)).scalar_one():
                    await conn.execute(_CREATE_GUARD, {"key": _CREATE_GUARD_KEY})
                    await conn.execute(_CREATE_SEQUENCE)
                await conn.commit()
        except sa.exc.SQLAlchemyError as exc:
            raise LockError("could not prepare the lock fence sequence in PostgreSQL") from exc
        self._sequence_ready = True
