"""The webhook's two steps (``receive_event``, ``commit_event``) as few statements as each
database allows, and the conversion of their parameters and results.

PostgreSQL runs each step as ONE statement in autocommit (data-modifying CTEs): one round trip,
no BEGIN, no COMMIT. SQLite and MySQL/MariaDB, which have no data-modifying CTEs, run each step
as one short transaction: receive is an insert and one read; commit is the compare-and-set, the
guarded audit insert, the outbox insert and the inbox update.

Hash chaining happens in Python: the entries are sealed from the audit head read by
``receive_event``, and the statement writes them with their ``seq``, ``prev_hash`` and
``hash``. A head that moved since is refused twice over: the statement checks that the trail
still ends at the head (in its snapshot), and the primary key (tenant, order_id, seq) makes an
entry appended concurrently collide with ours.

Building a statement performs no I/O, so the sync and async stores share every one of them.
"""

# The SQL below is assembled from module constants only (table and column names); every value
# is a bound parameter.
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Final

import sqlalchemy as sa

from idempay.backends.sql._common import Kind
from idempay.backends.sql._schema import audit, inbox, orders, outbox
from idempay.backends.sql._statements import (
    DATABASE_NOW_SQL,
    audit_values,
    effect_values,
    event_from_row,
    event_values,
    order_from_row,
    state_values,
)
from idempay.core.audit import GENESIS_HASH, AuditEntry, seal
from idempay.core.models import (
    AuditHead,
    EventCommit,
    EventReception,
    InboxEvent,
    InboxStatus,
    OutboxStatus,
)
from idempay.errors import ConcurrentUpdateError, ConfigurationError

__all__ = [
    "PG_RECEIVE",
    "PORTABLE_READ",
    "CommitPlan",
    "guarded_audit",
    "pg_commit",
    "pg_reception",
    "pg_statement",
    "plan_commit",
    "portable_reception",
    "receive_params",
]

_INBOX: Final = tuple(c.name for c in inbox.columns)
_ORDERS: Final = tuple(c.name for c in orders.columns)
_AUDIT: Final = tuple(c.name for c in audit.columns)
_EVENT_COLUMNS: Final = ", ".join(f"e.{c} AS e_{c}" for c in _INBOX)
_ORDER_COLUMNS: Final = ", ".join(f"o.{c} AS o_{c}" for c in _ORDERS)
_FINISHED: Final = (InboxStatus.PROCESSED, InboxStatus.IGNORED)

# --- receive ---------------------------------------------------------------------------------

PG_RECEIVE: Final = sa.text(
    f"""
WITH ins AS (
    INSERT INTO {inbox.name} ({", ".join(_INBOX)})
    VALUES ({", ".join(f":p_{c}" for c in _INBOX)})
    ON CONFLICT (account, event_id) DO NOTHING
    RETURNING 1
), found AS (
    SELECT 1 AS rank, f.* FROM {orders.name} f WHERE f.payment_intent_id = :p_payment_intent_id
    UNION ALL
    SELECT 2, g.* FROM {orders.name} g WHERE g.tenant = :k_tenant AND g.order_id = :k_order_id
), o AS (
    SELECT * FROM found ORDER BY rank LIMIT 1
)
SELECT (SELECT count(*) FROM ins) AS inserted, to_jsonb(e) - 'payload' AS event,
       e.payload AS payload, to_jsonb(o) AS order_row, h.seq AS h_seq, h.hash AS h_hash
  FROM (SELECT 1) AS one
  LEFT JOIN {inbox.name} e ON e.account = :p_account AND e.event_id = :p_event_id
  LEFT JOIN o ON true
  LEFT JOIN LATERAL (
      SELECT a.seq, a.hash FROM {audit.name} a
       WHERE a.tenant = o.tenant AND a.order_id = o.order_id
       ORDER BY a.seq DESC LIMIT 1
  ) h ON true
"""
).columns(
    sa.column("inserted"),
    sa.column("event"),
    sa.column("payload"),
    sa.column("order_row"),
    sa.column("h_seq"),
    sa.column("h_hash"),
)
"""PostgreSQL's whole receive: the inbox insert, and in the same snapshot the earlier row (when
the insert did nothing), the order (by PaymentIntent, else by the hinted order id) and the end
of its trail. Rows come back as JSON objects (the payload apart, as bytes): a few columns
instead of thirty, each of which the driver and SQLAlchemy would describe at every call.

The statement's snapshot cannot see the row it inserts, so an inserted event is returned as
given; nor a row committed while the insert waited for it (READ COMMITTED): then neither is the
row inserted nor is it seen, and the caller runs the statement again."""

PORTABLE_READ: Final = sa.text(
    f"""
SELECT {_EVENT_COLUMNS}, {_ORDER_COLUMNS}, h.seq AS h_seq, h.hash AS h_hash
  FROM (SELECT 1 AS one) base
  LEFT JOIN {inbox.name} e
    ON e.account = :p_account AND e.event_id = :p_event_id AND :want_event = 1
  LEFT JOIN (
      SELECT f.* FROM {orders.name} f WHERE f.payment_intent_id = :p_payment_intent_id
      UNION ALL
      SELECT g.* FROM {orders.name} g WHERE g.tenant = :k_tenant AND g.order_id = :k_order_id
         AND NOT EXISTS (
             SELECT 1 FROM {orders.name} p WHERE p.payment_intent_id = :p_payment_intent_id
         )
  ) o ON 1 = 1
  LEFT JOIN {audit.name} h
    ON h.tenant = o.tenant AND h.order_id = o.order_id
   AND h.seq = (
       SELECT MAX(m.seq) FROM {audit.name} m WHERE m.tenant = o.tenant AND m.order_id = o.order_id
   )
"""
).columns(
    *(sa.column(f"e_{c}") for c in _INBOX),
    *(sa.column(f"o_{c}") for c in _ORDERS),
    sa.column("h_seq"),
    sa.column("h_hash"),
)
"""SQLite's and MySQL's receive read, after their inbox insert in the same transaction: the
earlier row (``want_event``: only when the insert did nothing), the order and its trail's end."""


def receive_params(
    kind: Kind, event: InboxEvent, tenant: str | None, order_id: str | None
) -> dict[str, Any]:
    """The parameters of the receive statements."""
    hinted = tenant is not None and order_id is not None
    return event_values(kind, event) | {
        "k_tenant": tenant if hinted else None,
        "k_order_id": order_id if hinted else None,
    }


def _unprefixed(row: Mapping[Any, Any], prefix: str, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: row[prefix + name] for name in names}


def _reception(
    event: InboxEvent,
    *,
    inserted: bool,
    stored: Mapping[str, Any] | None,
    order: Mapping[str, Any] | None,
    head_seq: int | None,
    head_hash: str | None,
) -> EventReception | None:
    if not inserted and stored is None:
        return None
    return EventReception(
        event=event if stored is None else event_from_row(stored),
        inserted=inserted,
        order=order_from_row(order) if order is not None else None,
        audit_head=AuditHead(head_seq, head_hash)
        if head_seq is not None and head_hash is not None
        else AuditHead(),
    )


def pg_reception(event: InboxEvent, row: Mapping[Any, Any]) -> EventReception | None:
    """What :data:`PG_RECEIVE` found; None if the event's row was not seen (run it again)."""
    inserted = row["inserted"] == 1
    stored = None
    if not inserted and row["event"] is not None:
        stored = {**row["event"], "payload": row["payload"]}
    return _reception(
        event,
        inserted=inserted,
        stored=stored,
        order=row["order_row"],
        head_seq=row["h_seq"],
        head_hash=row["h_hash"],
    )


def portable_reception(
    event: InboxEvent, row: Mapping[Any, Any], *, inserted: bool
) -> EventReception | None:
    """What :data:`PORTABLE_READ` found; None if the event's row was not seen."""
    return _reception(
        event,
        inserted=inserted,
        stored=None if row["e_account"] is None else _unprefixed(row, "e_", _INBOX),
        order=None if row["o_tenant"] is None else _unprefixed(row, "o_", _ORDERS),
        head_seq=row["h_seq"],
        head_hash=row["h_hash"],
    )


# --- commit ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """One commit, ready to run: the sealed entries and the parameters of every statement.

    ``update``: the order's compare-and-set runs (an order and a new state were given).
    ``params`` are those of PostgreSQL's one statement and of the compare-and-set;
    ``status`` those of the inbox update elsewhere; ``entries`` and ``effects`` hold the
    per-row parameters of the audit and outbox inserts.
    """

    update: bool
    finished: bool
    entries: tuple[dict[str, Any], ...]
    effects: tuple[dict[str, Any], ...]
    params: dict[str, Any]
    status: dict[str, Any]


def _sealed(commit: EventCommit) -> tuple[AuditEntry, ...]:
    """Seal the drafts after ``commit.audit_head``, refusing drafts of another order and a head
    that no trail can end at."""
    if not commit.audit:
        return ()
    owners = {(d.tenant, d.order_id) for d in commit.audit}
    if commit.order is not None:
        owners.add((commit.order.tenant, commit.order.order_id))
    if len(owners) != 1:
        raise ConfigurationError("the audit entries of a commit must all be of its order")
    head = commit.audit_head
    if head.seq < 0 or (head.seq == 0 and head.hash != GENESIS_HASH):
        raise ConcurrentUpdateError("the order's audit trail changed since it was read")
    entries = []
    seq, prev_hash = head.seq, head.hash
    for draft in commit.audit:
        entry = seal(draft, seq=seq + 1, prev_hash=prev_hash)
        entries.append(entry)
        seq, prev_hash = entry.seq, entry.hash
    return tuple(entries)


def plan_commit(commit: EventCommit) -> CommitPlan:
    """Check ``commit`` and compute everything its statements need, without I/O.

    Raises:
        ConfigurationError: the audit drafts are not all of the commit's order.
        ConcurrentUpdateError: the head is one no trail can end at (seq 0 with another hash).
    """
    entries = _sealed(commit)
    order = commit.order
    update = order is not None and commit.new_state is not None
    params: dict[str, Any] = {
        "k_account": commit.event.account,
        "k_event_id": commit.event.event_id,
        "e_status": commit.status.value,
        "e_error": commit.error,
        "e_order_id": commit.order_id,
        "e_finished": commit.status in _FINISHED,
    }
    if order is not None and commit.new_state is not None:
        params |= state_values(commit.new_state) | {
            "k_tenant": order.tenant,
            "k_order_id": order.order_id,
            "k_version": order.version,
        }
    if entries:
        params |= {
            "h_tenant": entries[0].tenant,
            "h_order_id": entries[0].order_id,
            "h_seq": commit.audit_head.seq,
            "h_hash": commit.audit_head.hash,
        }
    return CommitPlan(
        update=update,
        finished=commit.status in _FINISHED,
        entries=tuple(audit_values(e) for e in entries),
        effects=tuple(effect_values(e) for e in commit.effects),
        params=params,
        status={
            "p_account": commit.event.account,
            "p_event_id": commit.event.event_id,
            "p_status": commit.status.value,
            "p_error": commit.error,
            "p_order_id": commit.order_id,
        },
    )


_EFFECT: Final = ("tenant", "order_id", "effect", "discriminator", "payload")
_BIGINT: Final = frozenset({"seq", "at"})


def _rows(count: int) -> int:
    """A statement shape's row count: none, one (scalar parameters), or many (arrays)."""
    return min(count, 2)


def pg_statement(plan: CommitPlan, *, bound: bool) -> tuple[sa.TextualSelect, dict[str, Any]]:
    """PostgreSQL's statement for ``plan`` (see :func:`pg_commit`) and its parameters, but for
    ``now`` when ``bound``."""
    stmt = pg_commit(
        update=plan.update,
        audit_rows=_rows(len(plan.entries)),
        effects=_rows(len(plan.effects)),
        bound=bound,
    )
    return stmt, plan.params | _row_values(plan)


def _row_values(plan: CommitPlan) -> dict[str, Any]:
    """The per-row values of a PostgreSQL commit: scalars for one row, else one array per
    column (``unnest``); one row, the usual case, spares the driver adapting arrays."""
    values: dict[str, Any] = {}
    for prefix, rows, names in (("a", plan.entries, _AUDIT), ("f", plan.effects, _EFFECT)):
        if len(rows) == 1:
            values |= {f"{prefix}_{c}": rows[0][f"p_{c}"] for c in names}
        elif rows:
            values |= {f"{prefix}_{c}": [row[f"p_{c}"] for row in rows] for c in names}
    return values


def _source(prefix: str, names: tuple[str, ...], rows: int) -> str:
    """``FROM`` what the rows of an insert come: one row of scalars, or unnested arrays."""
    if rows == 1:
        casts = ", ".join(
            f"CAST(:{prefix}_{c} AS {'BIGINT' if c in _BIGINT else 'TEXT'})" for c in names
        )
        return f"(VALUES ({casts})) AS {prefix}({', '.join(names)})"
    arrays = ", ".join(
        f"CAST(:{prefix}_{c} AS {'BIGINT' if c in _BIGINT else 'TEXT'}[])" for c in names
    )
    return f"unnest({arrays}) AS {prefix}({', '.join(names)})"


@cache
def pg_commit(*, update: bool, audit_rows: int, effects: int, bound: bool) -> sa.TextualSelect:
    """PostgreSQL's whole commit as one statement, for one shape of commit (``audit_rows`` and
    ``effects``: 0, 1, or 2 for many; see :func:`pg_rows`).

    ``ok`` holds when the inbox row exists and (with entries) the trail still ends at the head;
    ``go`` when ``ok`` holds and the order's compare-and-set, if any, matched. Every write is
    conditional on ``go``, so a lost compare-and-set or a moved head writes nothing at all.
    The result row says whether the inbox row was updated (``done``: everything was written),
    whether the inbox row exists (``known``), and holds the order as updated (``order_row``,
    a JSON object).
    """
    now = ":now" if bound else DATABASE_NOW_SQL[Kind.POSTGRESQL]
    trail = f"{audit.name} WHERE tenant = :h_tenant AND order_id = :h_order_id"
    known = (
        f"EXISTS (SELECT FROM {inbox.name} WHERE account = :k_account AND event_id = :k_event_id)"
    )
    head = (
        f" AND NOT EXISTS (SELECT FROM {trail} AND seq > :h_seq)"
        f" AND (CAST(:h_seq AS BIGINT) = 0"
        f" OR EXISTS (SELECT FROM {trail} AND seq = :h_seq AND hash = :h_hash))"
        if audit_rows
        else ""
    )
    ctes = [f"ok AS (SELECT 1 WHERE {known}{head})"]
    gate = "ok"
    if update:
        state = ", ".join(f"{c} = :p_{c}" for c in _STATE)
        ctes.append(
            f"upd AS (UPDATE {orders.name} SET {state}, version = version + 1,"
            f" updated_at = {now}"
            " WHERE tenant = :k_tenant AND order_id = :k_order_id AND version = :k_version"
            " AND EXISTS (SELECT FROM ok) RETURNING *)"
        )
        gate = "upd"
    if audit_rows:
        ctes.append(
            f"aud AS (INSERT INTO {audit.name} ({', '.join(_AUDIT)})"
            f" SELECT * FROM {_source('a', _AUDIT, audit_rows)}"
            f" WHERE EXISTS (SELECT FROM {gate}))"
        )
    if effects:
        ctes.append(
            f"eff AS (INSERT INTO {outbox.name} (tenant, order_id, effect, discriminator,"
            " payload, status, attempts, created_at, next_attempt_at, last_error, lease_token,"
            " lease_fence, lease_expires_at)"
            f" SELECT f.tenant, f.order_id, f.effect, f.discriminator, f.payload,"
            f" '{OutboxStatus.PENDING.value}', 0, {now}, {now}, NULL, NULL, 0, NULL"
            f" FROM {_source('f', _EFFECT, effects)}"
            f" WHERE EXISTS (SELECT FROM {gate})"
            " ON CONFLICT (tenant, order_id, effect, discriminator) DO NOTHING)"
        )
    ctes.append(
        f"evt AS (UPDATE {inbox.name} SET status = :e_status, attempts = attempts + 1,"
        " error = :e_error, order_id = COALESCE(:e_order_id, order_id),"
        f" processed_at = CASE WHEN :e_finished THEN {now} ELSE processed_at END"
        " WHERE account = :k_account AND event_id = :k_event_id"
        f" AND EXISTS (SELECT FROM {gate}) RETURNING 1)"
    )
    select = f"SELECT (SELECT count(*) FROM evt) AS done, {known} AS known"
    columns: list[sa.ColumnClause[Any]] = [sa.column("done"), sa.column("known")]
    if update:
        select += ", to_jsonb(upd) AS order_row FROM (SELECT 1) AS one LEFT JOIN upd ON true"
        columns.append(sa.column("order_row"))
    return sa.text("WITH " + ",\n".join(ctes) + "\n" + select).columns(*columns)


_STATE: Final = (
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


@cache
def guarded_audit(kind: Kind) -> sa.Insert:
    """SQLite's and MySQL's audit insert: the entry is written only if the trail ends right
    before it (no entry at or after its ``seq``, and the one before it has its ``prev_hash``),
    read in the same transaction; the caller checks that one row was written."""
    del kind  # the same statement everywhere; SQLAlchemy adds MySQL's FROM DUAL
    names = [c.name for c in audit.columns]
    p = {name: sa.bindparam(f"p_{name}", type_=audit.c[name].type) for name in names}
    later, before = audit.alias("later"), audit.alias("before")
    moved = sa.exists().where(
        later.c.tenant == p["tenant"],
        later.c.order_id == p["order_id"],
        later.c.seq >= p["seq"],
    )
    chained = sa.exists().where(
        before.c.tenant == p["tenant"],
        before.c.order_id == p["order_id"],
        before.c.seq == p["seq"] - 1,
        before.c.hash == p["prev_hash"],
    )
    source = sa.select(*(p[name] for name in names)).where(~moved, sa.or_(p["seq"] == 1, chained))
    return sa.insert(audit).from_select(names, source)
