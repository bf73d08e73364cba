"""The webhook's two steps (``receive_event``, ``commit_event``) as few statements as each
database allows, and the conversion of their parameters and results.

``receive_event`` writes nothing: it is ONE read everywhere (the inbox row, the order and the
end of its trail). ``commit_event`` is the webhook's only durable write: on PostgreSQL ONE
statement in autocommit (data-modifying CTEs: one round trip, one commit, no BEGIN); on SQLite
and MySQL/MariaDB, which have no data-modifying CTEs, one short transaction (the order's
compare-and-set, the guarded audit insert, the outbox insert, the inbox insert or guarded
update).

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
from dataclasses import dataclass, replace
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
    "GUARD_SQLSTATE",
    "PG_RECEIVE",
    "PORTABLE_READ",
    "CommitPlan",
    "guarded_audit",
    "guarded_status",
    "is_guard_failure",
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

_FOUND_ORDER: Final = f"""
    SELECT f.* FROM {orders.name} f WHERE f.payment_intent_id = :p_payment_intent_id
    UNION ALL
    SELECT g.* FROM {orders.name} g WHERE g.tenant = :k_tenant AND g.order_id = :k_order_id
       AND NOT EXISTS (
           SELECT 1 FROM {orders.name} p WHERE p.payment_intent_id = :p_payment_intent_id
       )
"""
"""The order an event concerns: by its PaymentIntent, else by the hinted (tenant, order id);
one row at most (both are unique keys, and the second branch runs only without the first)."""

PG_RECEIVE: Final = sa.text(
    f"""
SELECT to_jsonb(e) - 'payload' AS event, e.payload AS payload, to_jsonb(o) AS order_row,
       h.seq AS h_seq, h.hash AS h_hash
  FROM (SELECT 1) AS one
  LEFT JOIN {inbox.name} e ON e.account = :p_account AND e.event_id = :p_event_id
  LEFT JOIN ({_FOUND_ORDER}) o ON true
  LEFT JOIN LATERAL (
      SELECT a.seq, a.hash FROM {audit.name} a
       WHERE a.tenant = o.tenant AND a.order_id = o.order_id
       ORDER BY a.seq DESC LIMIT 1
  ) h ON true
"""
).columns(
    sa.column("event"),
    sa.column("payload"),
    sa.column("order_row"),
    sa.column("h_seq"),
    sa.column("h_hash"),
)
"""PostgreSQL's whole receive, one read in one snapshot: the inbox row, the order (by
PaymentIntent, else by the hinted order id) and the end of its trail. Rows come back as JSON
objects (the payload apart, as bytes): a few columns instead of thirty, each of which the driver
and SQLAlchemy would describe at every call."""

PORTABLE_READ: Final = sa.text(
    f"""
SELECT {_EVENT_COLUMNS}, {_ORDER_COLUMNS}, h.seq AS h_seq, h.hash AS h_hash
  FROM (SELECT 1 AS one) base
  LEFT JOIN {inbox.name} e ON e.account = :p_account AND e.event_id = :p_event_id
  LEFT JOIN ({_FOUND_ORDER}) o ON 1 = 1
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
"""SQLite's and MySQL's receive, one read: the inbox row, the order and its trail's end."""


def receive_params(event: InboxEvent, tenant: str | None, order_id: str | None) -> dict[str, Any]:
    """The parameters of the receive statements (the key and the correlation hints only: the
    payload is sent once, by the commit)."""
    hinted = tenant is not None and order_id is not None
    return {
        "p_account": event.account,
        "p_event_id": event.event_id,
        "p_payment_intent_id": event.payment_intent_id,
        "k_tenant": tenant if hinted else None,
        "k_order_id": order_id if hinted else None,
    }


def _unprefixed(row: Mapping[Any, Any], prefix: str, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: row[prefix + name] for name in names}


def _reception(
    *,
    stored: Mapping[str, Any] | None,
    order: Mapping[str, Any] | None,
    head_seq: int | None,
    head_hash: str | None,
) -> EventReception:
    return EventReception(
        event=event_from_row(stored) if stored is not None else None,
        order=order_from_row(order) if order is not None else None,
        audit_head=AuditHead(head_seq, head_hash)
        if head_seq is not None and head_hash is not None
        else AuditHead(),
    )


def pg_reception(row: Mapping[Any, Any]) -> EventReception:
    """What :data:`PG_RECEIVE` found."""
    stored = None if row["event"] is None else {**row["event"], "payload": row["payload"]}
    return _reception(
        stored=stored, order=row["order_row"], head_seq=row["h_seq"], head_hash=row["h_hash"]
    )


def portable_reception(row: Mapping[Any, Any]) -> EventReception:
    """What :data:`PORTABLE_READ` found."""
    return _reception(
        stored=None if row["e_account"] is None else _unprefixed(row, "e_", _INBOX),
        order=None if row["o_tenant"] is None else _unprefixed(row, "o_", _ORDERS),
        head_seq=row["h_seq"],
        head_hash=row["h_hash"],
    )


# --- commit ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CommitPlan:
    """One commit, ready to run: the sealed entries and the parameters of every statement.

    ``fresh``: the inbox row is inserted (``expected_status`` None), else updated if its status
    is still the expected one. ``update``: the order's compare-and-set runs (an order and a new
    state were given). ``params`` are those of PostgreSQL's one statement and of the
    compare-and-set; ``row`` those of the inbox insert elsewhere (but ``p_processed_at``, the
    transaction's time when ``finished``), ``status`` those of the guarded inbox update
    elsewhere; ``entries`` and ``effects`` hold the per-row parameters of the audit and outbox
    inserts.
    """

    fresh: bool
    update: bool
    finished: bool
    entries: tuple[dict[str, Any], ...]
    effects: tuple[dict[str, Any], ...]
    params: dict[str, Any]
    row: dict[str, Any]
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


def plan_commit(kind: Kind, commit: EventCommit) -> CommitPlan:
    """Check ``commit`` and compute everything its statements need, without I/O.

    Raises:
        ConfigurationError: the audit drafts are not all of the commit's order.
        ConcurrentUpdateError: the head is one no trail can end at (seq 0 with another hash).
    """
    entries = _sealed(commit)
    event, order = commit.event, commit.order
    fresh = commit.expected_status is None
    update = order is not None and commit.new_state is not None
    finished = commit.status in _FINISHED
    expected = None if commit.expected_status is None else commit.expected_status.value
    order_id = commit.order_id if commit.order_id is not None else event.order_id
    params: dict[str, Any] = {
        "k_account": event.account,
        "k_event_id": event.event_id,
        "e_status": commit.status.value,
        "e_error": commit.error,
        "e_order_id": commit.order_id,
        "e_finished": finished,
    }
    row: dict[str, Any] = {}
    if fresh:
        row = event_values(
            kind,
            replace(
                event,
                status=commit.status,
                attempts=1,
                error=commit.error,
                order_id=order_id,
                processed_at=None,
            ),
        )
        params |= {f"i_{c}": row[f"p_{c}"] for c in _INSERTED}
    else:
        params["x_status"] = expected
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
        fresh=fresh,
        update=update,
        finished=finished,
        entries=tuple(audit_values(e) for e in entries),
        effects=tuple(effect_values(e) for e in commit.effects),
        params=params,
        row=row,
        status={
            "p_account": event.account,
            "p_event_id": event.event_id,
            "p_status": commit.status.value,
            "p_error": commit.error,
            "p_order_id": commit.order_id,
            "x_status": expected,
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
        fresh=plan.fresh,
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


# The inbox columns a fresh row takes from the event as received (``i_`` parameters); its key
# is ``k_account``/``k_event_id``, and status, attempts, error and processed_at are the commit's.
_INSERTED: Final = (
    "type",
    "created",
    "payload",
    "object_id",
    "payment_intent_id",
    "order_id",
    "received_at",
)
_CASTS: Final = {"created": "BIGINT", "received_at": "BIGINT", "payload": "BYTEA"}

# The guard's error: a division by zero (SQLSTATE 22012) the statement raises on purpose.
GUARD_SQLSTATE: Final = "22012"


@cache
def pg_commit(
    *, fresh: bool, update: bool, audit_rows: int, effects: int, bound: bool
) -> sa.TextualSelect:
    """PostgreSQL's whole commit as ONE statement, for one shape of commit (``fresh``: the
    inbox row is inserted, else updated; ``audit_rows`` and ``effects``: 0, 1, or 2 for many).

    Every sub-statement of a statement sees the same snapshot, taken when it starts, and none
    sees another's writes; only their RETURNING rows pass between them. Under READ COMMITTED a
    row changed by a transaction that committed after the snapshot is invisible to plain reads
    but not to writes: an UPDATE waits for the row's writer and re-checks its WHERE against the
    row as committed, an INSERT waits for a concurrent insert of its key and then conflicts.
    The snapshot reads are therefore only early refusals; the exact checks are the writes:

    - ``ok``: in the snapshot, the inbox row is absent (``fresh``) or has the expected status,
      and (with entries) the trail ends at the head. Cheap refusals, no lock taken.
    - ``upd``: the order's compare-and-set, gated on ``ok``: exact (re-checked on the committed
      row). A PaymentIntent taken by another order fails the statement (unique violation).
    - ``evt``: the inbox write, gated on ``upd`` (else on ``ok``): an insert that does nothing
      if a concurrent delivery inserted the row (ON CONFLICT DO NOTHING, after waiting for it),
      or an update whose WHERE re-checks the expected status on the committed row. Exact.
    - ``aud`` and ``eff``: the audit and outbox inserts, gated on ``evt``, hence on everything
      above. An entry appended concurrently after our snapshot has our first ``seq``: the
      primary key fails the statement, which rolls back whole.
    - the guard: writes are gated in one chain, order first, so the only partial outcome is a
      compare-and-set that matched followed by an inbox write that did not (a concurrent
      delivery of the same event won); ``guard`` then divides by zero, which fails the
      statement (SQLSTATE 22012) and undoes the compare-and-set. The divisor is computed from
      the CTEs' rows at run time, so the planner cannot fold it into an error at plan time.

    The result row says whether everything was written (``done``: the inbox row was) and, with
    a compare-and-set, the order's new ``updated_at`` (the rest of the row is known already).
    Taking the order's row lock first, then the inbox row's, then audit keys, every commit
    locks in the same order.
    """
    now = ":now" if bound else DATABASE_NOW_SQL[Kind.POSTGRESQL]
    key = "account = :k_account AND event_id = :k_event_id"
    trail = f"{audit.name} WHERE tenant = :h_tenant AND order_id = :h_order_id"
    stored = (
        f"NOT EXISTS (SELECT FROM {inbox.name} WHERE {key})"
        if fresh
        else f"EXISTS (SELECT FROM {inbox.name} WHERE {key} AND status = :x_status)"
    )
    head = (
        f" AND NOT EXISTS (SELECT FROM {trail} AND seq > :h_seq)"
        f" AND (CAST(:h_seq AS BIGINT) = 0"
        f" OR EXISTS (SELECT FROM {trail} AND seq = :h_seq AND hash = :h_hash))"
        if audit_rows
        else ""
    )
    ctes = [f"ok AS (SELECT 1 WHERE {stored}{head})"]
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
    processed = f"CASE WHEN :e_finished THEN {now} END"
    if fresh:
        values = {c: f"CAST(:i_{c} AS {_CASTS.get(c, 'TEXT')})" for c in _INSERTED} | {
            "account": "CAST(:k_account AS TEXT)",
            "event_id": "CAST(:k_event_id AS TEXT)",
            "status": "CAST(:e_status AS TEXT)",
            "attempts": "1",
            "processed_at": processed,
            "error": "CAST(:e_error AS TEXT)",
            "check_at": "CAST(NULL AS BIGINT)",
        }
        ctes.append(
            f"evt AS (INSERT INTO {inbox.name} ({', '.join(_INBOX)})"
            f" SELECT {', '.join(values[c] for c in _INBOX)}"
            f" WHERE EXISTS (SELECT FROM {gate})"
            " ON CONFLICT (account, event_id) DO NOTHING RETURNING 1)"
        )
    else:
        ctes.append(
            f"evt AS (UPDATE {inbox.name} SET status = :e_status, attempts = attempts + 1,"
            " error = :e_error, order_id = COALESCE(:e_order_id, order_id),"
            f" processed_at = COALESCE({processed}, processed_at)"
            f" WHERE {key} AND status = :x_status"
            f" AND EXISTS (SELECT FROM {gate}) RETURNING 1)"
        )
    if audit_rows:
        ctes.append(
            f"aud AS (INSERT INTO {audit.name} ({', '.join(_AUDIT)})"
            f" SELECT * FROM {_source('a', _AUDIT, audit_rows)}"
            " WHERE EXISTS (SELECT FROM evt))"
        )
    if effects:
        ctes.append(
            f"eff AS (INSERT INTO {outbox.name} (tenant, order_id, effect, discriminator,"
            " payload, status, attempts, created_at, next_attempt_at, last_error, lease_token,"
            " lease_fence, lease_expires_at)"
            f" SELECT f.tenant, f.order_id, f.effect, f.discriminator, f.payload,"
            f" '{OutboxStatus.PENDING.value}', 0, {now}, {now}, NULL, NULL, 0, NULL"
            f" FROM {_source('f', _EFFECT, effects)}"
            " WHERE EXISTS (SELECT FROM evt)"
            " ON CONFLICT (tenant, order_id, effect, discriminator) DO NOTHING)"
        )
    select = "SELECT (SELECT count(*) FROM evt) AS done"
    columns: list[sa.ColumnClause[Any]] = [sa.column("done")]
    if update:
        # 1 / 1 when both or neither wrote; 1 / 0, failing the statement, when only upd did.
        select += (
            ", 1 / (1 + (SELECT count(*) FROM evt) - (SELECT count(*) FROM upd)) AS guard"
            ", (SELECT updated_at FROM upd) AS updated_at"
        )
        columns += [sa.column("guard"), sa.column("updated_at")]
    return sa.text("WITH " + ",\n".join(ctes) + "\n" + select).columns(*columns)


def is_guard_failure(error: sa.exc.DBAPIError) -> bool:
    """Whether ``error`` is the deliberate failure of :func:`pg_commit`'s guard."""
    return getattr(error.orig, "sqlstate", None) == GUARD_SQLSTATE


@cache
def guarded_status(finished: bool) -> sa.Update:  # noqa: FBT001 - a cache key
    """SQLite's and MySQL's inbox update: the row's outcome (one more attempt), written only
    if its status is still ``x_status`` (the caller checks that one row was written)."""
    key = sa.and_(
        inbox.c.account == sa.bindparam("p_account"),
        inbox.c.event_id == sa.bindparam("p_event_id"),
        inbox.c.status == sa.bindparam("x_status"),
    )
    values: dict[str, Any] = {
        "status": sa.bindparam("p_status"),
        "attempts": inbox.c.attempts + 1,
        "error": sa.bindparam("p_error", type_=inbox.c.error.type),
        "order_id": sa.func.coalesce(
            sa.bindparam("p_order_id", type_=inbox.c.order_id.type), inbox.c.order_id
        ),
    }
    if finished:
        values["processed_at"] = sa.bindparam("now", type_=sa.BigInteger)
    return sa.update(inbox).where(key).values(values)


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
