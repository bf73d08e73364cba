"""SQL stores for SQLite, PostgreSQL and MySQL/MariaDB (async source of the sync twin).

Every operation of :class:`AsyncSQLIdempotencyStore` and every dispatcher operation of
:class:`AsyncSQLPaymentStore` is one short unit of its own, retried whole (bounded, jittered)
when the database reports a deadlock, a serialization failure, a lock-wait timeout or SQLite's
busy. On PostgreSQL an operation that is one statement runs in autocommit: the statement is
atomic by itself, and no BEGIN or COMMIT round trip surrounds it. Driver errors never escape:
they become :class:`~idempay.errors.StoreError` or one of its subclasses, with messages that
name the operation and never a key or a payload.

Every statement is built once per database (see ``_statements`` and ``_webhook``); a call only
binds its values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias, TypeVar

import sqlalchemy as sa

from idempay._retry import DEFAULT_ATTEMPTS
from idempay._retry import retry_async as async_retry  # unasync: remove

# from idempay._retry import retry  # unasync: sync-only
from idempay.backends.sql._common import (
    Kind,
    async_engine_url,
    default_engine_options,
    from_micros,
    install_sqlite_hooks,
    is_unique_violation,
    kind_of,
    micros,
    new_token,
    positive,
    require_driver,
    span,
    wrap,
)
from idempay.backends.sql._statements import (
    JOURNAL_INSERT,
    JOURNAL_SELECT,
    audit_from_row,
    audit_values,
    blob_value,
    effect_values,
    encode_headers,
    entry_from_row,
    event_from_row,
    event_values,
    journal_from_row,
    journal_values,
    maintenance_statements,
    order_from_row,
    outbox_statements,
    payment_statements,
    record_from_row,
    record_statements,
    state_values,
)
from idempay.backends.sql._webhook import (
    PG_RECEIVE,
    PORTABLE_READ,
    guarded_audit,
    guarded_status,
    is_guard_failure,
    pg_reception,
    pg_statement,
    plan_commit,
    portable_reception,
    receive_params,
)
from idempay.clock import Clock, SystemClock
from idempay.core.audit import GENESIS_HASH, AuditDraft, AuditEntry, seal
from idempay.core.keys import validate_key
from idempay.core.models import (
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    JournalEntry,
    NewEffect,
    OrderRecord,
    OutboxBacklog,
    OutboxEntry,
)
from idempay.core.orders import OrderState, OrderStatus
from idempay.core.records import (
    Claimed,
    ClaimResult,
    Existing,
    IdempotencyRecord,
    Lease,
    RecordState,
    StoredResponse,
)
from idempay.errors import (
    ConcurrentUpdateError,
    ConfigurationError,
    LeaseLostError,
    StoreError,
    TransientStoreError,
)

if TYPE_CHECKING:
    # Imported for real only where an engine is created: SQLAlchemy's asyncio layer needs
    # greenlet, which the sync stores do without.
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["AsyncSQLIdempotencyStore", "AsyncSQLPaymentStore", "AsyncSQLTransaction"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_Op: TypeAlias = Callable[["AsyncConnection"], Awaitable[T]]  # unasync: remove
# _Op: TypeAlias = Callable[["Connection"], T]  # unasync: sync-only

_READ_COMMITTED: Final = "READ COMMITTED"
_AUTOCOMMIT: Final = "AUTOCOMMIT"
# A PostgreSQL claim that finds a row committed after its snapshot runs again at
# once (a new statement, a new snapshot); this many rounds in a row mean something else is
# wrong.
_ROUNDS: Final = 5
# How often a store without a clock of its own reads the database clock again for
# transactions' now() (seconds); in between it counts on this machine's monotonic clock.
_RESAMPLE_AFTER: Final = 60.0
_FINISHED: Final = (InboxStatus.PROCESSED, InboxStatus.IGNORED)
_MOVED: Final = "the event, the order or its audit trail changed since they were read"


class _Refusal(Exception):  # noqa: N818 - never escapes: re-raised as its ``error``
    """A final answer carried out of a unit of work: raising it rolls the work back, and the
    retry loop lets it through (it is no retriable error); the caller raises ``error``."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


class _SampledClock:
    """The database clock as last read, carried forward on this machine's monotonic clock.

    Read again at most every ``_RESAMPLE_AFTER`` seconds, on a connection the store is using
    anyway; between two reads, the two clocks drift apart by parts per million at most.
    """

    __slots__ = ("_sample",)

    def __init__(self) -> None:
        self._sample: tuple[int, float] | None = None

    def due(self) -> bool:
        sample = self._sample
        return sample is None or time.monotonic() - sample[1] > _RESAMPLE_AFTER

    def record(self, server_us: int) -> None:
        self._sample = (server_us, time.monotonic())

    def now(self) -> datetime:
        sample = self._sample
        if sample is None:  # pragma: no cover - read before every transaction that needs it
            raise StoreError("the database clock was never read")
        return from_micros(sample[0]) + timedelta(seconds=time.monotonic() - sample[1])


class AsyncSQLStoreBase:
    """The engine, clock and connection handling the SQL stores share."""

    def __init__(self, engine: AsyncEngine, *, clock: Clock | None = None) -> None:
        self._engine = engine
        self._kind = kind_of(engine.dialect)
        # SQLite runs inside this process: the application's clock *is* the database's, read
        # here with microseconds (SQLite's own 'now' has milliseconds).
        self._clock: Clock | None = (
            SystemClock() if clock is None and self._kind is Kind.SQLITE else clock
        )
        # With a clock, every statement takes its time as the ``now`` parameter; without, the
        # server's clock is read inside the statement.
        self._bound = self._clock is not None
        self._sampled = _SampledClock()
        self._owns_engine = False
        # Our transactions run READ COMMITTED on PostgreSQL and MySQL whatever the engine's
        # default; an engine made by from_url is already set so (no per-checkout statement).
        self._isolation: str | None = None if self._kind is Kind.SQLITE else _READ_COMMITTED
        if self._kind is Kind.SQLITE:
            install_sqlite_hooks(engine.sync_engine)  # unasync: remove
            # install_sqlite_hooks(engine)  # unasync: sync-only

    @classmethod
    def from_url(cls, url: str, *, clock: Clock | None = None, **engine_options: Any) -> Self:
        """Build a store on an engine of its own, which :meth:`aclose` disposes.

        ``url`` may name the sync or the async driver; the matching one is used. PostgreSQL
        and MySQL engines run READ COMMITTED unless ``engine_options`` say otherwise; SQLite
        engines WAL, a busy timeout and ``BEGIN IMMEDIATE``. Connections are not pinged when
        checked out (a ping is one more round trip per operation): a connection the server
        dropped fails its statement with a StoreError, and SQLAlchemy then discards the
        pool's connections, so the next operation connects afresh. Pass
        ``pool_pre_ping=True`` to trade that round trip for never seeing such an error.

        Raises:
            ConfigurationError: the URL is malformed or names an unsupported database.
            MissingDependencyError: the driver is not installed (the message names the extra).
        """
        from sqlalchemy.ext.asyncio import create_async_engine

        url = async_engine_url(url)
        require_driver(url)
        options = default_engine_options(url) | engine_options
        store = cls(create_async_engine(url, **options), clock=clock)
        store._owns_engine = True
        if options.get("isolation_level") not in (None, _AUTOCOMMIT):
            # Set on every connection already: READ COMMITTED by default, or the caller's choice
            # (stricter levels work too, with more retried serialization failures).
            store._isolation = None
        return store

    @property
    def engine(self) -> AsyncEngine:
        """The engine the store runs on."""
        return self._engine

    async def aclose(self) -> None:
        """Dispose of the engine if the store created it (:meth:`from_url`); else do nothing."""
        if self._owns_engine:
            await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()  # unasync: remove
        # self.close()  # unasync: sync-only

    def _now(self) -> dict[str, int]:
        """The ``now`` parameter when the store has a clock; nothing when statements read the
        server's clock themselves."""
        return {"now": micros(self._clock.now())} if self._clock is not None else {}

    async def _stamp(self, conn: AsyncConnection) -> int:
        """The time for a value the caller must know: the clock's, or the sampled database
        clock (read on ``conn`` when the sample is old)."""
        if self._clock is not None:
            return micros(self._clock.now())
        await self._sample(conn)
        return micros(self._sampled.now())

    async def _sample(self, conn: AsyncConnection) -> None:
        if self._clock is None and self._sampled.due():
            stamp = (await conn.execute(payment_statements(self._kind).clock)).scalar_one()
            self._sampled.record(int(stamp))

    def _clock_now(self) -> datetime:
        return self._clock.now() if self._clock is not None else self._sampled.now()

    async def _run(self, what: str, op: _Op[T], *, single: bool = False) -> T:
        """Run ``op`` on a connection of its own, retrying transient failures.

        With ``single`` (``op`` sends one statement, or statements each complete by itself) it
        runs in autocommit on PostgreSQL: no BEGIN and no COMMIT round trip. Otherwise, and on
        SQLite and MySQL, it runs in a transaction of its own (MySQL would pay two round trips
        to switch autocommit on and off again, more than the COMMIT it saves).
        """
        autocommit = single and self._kind is Kind.POSTGRESQL

        async def once() -> T:
            try:
                async with self._engine.connect() as conn:
                    if autocommit:
                        await conn.execution_options(isolation_level=_AUTOCOMMIT)
                        return await op(conn)
                    if self._isolation is not None:
                        await conn.execution_options(isolation_level=self._isolation)
                    async with conn.begin():
                        return await op(conn)
            except sa.exc.SQLAlchemyError as error:
                raise wrap(error, what) from error

        return await async_retry(once)


def _lost() -> LeaseLostError:
    return LeaseLostError("the idempotency record is no longer held by this lease")


def _owner(scope: str, key: str, lease: Lease) -> dict[str, Any]:
    return {"p_scope": scope, "p_key": key, "p_token": lease.token, "p_fence": lease.fence}


class AsyncSQLIdempotencyStore(AsyncSQLStoreBase):
    """Idempotency records in ``idempay_idempotency_records``; see
    :class:`idempay.protocols.AsyncIdempotencyStore`.

    A claim is one atomic conditional write per dialect, never a read then a write:
    PostgreSQL ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`` inside a statement
    that also returns the row it left alone (one round trip, in autocommit); SQLite the same
    upsert under ``BEGIN IMMEDIATE``; MySQL/MariaDB ``INSERT ... ON DUPLICATE KEY UPDATE`` with
    conditional columns, read back in the same transaction. Leases and expiry use the database
    clock (or ``clock`` when given). Owner writes are fenced: they match the lease token and
    fence in the same ``UPDATE``, which on PostgreSQL and SQLite also returns the row.
    """

    def __init__(self, engine: AsyncEngine, *, clock: Clock | None = None) -> None:
        super().__init__(engine, clock=clock)
        self._s = record_statements(self._kind, bound=self._bound)

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
        positive(lease_for, "lease_for")
        positive(retain_for, "retain_for")
        s = self._s
        params = {
            "p_scope": scope,
            "p_key": key,
            "p_fingerprint": fingerprint,
            "p_lease_us": span(lease_for),
            "p_keep_us": span(max(retain_for, lease_for)),
        }

        async def op(conn: AsyncConnection) -> ClaimResult:
            for _ in range(_ROUNDS):
                fresh, takeover = new_token(), new_token()
                values = params | {"p_fresh": fresh, "p_takeover": takeover} | self._now()
                result = await conn.execute(s.claim, values)
                row = result.mappings().first() if s.claim_returns_rows else None
                if row is None and s.claim_read is not None:
                    row = (await conn.execute(s.claim_read, values)).mappings().first()
                if row is not None:
                    return _claim_result(record_from_row(row), fresh, takeover)
            raise TransientStoreError("claim: kept racing concurrent writers", attempts=1)

        return await self._run("claim", op, single=True)

    async def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        params = _owner(scope, key, lease) | {
            "p_recovery_point": recovery_point,
            "p_resource_id": resource_id,
        }

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(self._s.checkpoint, params)).rowcount != 1:
                raise _lost()

        await self._run("checkpoint", op, single=True)

    async def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        positive(lease_for, "lease_for")
        s = self._s
        params = _owner(scope, key, lease) | {"p_lease_us": span(lease_for)}

        async def op(conn: AsyncConnection) -> Lease:
            result = await conn.execute(s.extend, params | self._now())
            if self._kind is Kind.MYSQL:
                if result.rowcount != 1:
                    raise _lost()
                row = (await conn.execute(s.read, params)).mappings().first()
                expires = row["lease_expires_at"] if row is not None else None
            else:
                expires = result.scalar()
            if expires is None:
                raise _lost()
            return replace(lease, expires_at=from_micros(expires))

        # MySQL reads the row back: that read must see our own write.
        return await self._run("extend", op, single=self._kind is not Kind.MYSQL)

    async def complete(
        self,
        scope: str,
        key: str,
        lease: Lease,
        response: StoredResponse,
        *,
        failed: bool = False,
    ) -> IdempotencyRecord:
        state = RecordState.FAILED if failed else RecordState.COMPLETED
        params = _owner(scope, key, lease) | {
            "p_state": state.value,
            "p_status": response.status,
            "p_body": blob_value(self._kind, response.body),
            "p_content_type": response.content_type,
            "p_headers": encode_headers(response.headers),
        }
        s = self._s

        async def op(conn: AsyncConnection) -> IdempotencyRecord:
            result = await conn.execute(s.complete, params)
            if self._kind is Kind.MYSQL:
                if result.rowcount != 1:
                    raise _lost()
                row = (await conn.execute(s.read, params)).mappings().first()
            else:
                row = result.mappings().first()
            if row is None:
                raise _lost()
            return record_from_row(row)

        return await self._run("complete", op, single=self._kind is not Kind.MYSQL)

    async def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        stmt = self._s.discard if discard else self._s.release
        params = _owner(scope, key, lease)

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(stmt, params)).rowcount != 1:
                raise _lost()

        await self._run("release", op, single=True)

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        async def op(conn: AsyncConnection) -> IdempotencyRecord | None:
            params = {"p_scope": scope, "p_key": key} | self._now()
            row = (await conn.execute(self._s.get, params)).mappings().first()
            return record_from_row(row) if row is not None else None

        return await self._run("get", op, single=True)

    async def purge_expired(self, *, limit: int = 1000) -> int:
        if limit <= 0:
            return 0

        async def op(conn: AsyncConnection) -> int:
            result = await conn.execute(self._s.purge, {"p_limit": limit} | self._now())
            return int(result.rowcount)

        return await self._run("purge_expired", op, single=True)


def _claim_result(record: IdempotencyRecord, fresh: str, takeover: str) -> ClaimResult:
    lease = record.lease
    if lease is not None and lease.token == fresh:
        return Claimed(record=record, lease=lease)
    if lease is not None and lease.token == takeover:
        return Claimed(record=record, lease=lease, resumed=True)
    return Existing(record=record)


# --- orders, inbox, audit, outbox ------------------------------------------------------------


async def _insert_row(
    conn: AsyncConnection, kind: Kind, stmt: sa.Executable, params: dict[str, Any]
) -> bool:
    """Run an insert-unless-present statement; True if it inserted the row.

    On MySQL a duplicate key fails the statement (not the transaction) and means False: the
    caller reads the row back to tell which key it was.
    """
    try:
        result = await conn.execute(stmt, params)
    except sa.exc.IntegrityError as error:
        if kind is Kind.MYSQL and is_unique_violation(error):
            return False
        raise
    return True if kind is Kind.MYSQL else result.first() is not None


class AsyncSQLTransaction:
    """One unit of work of :class:`AsyncSQLPaymentStore`; see
    :class:`idempay.protocols.AsyncPaymentTransaction`.

    ``connection`` is the connection it runs on, for the application's own statements in the
    same transaction.
    """

    def __init__(
        self,
        connection: AsyncConnection,
        kind: Kind,
        *,
        now: Callable[[], datetime],
    ) -> None:
        self._conn = connection
        self._kind = kind
        self._s = payment_statements(kind)
        self._clock = now

    @property
    def connection(self) -> AsyncConnection:
        """The connection this transaction runs on."""
        return self._conn

    def now(self) -> datetime:
        """The store's clock, or the database clock: read by the store at most a minute ago,
        plus the time elapsed since on this machine's monotonic clock (so it never runs ahead
        of the server by more than the two clocks' drift over that minute)."""
        return self._clock()

    def _stamp(self) -> int:
        return micros(self.now())

    async def _execute(
        self, what: str, stmt: sa.Executable, params: Any = None
    ) -> sa.CursorResult[Any]:
        try:
            return await self._conn.execute(stmt, params)
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, what) from error

    async def _first(
        self, what: str, stmt: sa.Executable, params: dict[str, Any]
    ) -> sa.RowMapping | None:
        return (await self._execute(what, stmt, params)).mappings().first()

    async def _insert_new(self, what: str, stmt: sa.Executable, params: dict[str, Any]) -> bool:
        try:
            return await _insert_row(self._conn, self._kind, stmt, params)
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, what) from error

    @asynccontextmanager
    async def _savepoint(self, what: str) -> AsyncIterator[None]:
        try:
            savepoint = await self._conn.begin_nested()
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, what) from error
        try:
            yield
        except BaseException:
            try:
                await savepoint.rollback()
            except sa.exc.SQLAlchemyError:
                logger.warning("%s: rolling back to the savepoint failed", what, exc_info=True)
            raise
        try:
            await savepoint.commit()
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, what) from error

    async def insert_order(
        self, tenant: str, order_id: str, state: OrderState
    ) -> tuple[OrderRecord, bool]:
        stamp = self._stamp()
        key = {"p_tenant": tenant, "p_order_id": order_id}
        # Any duplicate (the order's key, or its PaymentIntent's) inserts nothing; the read
        # below tells which.
        if await self._insert_new(
            "insert_order", self._s.insert_order, key | state_values(state) | {"now": stamp}
        ):
            moment = from_micros(stamp)
            return OrderRecord(tenant, order_id, state, 1, moment, moment), True
        existing = await self._first("insert_order", self._s.get_order_locked, key)
        if existing is None:
            # The duplicate was the PaymentIntent's, not the order's.
            raise ConcurrentUpdateError("this PaymentIntent already belongs to another order")
        return order_from_row(existing), False

    async def get_order(self, tenant: str, order_id: str) -> OrderRecord | None:
        row = await self._first(
            "get_order", self._s.get_order, {"p_tenant": tenant, "p_order_id": order_id}
        )
        return order_from_row(row) if row is not None else None

    async def find_order_by_payment_intent(self, payment_intent_id: str) -> OrderRecord | None:
        row = await self._first(
            "find_order_by_payment_intent",
            self._s.order_by_intent,
            {"p_payment_intent_id": payment_intent_id},
        )
        return order_from_row(row) if row is not None else None

    async def update_order(self, record: OrderRecord, state: OrderState) -> OrderRecord:
        stamp = self._stamp()
        params = state_values(state) | {
            "k_tenant": record.tenant,
            "k_order_id": record.order_id,
            "k_version": record.version,
            "now": stamp,
        }
        intent = state.payment_intent_id
        # A duplicate PaymentIntent aborts a PostgreSQL transaction: a savepoint keeps it
        # usable, at the cost of two round trips, only when the PaymentIntent changes.
        guard = intent is not None and intent != record.state.payment_intent_id
        try:
            if guard and self._kind is Kind.POSTGRESQL:
                async with self._savepoint("update_order"):
                    result = await self._conn.execute(self._s.update_order, params)
            else:
                result = await self._conn.execute(self._s.update_order, params)
        except sa.exc.IntegrityError as error:
            if is_unique_violation(error):
                raise ConcurrentUpdateError(
                    "this PaymentIntent already belongs to another order"
                ) from error
            raise wrap(error, "update_order") from error
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, "update_order") from error
        if result.rowcount != 1:
            raise ConcurrentUpdateError("the order changed since it was read")
        return replace(
            record, state=state, version=record.version + 1, updated_at=from_micros(stamp)
        )

    async def insert_event(self, event: InboxEvent) -> tuple[InboxEvent, bool]:
        if await self._insert_new(
            "insert_event", self._s.insert_event, event_values(self._kind, event)
        ):
            return event, True
        key = {"p_account": event.account, "p_event_id": event.event_id}
        existing = await self._first("insert_event", self._s.get_event_locked, key)
        if existing is None:
            # Deleted between the conflict and the read (a purge): let the caller retry.
            raise ConcurrentUpdateError("the inbox event changed while it was inserted")
        return event_from_row(existing), False

    async def get_event(self, account: str, event_id: str) -> InboxEvent | None:
        key = {"p_account": account, "p_event_id": event_id}
        row = await self._first("get_event", self._s.get_event, key)
        return event_from_row(row) if row is not None else None

    async def set_event_status(
        self,
        account: str,
        event_id: str,
        status: InboxStatus,
        *,
        error: str | None = None,
        order_id: str | None = None,
    ) -> InboxEvent:
        key = {"p_account": account, "p_event_id": event_id}
        params = key | {
            "p_status": status.value,
            "p_error": error,
            "p_order_id": order_id,
            "now": self._stamp(),
        }
        returning = self._kind is not Kind.MYSQL
        stmt = self._s.set_status[(status in _FINISHED, returning)]
        result = await self._execute("set_event_status", stmt, params)
        if returning:
            row = result.mappings().first()
        elif result.rowcount != 1:
            row = None
        else:
            row = await self._first("set_event_status", self._s.get_event, key)
        if row is None:
            raise StoreError("no such inbox event")
        return event_from_row(row)

    async def orphans_for(
        self, *, payment_intent_id: str | None, order_id: str | None, limit: int = 100
    ) -> Sequence[InboxEvent]:
        hints = (payment_intent_id is not None, order_id is not None)
        if not any(hints) or limit <= 0:
            return []
        params = {"p_payment_intent_id": payment_intent_id, "p_order_id": order_id}
        result = await self._execute(
            "orphans_for", self._s.orphans[hints], params | {"p_limit": limit}
        )
        return [event_from_row(row) for row in result.mappings().all()]

    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        key = {"p_tenant": draft.tenant, "p_order_id": draft.order_id}
        last = (await self._execute("append_audit", self._s.audit_head, key)).first()
        seq, prev_hash = (last.seq + 1, last.hash) if last is not None else (1, GENESIS_HASH)
        entry = seal(draft, seq=seq, prev_hash=prev_hash)
        try:
            await self._conn.execute(self._s.insert_audit, audit_values(entry))
        except sa.exc.IntegrityError as error:
            if is_unique_violation(error):
                raise ConcurrentUpdateError(
                    "another entry took this place in the audit trail"
                ) from error
            raise wrap(error, "append_audit") from error
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, "append_audit") from error
        return entry

    async def audit_trail(self, tenant: str, order_id: str) -> Sequence[AuditEntry]:
        params = {"p_tenant": tenant, "p_order_id": order_id}
        result = await self._execute("audit_trail", self._s.audit_trail, params)
        return [audit_from_row(row) for row in result.mappings().all()]

    async def enqueue_effect(self, effect: NewEffect) -> bool:
        params = effect_values(effect) | {"now": self._stamp()}
        return await self._insert_new("enqueue_effect", self._s.enqueue, params)


class AsyncSQLPaymentStore(AsyncSQLStoreBase):
    """Orders, inbox, audit trail and outbox in SQL; see
    :class:`idempay.protocols.AsyncPaymentStore`, :class:`~idempay.protocols.AsyncOutboxStore`,
    :class:`~idempay.protocols.AsyncJournalStore` and
    :class:`~idempay.protocols.AsyncMaintenanceStore`.

    Order updates are compare-and-set on ``version`` (rowcount checked), unique keys decide
    every race, and outbox dispatchers lease entries with ``FOR UPDATE SKIP LOCKED``
    (PostgreSQL, MySQL 8, MariaDB 10.6+) or under SQLite's single writer.

    :meth:`receive_event` and :meth:`commit_event` are the webhook's two steps: a read that
    writes nothing, then one durable commit. On PostgreSQL each is ONE statement in autocommit
    (one round trip); on SQLite and MySQL the read is one statement and the commit one short
    transaction of four statements or so.

    Pass your own connection to :meth:`transaction` to run inside your transaction (with the
    ORM, ``session.connection()``; with an ``AsyncSession``, ``await session.connection()``).
    """

    def __init__(self, engine: AsyncEngine, *, clock: Clock | None = None) -> None:
        super().__init__(engine, clock=clock)
        self._s = payment_statements(self._kind)
        self._o = outbox_statements(self._kind, bound=self._bound)
        self._m = maintenance_statements(self._kind, bound=self._bound)

    @asynccontextmanager
    async def transaction(
        self, connection: AsyncConnection | None = None
    ) -> AsyncIterator[AsyncSQLTransaction]:
        """A unit of work, committed when the block exits normally and rolled back if it raises.

        Without ``connection``: a new connection and transaction, READ COMMITTED on PostgreSQL
        and MySQL, ``BEGIN IMMEDIATE`` on SQLite. A retriable failure (deadlock, serialization
        failure, busy) raises TransientStoreError; the transaction is then rolled back.

        With ``connection``: join the transaction open on it (one is begun if none is), inside a
        SAVEPOINT that is released at the end of the block or rolled back if it raises. The
        caller's transaction is never committed here: the application's rows and idempay's
        commit or roll back together, when the caller decides.
        """
        if connection is not None:
            async with self._joined(connection) as joined:
                yield joined
            return
        try:
            conn = await self._engine.connect()
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, "transaction") from error
        try:
            try:
                if self._isolation is not None:
                    await conn.execution_options(isolation_level=self._isolation)
                await conn.begin()
                tx = await self._open(conn, self._kind)
            except sa.exc.SQLAlchemyError as error:
                raise wrap(error, "transaction") from error
            yield tx
            try:
                await conn.commit()
            except sa.exc.SQLAlchemyError as error:
                raise wrap(error, "commit") from error
        finally:
            # Rolls back whatever was not committed, and returns the connection to the pool.
            try:
                await conn.close()
            except sa.exc.SQLAlchemyError:
                logger.warning("closing a database connection failed", exc_info=True)

    @asynccontextmanager
    async def _joined(self, connection: AsyncConnection) -> AsyncIterator[AsyncSQLTransaction]:
        kind = kind_of(connection.dialect)
        if kind is not self._kind:
            raise ConfigurationError("the connection is not to the store's kind of database")
        try:
            savepoint = await connection.begin_nested()
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, "transaction") from error
        try:
            try:
                tx = await self._open(connection, kind)
            except sa.exc.SQLAlchemyError as error:
                raise wrap(error, "transaction") from error
            yield tx
        except BaseException:
            if savepoint.is_active:
                try:
                    await savepoint.rollback()
                except sa.exc.SQLAlchemyError:
                    logger.warning("rolling back to the savepoint failed", exc_info=True)
            raise
        try:
            await savepoint.commit()
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, "commit") from error

    async def _open(self, conn: AsyncConnection, kind: Kind) -> AsyncSQLTransaction:
        # No statement here, as a rule: the database clock is read at most once a minute.
        await self._sample(conn)
        return AsyncSQLTransaction(conn, kind, now=self._clock_now)

    async def run_transaction(
        self,
        work: Callable[[AsyncSQLTransaction], Awaitable[T]],  # unasync: remove
        # work: Callable[[SQLTransaction], T],  # unasync: sync-only
        *,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> T:
        """Run ``work`` in a new transaction, again after a lost compare-and-set or a transient
        failure (jittered pauses, ``attempts`` runs at most); see
        :meth:`idempay.protocols.AsyncPaymentStore.run_transaction`."""

        async def once() -> T:
            async with self.transaction() as tx:
                return await work(tx)

        return await async_retry(once, attempts=attempts)

    # --- the webhook's two steps -------------------------------------------------------------

    async def receive_event(
        self, event: InboxEvent, *, tenant: str | None = None, order_id: str | None = None
    ) -> EventReception:
        """See :meth:`idempay.protocols.AsyncPaymentStore.receive_event`.

        One read, in one snapshot, that writes nothing: the inbox row, the order and the end of
        its trail. PostgreSQL runs it in autocommit (one round trip).
        """
        params = receive_params(event, tenant, order_id)
        if self._kind is Kind.POSTGRESQL:

            async def pg_read(conn: AsyncConnection) -> EventReception:
                return pg_reception((await conn.execute(PG_RECEIVE, params)).mappings().one())

            return await self._run("receive_event", pg_read, single=True)

        async def read(conn: AsyncConnection) -> EventReception:
            return portable_reception((await conn.execute(PORTABLE_READ, params)).mappings().one())

        return await self._run("receive_event", read, single=True)

    async def commit_event(self, commit: EventCommit) -> OrderRecord | None:
        """See :meth:`idempay.protocols.AsyncPaymentStore.commit_event`.

        The audit drafts are sealed here, after ``commit.audit_head``. PostgreSQL: one
        statement in autocommit, one round trip and one commit (see ``_webhook.pg_commit`` for
        how it writes all or nothing). SQLite and MySQL: one transaction (compare-and-set,
        guarded audit insert, outbox insert, inbox insert or guarded update), rolled back on
        the first refusal. A transient failure is retried whole; a refusal is not (the caller
        must read again).

        Raises:
            ConcurrentUpdateError: the inbox row, the order or its trail moved, or the new
                PaymentIntent is another order's; nothing was written.
            ConfigurationError: the audit drafts are not all of the commit's order.
        """
        plan = plan_commit(self._kind, commit)
        if self._kind is Kind.POSTGRESQL:
            stmt, params = pg_statement(plan, bound=self._bound)

            async def one_statement(conn: AsyncConnection) -> OrderRecord | None:
                try:
                    result = await conn.execute(stmt, params | self._now())
                except sa.exc.DBAPIError as error:
                    # A duplicate key (an audit entry appended concurrently, a PaymentIntent
                    # taken) or the guard: the statement failed, so it wrote nothing.
                    if is_unique_violation(error) or is_guard_failure(error):
                        raise _Refusal(ConcurrentUpdateError(_MOVED)) from error
                    raise
                row = result.mappings().one()
                if row["done"] != 1:
                    raise _Refusal(ConcurrentUpdateError(_MOVED))
                if commit.order is None or commit.new_state is None:
                    return commit.order
                return replace(
                    commit.order,
                    state=commit.new_state,
                    version=commit.order.version + 1,
                    updated_at=from_micros(row["updated_at"]),
                )

            op: _Op[OrderRecord | None] = one_statement
        else:
            s, audit_insert = self._s, guarded_audit(self._kind)
            set_status = guarded_status(plan.finished)

            async def transaction(conn: AsyncConnection) -> OrderRecord | None:
                now = {"now": await self._stamp(conn)}
                try:
                    if plan.update:
                        result = await conn.execute(s.update_order, plan.params | now)
                        if result.rowcount != 1:
                            raise _Refusal(ConcurrentUpdateError(_MOVED))
                    for entry in plan.entries:
                        if (await conn.execute(audit_insert, entry)).rowcount != 1:
                            raise _Refusal(ConcurrentUpdateError(_MOVED))
                except sa.exc.IntegrityError as error:
                    if is_unique_violation(error):
                        raise _Refusal(ConcurrentUpdateError(_MOVED)) from error
                    raise
                if plan.effects:
                    await conn.execute(s.enqueue_ignoring, [e | now for e in plan.effects])
                if plan.fresh:
                    processed = now["now"] if plan.finished else None
                    row = plan.row | {"p_processed_at": processed}
                    written = await _insert_row(conn, self._kind, s.insert_event, row)
                else:
                    written = (await conn.execute(set_status, plan.status | now)).rowcount == 1
                if not written:
                    # A concurrent delivery of the same event stored or changed the row.
                    raise _Refusal(ConcurrentUpdateError(_MOVED))
                if commit.order is None or commit.new_state is None:
                    return commit.order
                return replace(
                    commit.order,
                    state=commit.new_state,
                    version=commit.order.version + 1,
                    updated_at=from_micros(now["now"]),
                )

            op = transaction
        try:
            return await self._run("commit_event", op, single=True)
        except _Refusal as refusal:
            raise refusal.error from refusal.__cause__

    # --- the outbox dispatcher ---------------------------------------------------------------

    async def claim_due_effects(self, *, limit: int, lease_for: timedelta) -> Sequence[OutboxEntry]:
        positive(lease_for, "lease_for")
        if limit <= 0:
            return []
        lease_us = span(lease_for)
        o = self._o

        async def op(conn: AsyncConnection) -> list[OutboxEntry]:
            rows = (await conn.execute(o.due, {"p_limit": limit} | self._now())).mappings().all()
            if not rows:
                return []
            leased, params = [], []
            for row in rows:
                entry = entry_from_row(row)
                lease = Lease(
                    token=new_token(),
                    fence=row["lease_fence"] + 1,
                    expires_at=from_micros(row["now_us"] + lease_us),
                )
                leased.append(replace(entry, attempts=entry.attempts + 1, lease=lease))
                params.append(
                    _effect_key(entry)
                    | {
                        "p_new_token": lease.token,
                        "p_new_fence": lease.fence,
                        "p_new_attempts": entry.attempts + 1,
                        "p_new_expires": micros(lease.expires_at),
                    }
                )
            await conn.execute(o.lease, params)
            return leased

        return await self._run("claim_due_effects", op)

    async def finish_effect(self, entry: OutboxEntry) -> None:
        await self._settle("finish_effect", entry, (True, False), {})

    async def fail_effect(
        self, entry: OutboxEntry, *, error: str, retry_at: datetime | None
    ) -> None:
        values: dict[str, Any] = {"p_error": error}
        if retry_at is not None:
            values["p_retry_at"] = micros(retry_at)
        await self._settle("fail_effect", entry, (False, retry_at is None), values)

    async def _settle(
        self, what: str, entry: OutboxEntry, outcome: tuple[bool, bool], values: dict[str, Any]
    ) -> None:
        if entry.lease is None:
            raise LeaseLostError("the outbox entry was not leased to this dispatcher")
        stmt = self._o.settle[outcome]
        params = _effect_key(entry) | {"p_token": entry.lease.token} | values

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(stmt, params)).rowcount != 1:
                raise LeaseLostError("the outbox entry is no longer held by this dispatcher")

        await self._run(what, op, single=True)

    async def effects_for(self, tenant: str, order_id: str) -> Sequence[OutboxEntry]:
        params = {"p_tenant": tenant, "p_order_id": order_id}

        async def op(conn: AsyncConnection) -> list[OutboxEntry]:
            rows = (await conn.execute(self._o.effects_for, params)).mappings().all()
            return [entry_from_row(row) for row in rows]

        return await self._run("effects_for", op, single=True)

    async def append_journal(self, entries: Sequence[JournalEntry]) -> None:
        """Append decisions that changed nothing, in one statement.

        On PostgreSQL the transaction does not wait for its WAL to reach the disk
        (``synchronous_commit`` off for it alone): a crash may lose the last moments of the
        journal, never an order's state or its hash-chained trail.
        """
        if not entries:
            return
        rows = [journal_values(entry) for entry in entries]

        async def op(conn: AsyncConnection) -> None:
            if self._kind is Kind.POSTGRESQL:
                await conn.execute(_NOT_DURABLE)
            # One multi-row INSERT (an executemany would send one statement per row).
            await conn.execute(JOURNAL_INSERT.values(rows))

        await self._run("append_journal", op)

    async def journal_for(
        self, tenant: str, order_id: str, *, limit: int = 1000
    ) -> Sequence[JournalEntry]:
        """The first ``limit`` journal entries of one order, oldest first."""
        params = {"p_tenant": tenant, "p_order_id": order_id, "p_limit": limit}

        async def op(conn: AsyncConnection) -> list[JournalEntry]:
            rows = (await conn.execute(JOURNAL_SELECT, params)).mappings().all()
            return [journal_from_row(row) for row in rows]

        return await self._run("journal_for", op, single=True)

    # --- maintenance: the reconciler, purges and monitoring -----------------------------------

    async def claim_orders_to_check(
        self,
        *,
        statuses: Sequence[OrderStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[OrderRecord]:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.claim_orders_to_check`.

        One transaction: a select that locks the due orders, skipping those another claim has
        locked (``FOR UPDATE SKIP LOCKED``; SQLite's single writer), then their next check.
        """
        rows = await self._claim_checks(
            "claim_orders_to_check",
            self._m.orders_to_check,
            self._m.check_order,
            ("tenant", "order_id"),
            [status.value for status in statuses],
            untouched_for=untouched_for,
            limit=limit,
            lease_for=lease_for,
        )
        return [order_from_row(row) for row in rows]

    async def claim_events_to_check(
        self,
        *,
        statuses: Sequence[InboxStatus],
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[InboxEvent]:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.claim_events_to_check`; one
        transaction, as :meth:`claim_orders_to_check`."""
        rows = await self._claim_checks(
            "claim_events_to_check",
            self._m.events_to_check,
            self._m.check_event,
            ("account", "event_id"),
            [status.value for status in statuses],
            untouched_for=untouched_for,
            limit=limit,
            lease_for=lease_for,
        )
        return [event_from_row(row) for row in rows]

    async def _claim_checks(
        self,
        what: str,
        due: sa.Select[Any],
        stamp: sa.Update,
        key: tuple[str, str],
        statuses: list[str],
        *,
        untouched_for: timedelta,
        limit: int,
        lease_for: timedelta,
    ) -> Sequence[sa.RowMapping]:
        positive(lease_for, "lease_for")
        _not_negative(untouched_for, "untouched_for")
        if limit <= 0 or not statuses:
            return []
        params: dict[str, Any] = {
            "p_statuses": statuses,
            "p_untouched_us": span(untouched_for),
            "p_limit": limit,
        }
        lease_us = span(lease_for)

        async def op(conn: AsyncConnection) -> Sequence[sa.RowMapping]:
            now = self._now()
            result = await conn.execute(due, params | now)
            rows: Sequence[sa.RowMapping] = result.mappings().all()
            if rows:
                leases = [
                    {f"p_{name}": row[name] for name in key} | {"p_after_us": lease_us} | now
                    for row in rows
                ]
                await conn.execute(stamp, leases)
            return rows

        return await self._run(what, op)

    async def schedule_order_check(self, tenant: str, order_id: str, *, after: timedelta) -> None:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.schedule_order_check`."""
        _not_negative(after, "after")
        params = {"p_tenant": tenant, "p_order_id": order_id, "p_after_us": span(after)}
        await self._execute_one("schedule_order_check", self._m.check_order, params)

    async def schedule_event_check(self, account: str, event_id: str, *, after: timedelta) -> None:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.schedule_event_check`."""
        _not_negative(after, "after")
        params = {"p_account": account, "p_event_id": event_id, "p_after_us": span(after)}
        await self._execute_one("schedule_event_check", self._m.check_event, params)

    async def order_counts(self) -> Mapping[OrderStatus, int]:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.order_counts`."""

        async def op(conn: AsyncConnection) -> dict[OrderStatus, int]:
            rows = (await conn.execute(self._m.order_counts)).all()
            return {OrderStatus(status): int(n) for status, n in rows}

        return await self._run("order_counts", op, single=True)

    async def outbox_backlog(self) -> OutboxBacklog:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.outbox_backlog`: one read."""

        async def op(conn: AsyncConnection) -> OutboxBacklog:
            row = (await conn.execute(self._m.backlog, self._now())).mappings().one()
            oldest = row["oldest_due_at"]
            # int(): MySQL sums into DECIMAL.
            return OutboxBacklog(
                pending=int(row["pending"]),
                due=int(row["due"]),
                dead=int(row["dead"]),
                oldest_due_at=from_micros(int(oldest)) if oldest is not None else None,
            )

        return await self._run("outbox_backlog", op, single=True)

    async def requeue_dead_effects(self, *, limit: int) -> int:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.requeue_dead_effects`: one
        statement, oldest first. Each entry keeps its fence, which grows at its next lease."""
        if limit <= 0:
            return 0
        return await self._execute_one("requeue_dead_effects", self._m.requeue, {"p_limit": limit})

    async def purge_events(self, *, older_than: timedelta, limit: int) -> int:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.purge_events`: one statement."""
        return await self._purge("purge_events", self._m.purge_events, older_than, limit)

    async def purge_effects(self, *, older_than: timedelta, limit: int) -> int:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.purge_effects`: one statement."""
        return await self._purge("purge_effects", self._m.purge_effects, older_than, limit)

    async def purge_journal(self, *, older_than: timedelta, limit: int) -> int:
        """See :meth:`idempay.protocols.AsyncMaintenanceStore.purge_journal`: one statement,
        oldest first."""
        return await self._purge("purge_journal", self._m.purge_journal, older_than, limit)

    async def _purge(self, what: str, stmt: sa.Delete, older_than: timedelta, limit: int) -> int:
        _not_negative(older_than, "older_than")
        if limit <= 0:
            return 0
        params = {"p_older_us": span(older_than), "p_limit": limit}
        return await self._execute_one(what, stmt, params)

    async def _execute_one(self, what: str, stmt: sa.Executable, params: dict[str, Any]) -> int:
        """Run one statement that completes by itself; return how many rows it changed."""

        async def op(conn: AsyncConnection) -> int:
            return int((await conn.execute(stmt, params | self._now())).rowcount)

        return await self._run(what, op, single=True)


_NOT_DURABLE: Final = sa.text("SET LOCAL synchronous_commit TO OFF")


def _not_negative(value: timedelta, name: str) -> None:
    """Refuse a negative duration (zero is allowed: "at once", "everything")."""
    if value < timedelta(0):
        raise ConfigurationError(f"{name} must not be negative")


def _effect_key(entry: OutboxEntry) -> dict[str, Any]:
    return {
        "p_tenant": entry.tenant,
        "p_order_id": entry.order_id,
        "p_effect": entry.effect,
        "p_discriminator": entry.discriminator,
    }
