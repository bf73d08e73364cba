"""The statements of the SQL stores, per dialect where they must differ, and row conversions.

Building a statement performs no I/O, so the sync and async stores share every one of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from idempay.backends.sql._common import Kind, from_micros
from idempay.backends.sql._schema import records
from idempay.core.audit import AuditEntry, AuditSource, AuditStep
from idempay.core.models import InboxEvent, InboxStatus, OrderRecord, OutboxEntry, OutboxStatus
from idempay.core.orders import DisputeStatus, OrderState, OrderStatus, ReviewReason
from idempay.core.records import IdempotencyRecord, Lease, RecordState, StoredResponse

__all__ = [
    "ClaimPlan",
    "audit_from_row",
    "blob",
    "claim_plan",
    "clock_now",
    "database_now",
    "encode_details",
    "encode_headers",
    "entry_from_row",
    "event_from_row",
    "greater",
    "order_from_row",
    "order_values",
    "record_from_row",
]

_IN_PROGRESS: Final = RecordState.IN_PROGRESS.value
_UNKNOWN: Final = RecordState.UNKNOWN.value

# The database's own clock, as microseconds since the epoch, fixed for one statement.
_DATABASE_NOW: Final = {
    # EXTRACT gives an exact numeric (PostgreSQL 14+); statement_timestamp() is one value for
    # the whole statement, unlike clock_timestamp().
    Kind.POSTGRESQL: "CAST(EXTRACT(EPOCH FROM statement_timestamp()) * 1000000 AS BIGINT)",
    # Plain arithmetic on UTC datetimes: no session time zone, no DST fold, microseconds.
    Kind.MYSQL: "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))",
}


def database_now(kind: Kind) -> sa.ColumnElement[int]:
    """The current time of a PostgreSQL or MySQL server, in stored form (one value per
    statement)."""
    return sa.literal_column(_DATABASE_NOW[kind], sa.BigInteger)


def clock_now(value: int) -> sa.ColumnElement[int]:
    """A time read from a clock in the application, bound as a parameter."""
    return sa.literal(value, sa.BigInteger)


def blob(kind: Kind, value: bytes) -> Any:
    """A bytes value to bind for a binary column.

    MySQL gets it as hex text under ``UNHEX()``: aiomysql (0.3.2) fails on every bytes
    parameter with PyMySQL 1.2.3 and later (aio-libs/aiomysql#1080), and one form for both MySQL
    drivers keeps them alike.
    """
    return sa.func.unhex(value.hex()) if kind is Kind.MYSQL else value


def greater(a: sa.ColumnElement[int], b: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
    """The larger of two times, portably (SQLite has no GREATEST)."""
    return sa.case((a >= b, a), else_=b)


# --- idempotency records ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    """The statements of one claim attempt.

    ``write`` claims the key if it may (an upsert whose update is conditional). ``read`` is
    None when ``write`` itself returns the row in every case (PostgreSQL); otherwise it reads
    the row back in the same transaction. A row whose ``lease_token`` is ``fresh`` was claimed
    as a new record, one whose token is ``takeover`` was taken over; any other row is someone
    else's.
    """

    write: sa.Executable
    write_returns_rows: bool
    read: sa.Select[Any] | None


def _claimable(
    t: sa.Table, fingerprint: str, now: sa.ColumnElement[int]
) -> tuple[sa.ColumnElement[bool], sa.ColumnElement[bool]]:
    """(expired, takeover): the two conditions under which a claim wins an existing row."""
    expired = t.c.expires_at <= now
    takeover = sa.and_(
        t.c.fingerprint == fingerprint,
        sa.or_(
            t.c.state == _UNKNOWN,
            sa.and_(
                t.c.state == _IN_PROGRESS,
                sa.or_(t.c.lease_expires_at.is_(None), t.c.lease_expires_at <= now),
            ),
        ),
    )
    return expired, takeover


def _by_key(scope: str, key: str) -> sa.ColumnElement[bool]:
    return sa.and_(records.c.scope == scope, records.c.key == key)


def claim_plan(
    kind: Kind,
    *,
    scope: str,
    key: str,
    fingerprint: str,
    now: sa.ColumnElement[int],
    lease_us: int,
    keep_us: int,
    fresh: str,
    takeover: str,
) -> ClaimPlan:
    """The statements that claim (scope, key) atomically on ``kind``; see :class:`ClaimPlan`.

    A new or expired key gets a fresh record (new ``created_at``, fence + 1, recovery point
    cleared); an in-progress record of the same fingerprint whose lease ran out, or one
    released as unknown, is taken over (fence + 1, recovery point and ``created_at`` kept,
    expiry pushed to cover the lease). Anything else is left as it is.
    """
    t = records
    lease_until = now + lease_us
    new_row: dict[str, Any] = {
        "scope": scope,
        "key": key,
        "fingerprint": fingerprint,
        "state": _IN_PROGRESS,
        "fence": 1,
        "lease_token": fresh,
        "lease_expires_at": lease_until,
        "created_at": now,
        "expires_at": now + keep_us,
    }
    expired, takeover_ok = _claimable(t, fingerprint, now)
    read = sa.select(*t.c).where(_by_key(scope, key))
    if kind is Kind.MYSQL:
        return ClaimPlan(
            write=_mysql_claim(
                new_row,
                expired=expired,
                takeover_ok=takeover_ok,
                lease_until=lease_until,
                keep_us=keep_us,
                now=now,
                fresh=fresh,
                takeover=takeover,
            ),
            write_returns_rows=False,
            # A locking read: under any isolation level it sees the row as our upsert left it.
            read=read.with_for_update(),
        )
    changes: dict[str, Any] = {
        "fingerprint": fingerprint,
        "state": _IN_PROGRESS,
        "fence": t.c.fence + 1,
        "lease_token": sa.case((expired, sa.literal(fresh)), else_=sa.literal(takeover)),
        "lease_expires_at": lease_until,
        "created_at": sa.case((expired, now), else_=t.c.created_at),
        "expires_at": sa.case((expired, now + keep_us), else_=greater(t.c.expires_at, lease_until)),
        "recovery_point": sa.case((expired, sa.null()), else_=t.c.recovery_point),
        "resource_id": sa.case((expired, sa.null()), else_=t.c.resource_id),
        "response_status": sa.null(),
        "response_body": sa.null(),
        "response_content_type": sa.null(),
        "response_headers": sa.null(),
    }
    condition = sa.or_(expired, takeover_ok)
    if kind is Kind.SQLITE:
        upsert = (
            sqlite.insert(t)
            .values(new_row)
            .on_conflict_do_update(
                index_elements=[t.c.scope, t.c.key], set_=changes, where=condition
            )
            .returning(*t.c)
        )
        # Under BEGIN IMMEDIATE nobody writes between the upsert and this read.
        return ClaimPlan(write=upsert, write_returns_rows=True, read=read)
    upsert_pg = (
        postgresql.insert(t)
        .values(new_row)
        .on_conflict_do_update(index_elements=[t.c.scope, t.c.key], set_=changes, where=condition)
        .returning(*t.c)
    )
    claimed = upsert_pg.cte("claimed")
    # When the upsert leaves the row alone, the same statement returns it, read from the
    # statement's snapshot. That snapshot may predate a row committed while the upsert waited
    # for it (READ COMMITTED): then no row is returned at all, or a stale one that still looks
    # claimable, which is filtered out here; the caller runs the statement again.
    existing = (
        sa.select(*t.c)
        .where(_by_key(scope, key))
        .where(~sa.exists(sa.select(claimed.c.scope)))
        .where(sa.not_(condition))
    )
    return ClaimPlan(
        write=sa.select(*claimed.c).union_all(existing), write_returns_rows=True, read=None
    )


def _mysql_claim(
    new_row: Mapping[str, Any],
    *,
    expired: sa.ColumnElement[bool],
    takeover_ok: sa.ColumnElement[bool],
    lease_until: sa.ColumnElement[int],
    keep_us: int,
    now: sa.ColumnElement[int],
    fresh: str,
    takeover: str,
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
    is_fresh = t.c.lease_token == fresh
    is_ours = t.c.lease_token.in_([fresh, takeover])
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
            sa.case(
                (expired, sa.literal(fresh)),
                (takeover_ok, sa.literal(takeover)),
                else_=t.c.lease_token,
            ),
        ),
        # From here on the conditions are read from the token just written.
        (
            "expires_at",
            sa.case(
                (is_fresh, now + keep_us),
                (is_ours, greater(t.c.expires_at, lease_until)),
                else_=t.c.expires_at,
            ),
        ),
        ("fingerprint", sa.case((is_fresh, new_row["fingerprint"]), else_=t.c.fingerprint)),
        ("state", sa.case((is_ours, _IN_PROGRESS), else_=t.c.state)),
        ("lease_expires_at", sa.case((is_ours, lease_until), else_=t.c.lease_expires_at)),
    ]
    return mysql.insert(t).values(dict(new_row)).on_duplicate_key_update(changes)


def encode_headers(headers: tuple[tuple[str, str], ...]) -> str:
    """Response headers as JSON text: a list of [name, value] pairs, order kept."""
    return json.dumps([list(pair) for pair in headers])


def _decode_pairs(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    return tuple((str(name), str(value)) for name, value in json.loads(text))


def record_from_row(row: sa.RowMapping) -> IdempotencyRecord:
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


def order_from_row(row: sa.RowMapping) -> OrderRecord:
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


def event_from_row(row: sa.RowMapping) -> InboxEvent:
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


def audit_from_row(row: sa.RowMapping) -> AuditEntry:
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


def entry_from_row(row: sa.RowMapping) -> OutboxEntry:
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
