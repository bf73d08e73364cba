"""The statements of the SQL stores, built once per dialect, and the conversions of their rows.

Every statement is built once (per database family, and per way of reading the time) with
:func:`sqlalchemy.bindparam` placeholders, and its values are passed when it runs: SQLAlchemy
then finds the compiled form in its cache from the statement's memoised cache key, instead of
coercing every value and hashing a new statement at each call. Parameter names start with
``p_`` (or ``k_`` for a key also being set), never a column's own name, which SQLAlchemy keeps
for itself in INSERT and UPDATE statements.

Building a statement performs no I/O, so the sync and async stores share every one of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from idempay.backends.sql._common import Kind, from_micros, micros
from idempay.backends.sql._schema import (
    DUE_EFFECTS_INDEX,
    audit,
    inbox,
    journal,
    orders,
    outbox,
    records,
)
from idempay.core.audit import AuditEntry, AuditSource, AuditStep
from idempay.core.models import (
    InboxEvent,
    InboxStatus,
    JournalEntry,
    NewEffect,
    OrderRecord,
    OutboxEntry,
    OutboxStatus,
)
from idempay.core.orders import DisputeStatus, OrderState, OrderStatus, ReviewReason
from idempay.core.records import IdempotencyRecord, Lease, RecordState, StoredResponse

__all__ = [
    "DATABASE_NOW_SQL",
    "JOURNAL_INSERT",
    "JOURNAL_SELECT",
    "MaintenanceStatements",
    "OutboxStatements",
    "PaymentStatements",
    "RecordStatements",
    "audit_from_row",
    "audit_values",
    "blob_value",
    "effect_values",
    "encode_details",
    "encode_headers",
    "entry_from_row",
    "event_from_row",
    "event_values",
    "journal_from_row",
    "journal_values",
    "maintenance_statements",
    "order_from_row",
    "order_values",
    "outbox_statements",
    "payment_statements",
    "record_from_row",
    "record_statements",
    "state_values",
]

_IN_PROGRESS: Final = RecordState.IN_PROGRESS.value
_UNKNOWN: Final = RecordState.UNKNOWN.value
_PENDING: Final = OutboxStatus.PENDING.value
_ORPHAN: Final = InboxStatus.ORPHAN.value

DATABASE_NOW_SQL: Final = {
    # EXTRACT gives an exact numeric (PostgreSQL 14+); statement_timestamp() is one value for
    # the whole statement, unlike clock_timestamp().
    Kind.POSTGRESQL: "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT)",
    # Plain arithmetic on UTC datetimes: no session time zone, no DST fold, microseconds.
    Kind.MYSQL: "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))",
}
"""The database server's current time in stored form (microseconds), one value per statement."""


def _now(kind: Kind, *, bound: bool) -> sa.ColumnElement[int]:
    """The current time inside a statement: the ``now`` parameter (a clock of the
    application's, or the database time sampled by the store), or the server's clock in SQL."""
    if bound or kind is Kind.SQLITE:
        return sa.bindparam("now", type_=sa.BigInteger)
    return sa.literal_column(DATABASE_NOW_SQL[kind], sa.BigInteger)


def _p(name: str, type_: Any = None) -> sa.BindParameter[Any]:
    return sa.bindparam(f"p_{name}", type_=type_)


def _int(name: str) -> sa.BindParameter[Any]:
    return _p(name, sa.BigInteger)


def _blob(kind: Kind, name: str) -> sa.ColumnElement[Any]:
    """A binary value's placeholder; see :func:`blob_value`."""
    return sa.func.unhex(_p(name)) if kind is Kind.MYSQL else _p(name, sa.LargeBinary)


def blob_value(kind: Kind, value: bytes) -> Any:
    """A bytes value to bind for a binary column.

    MySQL gets it as hex text under ``UNHEX()``: aiomysql (0.3.2) fails on every bytes
    parameter with PyMySQL 1.2.3 and later (aio-libs/aiomysql#1080), and one form for both MySQL
    drivers keeps them alike.
    """
    return value.hex() if kind is Kind.MYSQL else value


def _greater(a: sa.ColumnElement[int], b: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    """The larger of two times, portably (SQLite has no GREATEST)."""
    return sa.case((a >= b, a), else_=b)


def _columns(
    table: sa.Table, kind: Kind, blobs: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A placeholder ``p_<column>`` for every column of ``table`` but those in ``skip``."""
    return {
        c.name: _blob(kind, c.name) if c.name in blobs else _p(c.name, c.type)
        for c in table.columns
        if c.name not in skip
    }


def _insert_new(kind: Kind, table: sa.Table, values: Mapping[str, Any]) -> sa.Executable:
    """Insert unless the row exists: the statement returns the key of a row it inserted.

    Without a conflict target, PostgreSQL and SQLite skip a row that collides with ANY unique
    key (an order's PaymentIntent too), so the caller reads the row back to tell which. MySQL
    gets a plain INSERT, its duplicate-key error caught: ON DUPLICATE KEY UPDATE cannot tell an
    insert from a no-op (the driver counts matched rows), and INSERT IGNORE would also swallow
    truncation and bad values.
    """
    first = next(iter(table.primary_key.columns))
    if kind is Kind.POSTGRESQL:
        return postgresql.insert(table).values(values).on_conflict_do_nothing().returning(first)
    if kind is Kind.SQLITE:
        return sqlite.insert(table).values(values).on_conflict_do_nothing().returning(first)
    return sa.insert(table).values(values)


# --- idempotency records ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordStatements:
    """The idempotency store's statements for one database family.

    ``claim`` claims the key if it may (an upsert whose update is conditional). When
    ``claim_returns_rows`` it returns the row as the claim left it (PostgreSQL: in every case;
    SQLite: when it won); otherwise ``claim_read`` reads the row back in the same transaction
    (a locking read on MySQL: under any isolation level it sees the row as the upsert left
    it). A row whose ``lease_token`` is the ``p_fresh`` parameter was claimed as a new record,
    one whose token is ``p_takeover`` was taken over; any other row is someone else's.
    ``extend`` and ``complete`` return the row they wrote where the database can
    (``UPDATE ... RETURNING``); elsewhere the caller reads it back with ``read``.
    """

    claim: sa.Executable
    claim_returns_rows: bool
    claim_read: sa.Select[Any] | None
    read: sa.Select[Any]
    checkpoint: sa.Update
    extend: sa.Executable
    complete: sa.Executable
    release: sa.Update
    discard: sa.Delete
    get: sa.Select[Any]
    purge: sa.Delete


def _owned() -> sa.ColumnElement[bool]:
    t = records
    return sa.and_(
        t.c.scope == _p("scope"),
        t.c.key == _p("key"),
        t.c.lease_token == _p("token"),
        t.c.fence == _int("fence"),
        t.c.state == _IN_PROGRESS,
    )


@cache
def record_statements(kind: Kind, *, bound: bool) -> RecordStatements:
    """The idempotency statements of ``kind``; ``bound``: the time is the ``now`` parameter."""
    t = records
    now = _now(kind, bound=bound)
    by_key = sa.and_(t.c.scope == _p("scope"), t.c.key == _p("key"))
    read = sa.select(*t.c).where(by_key)
    claim, returns = _claim(kind, now, read)
    until = now + _int("lease_us")
    extend: sa.Executable = (
        sa.update(t)
        .where(_owned())
        .values(lease_expires_at=until, expires_at=_greater(t.c.expires_at, until))
    )
    complete: sa.Executable = (
        sa.update(t)
        .where(_owned())
        .values(
            state=_p("state"),
            lease_token=None,
            lease_expires_at=None,
            response_status=_p("status", sa.Integer),
            response_body=_blob(kind, "body"),
            response_content_type=_p("content_type"),
            response_headers=_p("headers"),
        )
    )
    if kind is not Kind.MYSQL:
        extend = extend.returning(t.c.lease_expires_at)  # type: ignore[attr-defined]
        complete = complete.returning(*t.c)  # type: ignore[attr-defined]
    return RecordStatements(
        claim=claim,
        claim_returns_rows=returns,
        claim_read={
            Kind.POSTGRESQL: None,
            Kind.SQLITE: read,
            Kind.MYSQL: read.with_for_update(),
        }[kind],
        read=read,
        checkpoint=sa.update(t)
        .where(_owned())
        .values(
            recovery_point=_p("recovery_point"),
            resource_id=sa.func.coalesce(_p("resource_id", t.c.resource_id.type), t.c.resource_id),
        ),
        extend=extend,
        complete=complete,
        release=sa.update(t)
        .where(_owned())
        .values(state=_UNKNOWN, lease_token=None, lease_expires_at=None),
        discard=sa.delete(t).where(_owned()),
        get=sa.select(*t.c).where(by_key, t.c.expires_at > now),
        # Two purgers (or a purger and a claim) never wait on each other's rows.
        purge=sa.delete(t).where(_bounded(kind, t, t.c.expires_at <= now)),
    )


def _claim(
    kind: Kind, now: sa.ColumnElement[int], read: sa.Select[Any]
) -> tuple[sa.Executable, bool]:
    """The claim's conditional write on ``kind``, and whether it returns the row.

    A new or expired key gets a fresh record (new ``created_at``, fence + 1, recovery point
    cleared); an in-progress record of the same fingerprint whose lease ran out, or one
    released as unknown, is taken over (fence + 1, recovery point and ``created_at`` kept,
    expiry pushed to cover the lease). Anything else is left as it is.
    """
    t = records
    fingerprint, fresh, takeover = _p("fingerprint"), _p("fresh"), _p("takeover")
    lease_until = now + _int("lease_us")
    keep_until = now + _int("keep_us")
    new_row: dict[str, Any] = {
        "scope": _p("scope"),
        "key": _p("key"),
        "fingerprint": fingerprint,
        "state": _IN_PROGRESS,
        "fence": 1,
        "lease_token": fresh,
        "lease_expires_at": lease_until,
        "created_at": now,
        "expires_at": keep_until,
    }
    expired = t.c.expires_at <= now
    takeover_ok = sa.and_(
        t.c.fingerprint == fingerprint,
        sa.or_(
            t.c.state == _UNKNOWN,
            sa.and_(
                t.c.state == _IN_PROGRESS,
                sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at <= now),
            ),
        ),
    )
    if kind is Kind.MYSQL:
        return _mysql_claim(
            new_row,
            expired=expired,
            takeover_ok=takeover_ok,
            lease_until=lease_until,
            keep_until=keep_until,
            now=now,
        ), False
    changes: dict[str, Any] = {
        "fingerprint": fingerprint,
        "state": _IN_PROGRESS,
        "fence": t.c.fence + 1,
        "lease_token": sa.case((expired, fresh), else_=takeover),
        "lease_expires_at": lease_until,
        "created_at": sa.case((expired, now), else_=t.c.created_at),
        "expires_at": sa.case((expired, keep_until), else_=_greater(t.c.expires_at, lease_until)),
        "recovery_point": sa.case((expired, sa.null()), else_=t.c.recovery_point),
        "resource_id": sa.case((expired, sa.null()), else_=t.c.resource_id),
        "response_status": sa.null(),
        "response_body": sa.null(),
        "response_content_type": sa.null(),
        "response_headers": sa.null(),
    }
    condition = sa.or_(expired, takeover_ok)
    target = [t.c.scope, t.c.key]
    if kind is Kind.SQLITE:
        # Under BEGIN IMMEDIATE nobody writes between the upsert and the read that follows
        # when it returned nothing.
        upsert = (
            sqlite.insert(t)
            .values(new_row)
            .on_conflict_do_update(index_elements=target, set_=changes, where=condition)
            .returning(*t.c)
        )
        return upsert, True
    claimed = (
        postgresql.insert(t)
        .values(new_row)
        .on_conflict_do_update(index_elements=target, set_=changes, where=condition)
        .returning(*t.c)
        .cte("claimed")
    )
    # When the upsert leaves the row alone, the same statement returns it, read from the
    # statement's snapshot. That snapshot may predate a row committed while the upsert waited
    # for it (READ COMMITTED): then no row is returned at all, or a stale one that still looks
    # claimable, which is filtered out here; the caller runs the statement again.
    existing = read.where(~sa.exists(sa.select(claimed.c.scope))).where(sa.not_(condition))
    return sa.select(*claimed.c).union_all(existing), True


def _mysql_claim(
    new_row: Mapping[Any, Any],
    *,
    expired: sa.ColumnElement[bool],
    takeover_ok: sa.ColumnElement[bool],
    lease_until: sa.ColumnElement[int],
    keep_until: sa.ColumnElement[int],
    now: sa.ColumnElement[int],
) -> sa.Executable:
    """INSERT ... ON DUPLICATE KEY UPDATE, every column conditional.

    MySQL assigns the columns left to right, each assignment seeing the ones before it. The
    columns the two conditions read (expires_at, fingerprint, state, lease_expires_at) are
    therefore assigned last; ``lease_token`` is assigned just before them, from the conditions,
    and every later assignment asks the token which way the claim went. So each condition is
    evaluated on the row as it was, and once in effect.
    """
    t = records
    won = sa.or_(expired, takeover_ok)
    fresh, takeover = _p("fresh"), _p("takeover")
    is_fresh = t.c.lease_token == fresh
    is_ours = sa.or_(t.c.lease_token == fresh, t.c.lease_token == takeover)
    changes: list[tuple[str, Any]] = [
        ("created_at", sa.case((expired, now), else_=t.c.created_at)),
        ("recovery_point", sa.case((expired, sa.null()), else_=t.c.recovery_point)),
        ("resource_id", sa.case((expired, sa.null()), else_=t.c.resource_id)),
        ("response_status", sa.case((won, sa.null()), else_=t.c.response_status)),
        ("response_body", sa.case((won, sa.null()), else_=t.c.response_body)),
        (
            "response_content_type",
            sa.case((won, sa.null()), else_=t.c.response_content_type),
        ),
        ("response_headers", sa.case((won, sa.null()), else_=t.c.response_headers)),
        ("fence", sa.case((won, t.c.fence + 1), else_=t.c.fence)),
        (
            "lease_token",
            sa.case((expired, fresh), (takeover_ok, takeover), else_=t.c.lease_token),
        ),
        # From here on the conditions are read from the token just written.
        (
            "expires_at",
            sa.case(
                (is_fresh, keep_until),
                (is_ours, _greater(t.c.expires_at, lease_until)),
                else_=t.c.expires_at,
            ),
        ),
        ("fingerprint", sa.case((is_fresh, new_row["fingerprint"]), else_=t.c.fingerprint)),
        ("state", sa.case((is_ours, _IN_PROGRESS), else_=t.c.state)),
        ("lease_expires_at", sa.case((is_ours, lease_until), else_=t.c.lease_expires_at)),
    ]
    return mysql.insert(t).values(dict(new_row)).on_duplicate_key_update(changes)


# --- orders, inbox, audit (one transaction's statements) -------------------------------------


@dataclass(frozen=True, slots=True)
class PaymentStatements:
    """The statements of a payment transaction, for one database family.

    Their time is always the ``now`` parameter: the transaction's clock, which is the store's
    clock or the database clock sampled by the store (see ``AsyncSQLTransaction.now``).
    ``set_status`` is keyed by (finished, returning); ``orphans`` by which hints are given.
    """

    clock: sa.Select[Any]
    insert_order: sa.Executable
    get_order: sa.Select[Any]
    get_order_locked: sa.Select[Any]
    order_by_intent: sa.Select[Any]
    update_order: sa.Update
    insert_event: sa.Executable
    get_event: sa.Select[Any]
    get_event_locked: sa.Select[Any]
    set_status: Mapping[tuple[bool, bool], sa.Executable]
    orphans: Mapping[tuple[bool, bool], sa.Select[Any]]
    audit_head: sa.Select[Any]
    insert_audit: sa.Insert
    audit_trail: sa.Select[Any]
    enqueue: sa.Executable
    enqueue_ignoring: sa.Executable


def _locked(kind: Kind, stmt: sa.Select[Any]) -> sa.Select[Any]:
    # On MySQL a row another transaction committed after ours began is only certain to be
    # seen by a locking read (under REPEATABLE READ, when the caller's transaction is
    # joined). A shared lock: it never waits on other readers of the same row.
    return stmt.with_for_update(read=True) if kind is Kind.MYSQL else stmt


@cache
def payment_statements(kind: Kind) -> PaymentStatements:
    """The transaction statements of ``kind``."""
    now = _now(kind, bound=True)
    order_key = sa.and_(orders.c.tenant == _p("tenant"), orders.c.order_id == _p("order_id"))
    event_key = sa.and_(inbox.c.account == _p("account"), inbox.c.event_id == _p("event_id"))
    get_order = sa.select(*orders.c).where(order_key)
    get_event = sa.select(*inbox.c).where(event_key)
    state = {name: _p(name, orders.c[name].type) for name in _STATE_COLUMNS}
    set_status: dict[tuple[bool, bool], sa.Executable] = {}
    for finished in (False, True):
        values: dict[str, Any] = {
            "status": _p("status"),
            "attempts": inbox.c.attempts + 1,
            "error": _p("error", inbox.c.error.type),
            "order_id": sa.func.coalesce(_p("order_id", inbox.c.order_id.type), inbox.c.order_id),
        }
        if finished:
            values["processed_at"] = now
        update = sa.update(inbox).where(event_key).values(values)
        set_status[(finished, False)] = update
        set_status[(finished, True)] = update.returning(*inbox.c)
    by_intent = inbox.c.payment_intent_id == _p("payment_intent_id")
    by_order = inbox.c.order_id == _p("order_id")
    orphans = {
        hints: sa.select(*inbox.c)
        .where(inbox.c.status == _ORPHAN, sa.or_(*clauses))
        .order_by(inbox.c.created, inbox.c.received_at, inbox.c.event_id)
        .limit(_p("limit"))
        for hints, clauses in (
            ((True, False), [by_intent]),
            ((False, True), [by_order]),
            ((True, True), [by_intent, by_order]),
        )
    }
    effect_columns = _columns(outbox, kind)
    effect_row = {name: effect_columns[name] for name in _EFFECT_COLUMNS} | {
        "status": _PENDING,
        "attempts": 0,
        "created_at": now,
        "next_attempt_at": now,
        "lease_fence": 0,
    }
    ignoring: sa.Executable
    if kind is Kind.MYSQL:
        # Existing effects are left alone; a no-op update, not INSERT IGNORE (which would
        # also let a value too long for its column through, truncated).
        ignoring = (
            mysql.insert(outbox).values(effect_row).on_duplicate_key_update(tenant=outbox.c.tenant)
        )
    elif kind is Kind.POSTGRESQL:
        ignoring = postgresql.insert(outbox).values(effect_row).on_conflict_do_nothing()
    else:
        ignoring = sqlite.insert(outbox).values(effect_row).on_conflict_do_nothing()
    return PaymentStatements(
        clock=sa.select(_now(kind, bound=False)),
        insert_order=_insert_new(
            kind,
            orders,
            {"tenant": _p("tenant"), "order_id": _p("order_id")}
            | state
            | {"version": 1, "created_at": now, "updated_at": now},
        ),
        get_order=get_order,
        get_order_locked=_locked(kind, get_order),
        order_by_intent=sa.select(*orders.c).where(
            orders.c.payment_intent_id == _p("payment_intent_id")
        ),
        update_order=sa.update(orders)
        .where(
            orders.c.tenant == sa.bindparam("k_tenant"),
            orders.c.order_id == sa.bindparam("k_order_id"),
            orders.c.version == sa.bindparam("k_version", type_=sa.BigInteger),
        )
        .values(**state, version=orders.c.version + 1, updated_at=now),
        # A new event has never been checked: its check_at stays NULL.
        insert_event=_insert_new(
            kind, inbox, _columns(inbox, kind, blobs=("payload",), skip=("check_at",))
        ),
        get_event=get_event,
        get_event_locked=_locked(kind, get_event),
        set_status=set_status,
        orphans=orphans,
        audit_head=sa.select(audit.c.seq, audit.c.hash)
        .where(audit.c.tenant == _p("tenant"), audit.c.order_id == _p("order_id"))
        .order_by(audit.c.seq.desc())
        .limit(1),
        insert_audit=sa.insert(audit).values(_columns(audit, kind)),
        audit_trail=sa.select(*audit.c)
        .where(audit.c.tenant == _p("tenant"), audit.c.order_id == _p("order_id"))
        .order_by(audit.c.seq),
        enqueue=_insert_new(kind, outbox, effect_row),
        enqueue_ignoring=ignoring,
    )


# --- the outbox dispatcher -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutboxStatements:
    """The dispatcher's statements for one database family.

    ``due`` selects and locks up to ``p_limit`` due entries, with the time it used as
    ``now_us``; ``lease`` stamps one of them (run with one parameter set per entry);
    ``settle`` is keyed by (done, dead).
    """

    due: sa.Select[Any]
    lease: sa.Update
    settle: Mapping[tuple[bool, bool], sa.Update]
    effects_for: sa.Select[Any]


@cache
def outbox_statements(kind: Kind, *, bound: bool) -> OutboxStatements:
    """The dispatcher statements of ``kind``; ``bound``: the time is the ``now`` parameter."""
    t = outbox
    now = _now(kind, bound=bound)
    key = sa.and_(
        t.c.tenant == _p("tenant"),
        t.c.order_id == _p("order_id"),
        t.c.effect == _p("effect"),
        t.c.discriminator == _p("discriminator"),
    )
    due = (
        sa.select(*t.c, now.label("now_us"))
        .where(
            t.c.status == _PENDING,
            t.c.next_attempt_at <= now,
            sa.or_(t.c.lease_token.is_(None), t.c.lease_expires_at <= now),
        )
        .order_by(t.c.next_attempt_at, t.c.created_at)
        .limit(_p("limit"))
        .with_for_update(skip_locked=True)
    )
    if kind is Kind.MYSQL:
        # Without the index's order InnoDB sorts, and locks every due row it read first:
        # concurrent dispatchers would then find them all taken.
        due = due.with_hint(t, f"FORCE INDEX ({DUE_EFFECTS_INDEX})", "mysql").with_hint(
            t, f"FORCE INDEX ({DUE_EFFECTS_INDEX})", "mariadb"
        )
    owned = sa.and_(key, t.c.lease_token == _p("token"))
    released = {"lease_token": None, "lease_expires_at": None}
    settle = {
        (True, False): sa.update(t)
        .where(owned)
        .values(status=OutboxStatus.DONE.value, last_error=None, **released),
        (False, True): sa.update(t)
        .where(owned)
        .values(status=OutboxStatus.DEAD.value, last_error=_p("error"), **released),
        (False, False): sa.update(t)
        .where(owned)
        .values(
            status=_PENDING,
            last_error=_p("error"),
            next_attempt_at=_int("retry_at"),
            **released,
        ),
    }
    return OutboxStatements(
        due=due,
        lease=sa.update(t)
        .where(key)
        .values(
            lease_token=_p("new_token"),
            lease_fence=_int("new_fence"),
            attempts=_int("new_attempts"),
            lease_expires_at=_int("new_expires"),
        ),
        settle=settle,
        effects_for=sa.select(*t.c)
        .where(t.c.tenant == _p("tenant"), t.c.order_id == _p("order_id"))
        .order_by(t.c.created_at, t.c.effect, t.c.discriminator),
    )


# --- maintenance: the reconciler, purges and monitoring -------------------------------------

_DONE: Final = OutboxStatus.DONE.value
_DEAD: Final = OutboxStatus.DEAD.value
_PURGEABLE_EVENTS: Final = tuple(
    s.value for s in (InboxStatus.PROCESSED, InboxStatus.IGNORED, InboxStatus.ORPHAN)
)


@dataclass(frozen=True, slots=True)
class MaintenanceStatements:
    """The statements of :class:`~idempay.protocols.MaintenanceStore` for one database family.

    ``orders_to_check`` and ``events_to_check`` select and lock (skipping locked rows) up to
    ``p_limit`` rows due for a check, given ``p_statuses`` (expanding) and ``p_untouched_us``;
    ``check_order`` and ``check_event`` set one row's next check to ``now + p_after_us`` (the
    claims run them with one parameter set per row, in the same transaction). ``requeue`` and
    the purges change or delete up to ``p_limit`` rows (``p_older_us``: the purges' window).
    """

    orders_to_check: sa.Select[Any]
    check_order: sa.Update
    events_to_check: sa.Select[Any]
    check_event: sa.Update
    order_counts: sa.Select[Any]
    backlog: sa.Select[Any]
    requeue: sa.Update
    purge_events: sa.Delete
    purge_effects: sa.Delete
    purge_journal: sa.Delete


def _to_check(
    table: sa.Table, changed: sa.ColumnElement[int], now: sa.ColumnElement[int]
) -> sa.Select[Any]:
    """Rows of ``table`` in one of the statuses, unchanged (``changed``) for long enough, whose
    next check has come: never-checked ones first, then by next check, then by change.

    SQLite ignores FOR UPDATE: its transactions take the write lock when they begin, so the
    select and the update that stamps the rows run alone. MySQL sorts the candidates (no
    index has this order), locking each one it reads: a concurrent claim may then find fewer
    rows than there are, never one already handed out, and never waits.
    """
    check_at = table.c.check_at
    return (
        sa.select(*table.c)
        .where(
            table.c.status.in_(sa.bindparam("p_statuses", expanding=True)),
            changed <= now - _int("untouched_us"),
            sa.or_(check_at.is_(None), check_at <= now),
        )
        # False sorts first: the never-checked rows.
        .order_by(check_at.is_not(None), check_at, changed, *table.primary_key.columns)
        .limit(_p("limit"))
        .with_for_update(skip_locked=True)
    )


def _bounded(
    kind: Kind, table: sa.Table, condition: sa.ColumnElement[bool], *order: Any
) -> sa.ColumnElement[bool]:
    """``condition``, on at most ``p_limit`` rows (the first in ``order``): the WHERE clause of
    a bounded UPDATE or DELETE.

    The LIMIT sits in a derived table: MySQL refuses it in an IN
    subquery, and refuses a subquery on the table being changed unless it is materialised.
    The condition is repeated outside, so that a row changed since the batch was read is left
    alone (MySQL reads it without a lock). On PostgreSQL the batch skips rows locked by
    someone else.
    """
    key = list(table.primary_key.columns)
    chosen = sa.select(*key).where(condition).order_by(*order).limit(_p("limit"))
    batch: sa.Subquery | sa.CTE
    if kind is Kind.POSTGRESQL:
        # Materialised, so that it runs once: as a subquery the planner may rescan it for
        # each row of a nested loop, and each rescan skips the rows the statement has just
        # changed (they are locked by itself now) to return further ones, past the limit.
        batch = chosen.with_for_update(skip_locked=True).cte("batch").prefix_with("MATERIALIZED")
    else:
        batch = chosen.subquery()
    if len(key) == 1:
        return sa.and_(key[0].in_(sa.select(*batch.c)), condition)
    return sa.and_(sa.tuple_(*key).in_(sa.select(*batch.c)), condition)


def _count(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
    return sa.func.coalesce(sa.func.sum(sa.case((condition, 1), else_=0)), 0)


@cache
def maintenance_statements(kind: Kind, *, bound: bool) -> MaintenanceStatements:
    """The maintenance statements of ``kind``; ``bound``: the time is the ``now`` parameter."""
    now = _now(kind, bound=bound)
    until = now + _int("after_us")
    window = now - _int("older_us")
    o = outbox
    pending = o.c.status == _PENDING
    due = sa.and_(pending, o.c.next_attempt_at <= now)
    dead = o.c.status == _DEAD
    settled_events = sa.and_(inbox.c.status.in_(_PURGEABLE_EVENTS), inbox.c.received_at <= window)
    done_effects = sa.and_(o.c.status == _DONE, o.c.created_at <= window)
    return MaintenanceStatements(
        orders_to_check=_to_check(orders, orders.c.updated_at, now),
        check_order=sa.update(orders)
        .where(orders.c.tenant == _p("tenant"), orders.c.order_id == _p("order_id"))
        .values(check_at=until),
        events_to_check=_to_check(inbox, inbox.c.received_at, now),
        check_event=sa.update(inbox)
        .where(inbox.c.account == _p("account"), inbox.c.event_id == _p("event_id"))
        .values(check_at=until),
        order_counts=sa.select(orders.c.status, sa.func.count().label("n")).group_by(
            orders.c.status
        ),
        backlog=sa.select(
            _count(pending).label("pending"),
            _count(due).label("due"),
            _count(dead).label("dead"),
            sa.func.min(sa.case((due, o.c.next_attempt_at))).label("oldest_due_at"),
        ).where(o.c.status.in_((_PENDING, _DEAD))),
        # Oldest first, in the order of the dispatcher's index. ``lease_fence`` is kept, so
        # that the next lease's fence is still greater than every one handed out before.
        requeue=sa.update(o)
        .where(_bounded(kind, o, dead, o.c.next_attempt_at, o.c.created_at))
        .values(
            status=_PENDING,
            attempts=0,
            next_attempt_at=now,
            lease_token=None,
            lease_expires_at=None,
        ),
        purge_events=sa.delete(inbox).where(_bounded(kind, inbox, settled_events)),
        purge_effects=sa.delete(o).where(_bounded(kind, o, done_effects)),
        purge_journal=sa.delete(journal).where(
            _bounded(kind, journal, journal.c.at <= window, journal.c.at)
        ),
    )


# --- values and rows -------------------------------------------------------------------------

_STATE_COLUMNS: Final = (
    "status",
    "amount",
    "currency",
    "payment_intent_id",
    "amount_refunded",
    "dispute",
    "review_reason",
    "observed_at",
    "failures",
)
_EFFECT_COLUMNS: Final = ("tenant", "order_id", "effect", "discriminator", "payload")


def state_values(state: OrderState) -> dict[str, Any]:
    """The ``p_`` parameters of an order's state columns."""
    return {f"p_{name}": value for name, value in order_values(state).items()}


def event_values(kind: Kind, event: InboxEvent) -> dict[str, Any]:
    """The ``p_`` parameters of an inbox row."""
    return {
        "p_account": event.account,
        "p_event_id": event.event_id,
        "p_type": event.type,
        "p_created": event.created,
        "p_payload": blob_value(kind, event.payload),
        "p_status": event.status.value,
        "p_object_id": event.object_id,
        "p_payment_intent_id": event.payment_intent_id,
        "p_order_id": event.order_id,
        "p_attempts": event.attempts,
        "p_received_at": micros(event.received_at),
        "p_processed_at": micros(event.processed_at) if event.processed_at else None,
        "p_error": event.error,
    }


def audit_values(entry: AuditEntry) -> dict[str, Any]:
    """The ``p_`` parameters of a sealed audit entry."""
    return {
        "p_tenant": entry.tenant,
        "p_order_id": entry.order_id,
        "p_seq": entry.seq,
        "p_step": entry.step.value,
        "p_source": entry.source.value,
        "p_at": micros(entry.at),
        "p_from_status": entry.from_status,
        "p_to_status": entry.to_status,
        "p_event_id": entry.event_id,
        "p_key_digest": entry.key_digest,
        "p_details": encode_details(entry.details),
        "p_prev_hash": entry.prev_hash,
        "p_hash": entry.hash,
    }


def effect_values(effect: NewEffect) -> dict[str, Any]:
    """The ``p_`` parameters of a new outbox effect."""
    return {
        "p_tenant": effect.tenant,
        "p_order_id": effect.order_id,
        "p_effect": effect.effect,
        "p_discriminator": effect.discriminator,
        "p_payload": effect.payload,
    }


def encode_headers(headers: tuple[tuple[str, str], ...]) -> str:
    """Response headers as JSON text: a list of [name, value] pairs, order kept."""
    return json.dumps([list(pair) for pair in headers])


def _decode_pairs(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    return tuple((str(name), str(value)) for name, value in json.loads(text))


def record_from_row(row: Mapping[Any, Any]) -> IdempotencyRecord:
    """An idempotency record from its row."""
    token = row["lease_token"]
    expires = row["lease_expires_at"]
    lease = (
        Lease(token=token, fence=row["fence"], expires_at=from_micros(expires))
        if token is not None and expires is not None
        else None
    )
    status = row["response_status"]
    response = (
        StoredResponse(
            status=status,
            body=bytes(row["response_body"] or b""),
            content_type=row["response_content_type"] or "",
            headers=_decode_pairs(row["response_headers"]),
        )
        if status is not None
        else None
    )
    return IdempotencyRecord(
        scope=row["scope"],
        key=row["key"],
        fingerprint=row["fingerprint"],
        state=RecordState(row["state"]),
        fence=row["fence"],
        created_at=from_micros(row["created_at"]),
        expires_at=from_micros(row["expires_at"]),
        lease=lease,
        recovery_point=row["recovery_point"],
        resource_id=row["resource_id"],
        response=response,
    )


# --- orders, inbox, audit, outbox ------------------------------------------------------------


def order_values(state: OrderState) -> dict[str, Any]:
    """The columns of an order that hold its state."""
    return {
        "status": state.status.value,
        "amount": state.amount,
        "currency": state.currency,
        "payment_intent_id": state.payment_intent_id,
        "amount_refunded": state.amount_refunded,
        "dispute": state.dispute.value,
        "review_reason": state.review_reason.value if state.review_reason else None,
        "observed_at": state.observed_at,
        "failures": state.failures,
    }


def order_from_row(row: Mapping[Any, Any]) -> OrderRecord:
    """An order from its row."""
    reason = row["review_reason"]
    state = OrderState(
        status=OrderStatus(row["status"]),
        amount=row["amount"],
        currency=row["currency"],
        payment_intent_id=row["payment_intent_id"],
        amount_refunded=row["amount_refunded"],
        dispute=DisputeStatus(row["dispute"]),
        review_reason=ReviewReason(reason) if reason is not None else None,
        observed_at=row["observed_at"],
        failures=row["failures"],
    )
    return OrderRecord(
        tenant=row["tenant"],
        order_id=row["order_id"],
        state=state,
        version=row["version"],
        created_at=from_micros(row["created_at"]),
        updated_at=from_micros(row["updated_at"]),
    )


def event_from_row(row: Mapping[Any, Any]) -> InboxEvent:
    """An inbox event from its row."""
    processed = row["processed_at"]
    return InboxEvent(
        account=row["account"],
        event_id=row["event_id"],
        type=row["type"],
        created=row["created"],
        payload=bytes(row["payload"]),
        received_at=from_micros(row["received_at"]),
        status=InboxStatus(row["status"]),
        object_id=row["object_id"],
        payment_intent_id=row["payment_intent_id"],
        order_id=row["order_id"],
        attempts=row["attempts"],
        processed_at=from_micros(processed) if processed is not None else None,
        error=row["error"],
    )


def encode_details(details: tuple[tuple[str, str], ...]) -> str:
    """Audit details as JSON text: the sorted [key, value] pairs."""
    return json.dumps([list(pair) for pair in details], ensure_ascii=False)


def audit_from_row(row: Mapping[Any, Any]) -> AuditEntry:
    """An audit entry from its row."""
    return AuditEntry(
        tenant=row["tenant"],
        order_id=row["order_id"],
        seq=row["seq"],
        step=AuditStep(row["step"]),
        source=AuditSource(row["source"]),
        at=from_micros(row["at"]),
        from_status=row["from_status"],
        to_status=row["to_status"],
        event_id=row["event_id"],
        key_digest=row["key_digest"],
        details=_decode_pairs(row["details"]),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def entry_from_row(row: Mapping[Any, Any]) -> OutboxEntry:
    """An outbox entry from its row; ``lease`` is set while a dispatcher holds it."""
    token = row["lease_token"]
    expires = row["lease_expires_at"]
    lease = (
        Lease(token=token, fence=row["lease_fence"], expires_at=from_micros(expires))
        if token is not None and expires is not None
        else None
    )
    return OutboxEntry(
        tenant=row["tenant"],
        order_id=row["order_id"],
        effect=row["effect"],
        discriminator=row["discriminator"],
        payload=row["payload"],
        status=OutboxStatus(row["status"]),
        attempts=row["attempts"],
        created_at=from_micros(row["created_at"]),
        next_attempt_at=from_micros(row["next_attempt_at"]),
        last_error=row["last_error"],
        lease=lease,
    )


JOURNAL_INSERT: Final = sa.insert(journal)
"""Append journal rows (executed with a list of :func:`journal_values`)."""

JOURNAL_SELECT: Final = (
    sa.select(journal)
    .where(
        journal.c.tenant == sa.bindparam("p_tenant"),
        journal.c.order_id == sa.bindparam("p_order_id"),
    )
    .order_by(journal.c.id)
    .limit(sa.bindparam("p_limit"))
)
"""One order's journal, oldest first."""


def journal_values(entry: JournalEntry) -> dict[str, Any]:
    """The row of a journal entry."""
    return {
        "tenant": entry.tenant,
        "order_id": entry.order_id,
        "step": entry.step.value,
        "source": entry.source.value,
        "at": micros(entry.at),
        "event_id": entry.event_id,
        "key_digest": entry.key_digest,
        "reason": entry.reason,
    }


def journal_from_row(row: Mapping[Any, Any]) -> JournalEntry:
    """A journal entry from its row."""
    return JournalEntry(
        tenant=row["tenant"],
        order_id=row["order_id"],
        step=AuditStep(row["step"]),
        source=AuditSource(row["source"]),
        at=from_micros(row["at"]),
        event_id=row["event_id"],
        key_digest=row["key_digest"],
        reason=row["reason"],
    )
