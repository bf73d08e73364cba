"""SQL stores for SQLite, PostgreSQL and MySQL/MariaDB (async source of the sync twin).

Every operation of :class:`AsyncSQLIdempotencyStore` and every dispatcher operation of
:class:`AsyncSQLPaymentStore` is one short transaction of its own, retried whole (bounded,
jittered) when the database reports a deadlock, a serialization failure, a lock-wait timeout or
SQLite's busy. Driver errors never escape: they become :class:`~idempay.errors.StoreError` or
one of its subclasses, with messages that name the operation and never a key or a payload.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeAlias, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

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
from idempay.backends.sql._schema import (
    DUE_EFFECTS_INDEX,
    audit,
    inbox,
    orders,
    outbox,
    records,
)
from idempay.backends.sql._statements import (
    audit_from_row,
    blob,
    claim_plan,
    clock_now,
    database_now,
    encode_details,
    encode_headers,
    entry_from_row,
    event_from_row,
    greater,
    order_from_row,
    order_values,
    record_from_row,
)
from idempay.clock import Clock, SystemClock
from idempay.core.audit import GENESIS_HASH, AuditDraft, AuditEntry, seal
from idempay.core.keys import validate_key
from idempay.core.models import (
    InboxEvent,
    InboxStatus,
    NewEffect,
    OrderRecord,
    OutboxEntry,
    OutboxStatus,
)
from idempay.core.orders import OrderState
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
# A PostgreSQL claim that finds a row committed after its snapshot runs again at once (a new
# statement, a new snapshot); this many rounds in a row mean something else is wrong.
_CLAIM_ROUNDS: Final = 5
_PENDING: Final = OutboxStatus.PENDING.value
_ORPHAN: Final = InboxStatus.ORPHAN.value
_FINISHED: Final = (InboxStatus.PROCESSED, InboxStatus.IGNORED)


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
        and MySQL engines get ``pool_pre_ping`` and READ COMMITTED unless ``engine_options``
        say otherwise; SQLite engines WAL, a busy timeout and ``BEGIN IMMEDIATE``.

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
        if options.get("isolation_level") not in (None, "AUTOCOMMIT"):
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

    def _now(self) -> sa.ColumnElement[int]:
        """The current time for a statement: the clock's, bound, or the server's, in SQL."""
        if self._clock is not None:
            return clock_now(micros(self._clock.now()))
        return database_now(self._kind)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[AsyncConnection]:
        async with self._engine.connect() as conn:
            if self._isolation is not None:
                await conn.execution_options(isolation_level=self._isolation)
            yield conn

    async def _run(self, what: str, op: _Op[T]) -> T:
        """Run ``op`` in a transaction of its own, retrying transient failures."""

        async def once() -> T:
            try:
                async with self._connect() as conn, conn.begin():
                    return await op(conn)
            except sa.exc.SQLAlchemyError as error:
                raise wrap(error, what) from error

        return await async_retry(once)


def _lost() -> LeaseLostError:
    return LeaseLostError("the idempotency record is no longer held by this lease")


def _owned_by(scope: str, key: str, lease: Lease) -> sa.ColumnElement[bool]:
    t = records
    return sa.and_(
        t.c.scope == scope,
        t.c.key == key,
        t.c.lease_token == lease.token,
        t.c.fence == lease.fence,
        t.c.state == RecordState.IN_PROGRESS.value,
    )


class AsyncSQLIdempotencyStore(AsyncSQLStoreBase):
    """Idempotency records in ``idempay_idempotency_records``; see
    :class:`idempay.protocols.AsyncIdempotencyStore`.

    A claim is one atomic conditional write per dialect, never a read then a write:
    PostgreSQL ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING`` inside a statement
    that also returns the row it left alone; SQLite the same upsert under ``BEGIN IMMEDIATE``;
    MySQL/MariaDB ``INSERT ... ON DUPLICATE KEY UPDATE`` with conditional columns, read back in
    the same transaction. Leases and expiry use the database clock (or ``clock`` when given).
    Owner writes are fenced: they match the lease token and fence in the same ``UPDATE``.
    """

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
        lease_us, keep_us = span(lease_for), span(max(retain_for, lease_for))

        async def op(conn: AsyncConnection) -> ClaimResult:
            for _ in range(_CLAIM_ROUNDS):
                fresh, takeover = new_token(), new_token()
                plan = claim_plan(
                    self._kind,
                    scope=scope,
                    key=key,
                    fingerprint=fingerprint,
                    now=self._now(),
                    lease_us=lease_us,
                    keep_us=keep_us,
                    fresh=fresh,
                    takeover=takeover,
                )
                result = await conn.execute(plan.write)
                row = result.mappings().first() if plan.write_returns_rows else None
                if row is None and plan.read is not None:
                    row = (await conn.execute(plan.read)).mappings().first()
                if row is not None:
                    return _claim_result(record_from_row(row), fresh, takeover)
            raise TransientStoreError("claim: kept racing concurrent writers", attempts=1)

        return await self._run("claim", op)

    async def checkpoint(
        self,
        scope: str,
        key: str,
        lease: Lease,
        *,
        recovery_point: str,
        resource_id: str | None = None,
    ) -> None:
        values: dict[str, Any] = {"recovery_point": recovery_point}
        if resource_id is not None:
            values["resource_id"] = resource_id
        stmt = sa.update(records).where(_owned_by(scope, key, lease)).values(values)

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(stmt)).rowcount != 1:
                raise _lost()

        await self._run("checkpoint", op)

    async def extend(self, scope: str, key: str, lease: Lease, *, lease_for: timedelta) -> Lease:
        positive(lease_for, "lease_for")
        t = records

        async def op(conn: AsyncConnection) -> Lease:
            until = self._now() + span(lease_for)
            stmt = (
                sa.update(t)
                .where(_owned_by(scope, key, lease))
                .values(lease_expires_at=until, expires_at=greater(t.c.expires_at, until))
            )
            if conn.dialect.update_returning:
                expires = (await conn.execute(stmt.returning(t.c.lease_expires_at))).scalar()
            else:
                if (await conn.execute(stmt)).rowcount != 1:
                    raise _lost()
                read = sa.select(t.c.lease_expires_at).where(t.c.scope == scope, t.c.key == key)
                expires = (await conn.execute(read)).scalar()
            if expires is None:
                raise _lost()
            return replace(lease, expires_at=from_micros(expires))

        return await self._run("extend", op)

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
        stmt = (
            sa.update(records)
            .where(_owned_by(scope, key, lease))
            .values(
                state=state.value,
                lease_token=None,
                lease_expires_at=None,
                response_status=response.status,
                response_body=blob(self._kind, response.body),
                response_content_type=response.content_type,
                response_headers=encode_headers(response.headers),
            )
        )
        return await self._update_and_read("complete", stmt, scope, key)

    async def release(self, scope: str, key: str, lease: Lease, *, discard: bool = False) -> None:
        owned = _owned_by(scope, key, lease)
        stmt: sa.Delete | sa.Update = (
            sa.delete(records).where(owned)
            if discard
            else sa.update(records)
            .where(owned)
            .values(state=RecordState.UNKNOWN.value, lease_token=None, lease_expires_at=None)
        )

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(stmt)).rowcount != 1:
                raise _lost()

        await self._run("release", op)

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        t = records

        async def op(conn: AsyncConnection) -> IdempotencyRecord | None:
            stmt = sa.select(*t.c).where(
                t.c.scope == scope, t.c.key == key, t.c.expires_at > self._now()
            )
            row = (await conn.execute(stmt)).mappings().first()
            return record_from_row(row) if row is not None else None

        return await self._run("get", op)

    async def purge_expired(self, *, limit: int = 1000) -> int:
        if limit <= 0:
            return 0
        t = records

        async def op(conn: AsyncConnection) -> int:
            doomed = sa.select(t.c.scope, t.c.key).where(t.c.expires_at <= self._now()).limit(limit)
            if self._kind is Kind.POSTGRESQL:
                # Two purgers (or a purger and a claim) never wait on each other's rows.
                doomed = doomed.with_for_update(skip_locked=True)
            # The LIMIT sits in a derived table: MySQL refuses it in an IN subquery, and
            # refuses a subquery on the table being deleted from unless it is materialised.
            batch = doomed.subquery()
            stmt = sa.delete(t).where(
                sa.tuple_(t.c.scope, t.c.key).in_(sa.select(batch.c.scope, batch.c.key))
            )
            return int((await conn.execute(stmt)).rowcount)

        return await self._run("purge_expired", op)

    async def _update_and_read(
        self, what: str, stmt: sa.Update, scope: str, key: str
    ) -> IdempotencyRecord:
        t = records

        async def op(conn: AsyncConnection) -> IdempotencyRecord:
            if conn.dialect.update_returning:
                row = (await conn.execute(stmt.returning(*t.c))).mappings().first()
            else:
                if (await conn.execute(stmt)).rowcount != 1:
                    raise _lost()
                read = sa.select(*t.c).where(t.c.scope == scope, t.c.key == key)
                row = (await conn.execute(read)).mappings().first()
            if row is None:
                raise _lost()
            return record_from_row(row)

        return await self._run(what, op)


def _claim_result(record: IdempotencyRecord, fresh: str, takeover: str) -> ClaimResult:
    lease = record.lease
    if lease is not None and lease.token == fresh:
        return Claimed(record=record, lease=lease)
    if lease is not None and lease.token == takeover:
        return Claimed(record=record, lease=lease, resumed=True)
    return Existing(record=record)


# --- orders, inbox, audit, outbox ------------------------------------------------------------


def _order_key(tenant: str, order_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(orders.c.tenant == tenant, orders.c.order_id == order_id)


def _event_key(account: str, event_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(inbox.c.account == account, inbox.c.event_id == event_id)


def _effect_key(entry: OutboxEntry) -> sa.ColumnElement[bool]:
    return sa.and_(
        outbox.c.tenant == entry.tenant,
        outbox.c.order_id == entry.order_id,
        outbox.c.effect == entry.effect,
        outbox.c.discriminator == entry.discriminator,
    )


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
        clock: Clock | None,
        started: datetime | None,
    ) -> None:
        self._conn = connection
        self._kind = kind
        self._clock = clock
        self._started = started
        self._since = time.monotonic()

    @property
    def connection(self) -> AsyncConnection:
        """The connection this transaction runs on."""
        return self._conn

    def now(self) -> datetime:
        """The store's clock, or the database clock read when the transaction began plus the
        time elapsed since (measured here, so it never runs ahead of the server)."""
        if self._clock is not None:
            return self._clock.now()
        if self._started is None:  # pragma: no cover - set whenever no clock is
            raise StoreError("the transaction has no clock")
        return self._started + timedelta(seconds=time.monotonic() - self._since)

    def _stamp(self) -> int:
        return micros(self.now())

    async def _execute(
        self, what: str, stmt: sa.Executable, params: Any = None
    ) -> sa.CursorResult[Any]:
        try:
            return await self._conn.execute(stmt, params)
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, what) from error

    async def _first(self, what: str, stmt: sa.Select[Any]) -> sa.RowMapping | None:
        return (await self._execute(what, stmt)).mappings().first()

    def _fallback(self, stmt: sa.Select[Any]) -> sa.Select[Any]:
        # On MySQL a row another transaction committed after ours began is only certain to be
        # seen by a locking read (under REPEATABLE READ, when the caller's transaction is
        # joined). A shared lock: it never waits on other readers of the same row.
        return stmt.with_for_update(read=True) if self._kind is Kind.MYSQL else stmt

    async def _insert_new(
        self, what: str, table: sa.Table, row: dict[str, Any], *, guard: bool = False
    ) -> bool:
        """Insert ``row`` unless its primary key exists; True if this call inserted it.

        A duplicate of another unique key (an order's PaymentIntent) raises
        ConcurrentUpdateError. With ``guard`` on PostgreSQL the insert runs in a savepoint, so
        that such a failure leaves the transaction usable (elsewhere it only fails the
        statement).
        """
        pk = list(table.primary_key.columns)
        stmt: sa.Executable
        if self._kind is Kind.POSTGRESQL:
            upsert_pg = postgresql.insert(table).values(row)
            stmt = upsert_pg.on_conflict_do_nothing(index_elements=pk).returning(pk[0])
        elif self._kind is Kind.SQLITE:
            upsert_lite = sqlite.insert(table).values(row)
            stmt = upsert_lite.on_conflict_do_nothing(index_elements=pk).returning(pk[0])
        else:
            # MySQL: a plain INSERT, the duplicate caught. ON DUPLICATE KEY UPDATE cannot tell
            # an insert from a no-op (the driver counts matched rows), and INSERT IGNORE would
            # also swallow truncation and bad values.
            stmt = sa.insert(table).values(row)
        try:
            if guard and self._kind is Kind.POSTGRESQL:
                async with self._savepoint(what):
                    result = await self._conn.execute(stmt)
            else:
                result = await self._conn.execute(stmt)
        except sa.exc.IntegrityError as error:
            if not is_unique_violation(error):
                raise wrap(error, what) from error
            if self._kind is Kind.MYSQL:
                return False
            raise ConcurrentUpdateError(
                "this PaymentIntent already belongs to another order"
            ) from error
        except sa.exc.SQLAlchemyError as error:
            raise wrap(error, what) from error
        if self._kind is Kind.MYSQL:
            return True
        return result.first() is not None

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
        row = {
            "tenant": tenant,
            "order_id": order_id,
            **order_values(state),
            "version": 1,
            "created_at": stamp,
            "updated_at": stamp,
        }
        guard = state.payment_intent_id is not None
        if await self._insert_new("insert_order", orders, row, guard=guard):
            moment = from_micros(stamp)
            return OrderRecord(tenant, order_id, state, 1, moment, moment), True
        existing = await self._first(
            "insert_order",
            self._fallback(sa.select(*orders.c).where(_order_key(tenant, order_id))),
        )
        if existing is None:
            # The duplicate was the PaymentIntent's, not the order's.
            raise ConcurrentUpdateError("this PaymentIntent already belongs to another order")
        return order_from_row(existing), False

    async def get_order(self, tenant: str, order_id: str) -> OrderRecord | None:
        row = await self._first(
            "get_order", sa.select(*orders.c).where(_order_key(tenant, order_id))
        )
        return order_from_row(row) if row is not None else None

    async def find_order_by_payment_intent(self, payment_intent_id: str) -> OrderRecord | None:
        stmt = sa.select(*orders.c).where(orders.c.payment_intent_id == payment_intent_id)
        row = await self._first("find_order_by_payment_intent", stmt)
        return order_from_row(row) if row is not None else None

    async def update_order(self, record: OrderRecord, state: OrderState) -> OrderRecord:
        stamp = self._stamp()
        stmt = (
            sa.update(orders)
            .where(
                _order_key(record.tenant, record.order_id),
                orders.c.version == record.version,
            )
            .values(**order_values(state), version=orders.c.version + 1, updated_at=stamp)
        )
        intent = state.payment_intent_id
        guard = intent is not None and intent != record.state.payment_intent_id
        try:
            if guard and self._kind is Kind.POSTGRESQL:
                async with self._savepoint("update_order"):
                    result = await self._conn.execute(stmt)
            else:
                result = await self._conn.execute(stmt)
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
        row = {
            "account": event.account,
            "event_id": event.event_id,
            "type": event.type,
            "created": event.created,
            "payload": blob(self._kind, event.payload),
            "status": event.status.value,
            "object_id": event.object_id,
            "payment_intent_id": event.payment_intent_id,
            "order_id": event.order_id,
            "attempts": event.attempts,
            "received_at": micros(event.received_at),
            "processed_at": micros(event.processed_at) if event.processed_at else None,
            "error": event.error,
        }
        if await self._insert_new("insert_event", inbox, row):
            return event, True
        stmt = self._fallback(sa.select(*inbox.c).where(_event_key(event.account, event.event_id)))
        existing = await self._first("insert_event", stmt)
        if existing is None:
            # Deleted between the conflict and the read (a purge): let the caller retry.
            raise ConcurrentUpdateError("the inbox event changed while it was inserted")
        return event_from_row(existing), False

    async def get_event(self, account: str, event_id: str) -> InboxEvent | None:
        row = await self._first(
            "get_event", sa.select(*inbox.c).where(_event_key(account, event_id))
        )
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
        values: dict[str, Any] = {
            "status": status.value,
            "attempts": inbox.c.attempts + 1,
            "error": error,
        }
        if order_id is not None:
            values["order_id"] = order_id
        if status in _FINISHED:
            values["processed_at"] = self._stamp()
        stmt = sa.update(inbox).where(_event_key(account, event_id)).values(values)
        if self._conn.dialect.update_returning:
            row = (
                (await self._execute("set_event_status", stmt.returning(*inbox.c)))
                .mappings()
                .first()
            )
        elif (await self._execute("set_event_status", stmt)).rowcount != 1:
            row = None
        else:
            row = await self._first(
                "set_event_status", sa.select(*inbox.c).where(_event_key(account, event_id))
            )
        if row is None:
            raise StoreError("no such inbox event")
        return event_from_row(row)

    async def orphans_for(
        self, *, payment_intent_id: str | None, order_id: str | None, limit: int = 100
    ) -> Sequence[InboxEvent]:
        hints = []
        if payment_intent_id is not None:
            hints.append(inbox.c.payment_intent_id == payment_intent_id)
        if order_id is not None:
            hints.append(inbox.c.order_id == order_id)
        if not hints or limit <= 0:
            return []
        stmt = (
            sa.select(*inbox.c)
            .where(inbox.c.status == _ORPHAN, sa.or_(*hints))
            .order_by(inbox.c.created, inbox.c.received_at, inbox.c.event_id)
            .limit(limit)
        )
        rows = (await self._execute("orphans_for", stmt)).mappings().all()
        return [event_from_row(row) for row in rows]

    async def append_audit(self, draft: AuditDraft) -> AuditEntry:
        last = (
            await self._execute(
                "append_audit",
                sa.select(audit.c.seq, audit.c.hash)
                .where(audit.c.tenant == draft.tenant, audit.c.order_id == draft.order_id)
                .order_by(audit.c.seq.desc())
                .limit(1),
            )
        ).first()
        seq, prev_hash = (last.seq + 1, last.hash) if last is not None else (1, GENESIS_HASH)
        entry = seal(draft, seq=seq, prev_hash=prev_hash)
        row = {
            "tenant": entry.tenant,
            "order_id": entry.order_id,
            "seq": entry.seq,
            "step": entry.step.value,
            "source": entry.source.value,
            "at": micros(entry.at),
            "from_status": entry.from_status,
            "to_status": entry.to_status,
            "event_id": entry.event_id,
            "key_digest": entry.key_digest,
            "details": encode_details(entry.details),
            "prev_hash": entry.prev_hash,
            "hash": entry.hash,
        }
        try:
            await self._conn.execute(sa.insert(audit).values(row))
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
        stmt = (
            sa.select(*audit.c)
            .where(audit.c.tenant == tenant, audit.c.order_id == order_id)
            .order_by(audit.c.seq)
        )
        rows = (await self._execute("audit_trail", stmt)).mappings().all()
        return [audit_from_row(row) for row in rows]

    async def enqueue_effect(self, effect: NewEffect) -> bool:
        stamp = self._stamp()
        row = {
            "tenant": effect.tenant,
            "order_id": effect.order_id,
            "effect": effect.effect,
            "discriminator": effect.discriminator,
            "payload": effect.payload,
            "status": _PENDING,
            "attempts": 0,
            "created_at": stamp,
            "next_attempt_at": stamp,
            "last_error": None,
            "lease_token": None,
            "lease_fence": 0,
            "lease_expires_at": None,
        }
        return await self._insert_new("enqueue_effect", outbox, row)


class AsyncSQLPaymentStore(AsyncSQLStoreBase):
    """Orders, inbox, audit trail and outbox in SQL; see
    :class:`idempay.protocols.AsyncPaymentStore` and :class:`~idempay.protocols.AsyncOutboxStore`.

    Order updates are compare-and-set on ``version`` (rowcount checked), unique keys decide
    every race, and outbox dispatchers lease entries with ``FOR UPDATE SKIP LOCKED``
    (PostgreSQL, MySQL 8, MariaDB 10.6+) or under SQLite's single writer.

    Pass your own connection to :meth:`transaction` to run inside your transaction (with the
    ORM, ``session.connection()``; with an ``AsyncSession``, ``await session.connection()``).
    """

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
        started = None
        if self._clock is None:
            stamp = (await conn.execute(sa.select(database_now(kind)))).scalar_one()
            started = from_micros(stamp)
        return AsyncSQLTransaction(conn, kind, clock=self._clock, started=started)

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

    async def claim_due_effects(self, *, limit: int, lease_for: timedelta) -> Sequence[OutboxEntry]:
        positive(lease_for, "lease_for")
        if limit <= 0:
            return []
        t = outbox
        lease_us = span(lease_for)

        async def op(conn: AsyncConnection) -> list[OutboxEntry]:
            now = self._now()
            due = (
                sa.select(*t.c, now.label("now_us"))
                .where(
                    t.c.status == _PENDING,
                    t.c.next_attempt_at <= now,
                    sa.or_(t.c.lease_token.is_(None), t.c.lease_expires_at <= now),
                )
                .order_by(t.c.next_attempt_at, t.c.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            if self._kind is Kind.MYSQL:
                # Without the index's order InnoDB sorts, and locks every due row it read
                # first: concurrent dispatchers would then find them all taken.
                due = due.with_hint(t, f"FORCE INDEX ({DUE_EFFECTS_INDEX})", conn.dialect.name)
            rows = (await conn.execute(due)).mappings().all()
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
                    {
                        "k_tenant": entry.tenant,
                        "k_order_id": entry.order_id,
                        "k_effect": entry.effect,
                        "k_discriminator": entry.discriminator,
                        "v_token": lease.token,
                        "v_fence": lease.fence,
                        "v_attempts": entry.attempts + 1,
                        "v_expires": micros(lease.expires_at),
                    }
                )
            stamp = (
                sa.update(t)
                .where(
                    t.c.tenant == sa.bindparam("k_tenant"),
                    t.c.order_id == sa.bindparam("k_order_id"),
                    t.c.effect == sa.bindparam("k_effect"),
                    t.c.discriminator == sa.bindparam("k_discriminator"),
                )
                .values(
                    lease_token=sa.bindparam("v_token"),
                    lease_fence=sa.bindparam("v_fence"),
                    attempts=sa.bindparam("v_attempts"),
                    lease_expires_at=sa.bindparam("v_expires"),
                )
            )
            await conn.execute(stamp, params)
            return leased

        return await self._run("claim_due_effects", op)

    async def finish_effect(self, entry: OutboxEntry) -> None:
        await self._settle(
            "finish_effect",
            entry,
            {"status": OutboxStatus.DONE.value, "last_error": None},
        )

    async def fail_effect(
        self, entry: OutboxEntry, *, error: str, retry_at: datetime | None
    ) -> None:
        values: dict[str, Any] = {"last_error": error}
        if retry_at is None:
            values["status"] = OutboxStatus.DEAD.value
        else:
            values["status"] = _PENDING
            values["next_attempt_at"] = micros(retry_at)
        await self._settle("fail_effect", entry, values)

    async def _settle(self, what: str, entry: OutboxEntry, values: dict[str, Any]) -> None:
        if entry.lease is None:
            raise LeaseLostError("the outbox entry was not leased to this dispatcher")
        stmt = (
            sa.update(outbox)
            .where(_effect_key(entry), outbox.c.lease_token == entry.lease.token)
            .values({**values, "lease_token": None, "lease_expires_at": None})
        )

        async def op(conn: AsyncConnection) -> None:
            if (await conn.execute(stmt)).rowcount != 1:
                raise LeaseLostError("the outbox entry is no longer held by this dispatcher")

        await self._run(what, op)

    async def effects_for(self, tenant: str, order_id: str) -> Sequence[OutboxEntry]:
        t = outbox
        stmt = (
            sa.select(*t.c)
            .where(t.c.tenant == tenant, t.c.order_id == order_id)
            .order_by(t.c.created_at, t.c.effect, t.c.discriminator)
        )

        async def op(conn: AsyncConnection) -> list[OutboxEntry]:
            return [entry_from_row(row) for row in (await conn.execute(stmt)).mappings().all()]

        return await self._run("effects_for", op)
