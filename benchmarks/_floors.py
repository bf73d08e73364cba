"""Hand-written references for the webhook apply: the least a database must be asked to do.

Both write the same rows as idempay's ``webhook apply`` into idempay's own tables (under
another tenant, so the two never touch each other's rows): the inbox row, the order's
compare-and-set (``WHERE version = expected``, version + 1), the next audit entry chained to
the previous one's hash, the outbox row. Neither reads the order first (the caller tracks the
version it last wrote), and neither goes through an ORM, a pool or a retry loop: they are a
floor, not a competitor.

- PostgreSQL: ONE statement (data-modifying CTEs) on a psycopg 3 connection in autocommit, so
  one network round trip and one commit per apply; psycopg prepares it server-side after a few
  executions, as it does idempay's statements.
- SQLite: raw ``sqlite3``, the same PRAGMAs as idempay's engine (WAL, busy timeout), the five
  statements in one ``BEGIN IMMEDIATE`` transaction.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

from _workloads import EVENT_PAYLOAD

__all__ = ["postgres_floor", "sqlite_floor"]

GENESIS: Final = "0" * 64
DETAILS: Final = '[["reason","observed"]]'
EFFECT_PAYLOAD: Final = '{"attempt":1}'

_ORDER_COLUMNS: Final = (
    "tenant, order_id, status, amount, currency, payment_intent_id, amount_refunded, dispute, "
    "review_reason, observed_at, failures, version, created_at, updated_at"
)


def _now_us() -> int:
    return time.time_ns() // 1000


def _chain(prev_hash: str, event_id: str, seq: int) -> str:
    return hashlib.sha256(f"{prev_hash}\n{seq}:{event_id}:{DETAILS}".encode()).hexdigest()


# --- PostgreSQL ------------------------------------------------------------------------------

_PG_APPLY: Final = """
WITH ev AS (
    INSERT INTO idempay_inbox (account, event_id, type, created, payload, status, object_id,
                               payment_intent_id, order_id, attempts, received_at,
                               processed_at, error)
    VALUES ('', %(event_id)s, 'payment_intent.processing', %(created)s, %(payload)s,
            'processed', 'pi_3Bench', NULL, %(order_id)s, 0, %(now)s, %(now)s, NULL)
    ON CONFLICT (account, event_id) DO NOTHING
    RETURNING event_id
), upd AS (
    UPDATE idempay_orders
       SET observed_at = observed_at + 1, version = version + 1, updated_at = %(now)s
     WHERE tenant = %(tenant)s AND order_id = %(order_id)s AND version = %(version)s
       AND EXISTS (SELECT 1 FROM ev)
    RETURNING version, status
), last AS (
    SELECT seq, hash FROM idempay_audit
     WHERE tenant = %(tenant)s AND order_id = %(order_id)s
     ORDER BY seq DESC LIMIT 1
), prev AS (
    SELECT COALESCE((SELECT seq FROM last), 0) + 1 AS seq,
           COALESCE((SELECT hash FROM last), %(genesis)s) AS hash
), aud AS (
    INSERT INTO idempay_audit (tenant, order_id, seq, step, source, at, from_status,
                               to_status, event_id, key_digest, details, prev_hash, hash)
    SELECT %(tenant)s, %(order_id)s, prev.seq, 'processing', 'webhook', %(now)s, 'processing',
           upd.status, %(event_id)s, NULL, %(details)s, prev.hash,
           encode(sha256(convert_to(prev.hash || E'\\n' || prev.seq || ':' || %(event_id)s
                                    || ':' || %(details)s, 'UTF8')), 'hex')
      FROM upd, prev
    RETURNING seq
)
INSERT INTO idempay_outbox (tenant, order_id, effect, discriminator, payload, status, attempts,
                            created_at, next_attempt_at, last_error, lease_token, lease_fence,
                            lease_expires_at)
SELECT %(tenant)s, %(order_id)s, 'processing', %(event_id)s, %(effect)s, 'pending', 0,
       %(now)s, %(now)s, NULL, NULL, 0, NULL
  FROM upd, aud
ON CONFLICT DO NOTHING
RETURNING (SELECT version FROM upd)
"""

_PG_ORDER: Final = (
    f"INSERT INTO idempay_orders ({_ORDER_COLUMNS}) "  # noqa: S608 - constant column list
    "VALUES (%s, %s, 'processing', 1999, 'eur', NULL, 0, 'none', NULL, 0, 0, 1, %s, %s)"
)


def postgres_floor(url: str, *, tenant: str, stack: ExitStack) -> Callable[[int], Any]:
    """Worker factory for the one-statement PostgreSQL apply (``url``: a SQLAlchemy URL)."""
    import psycopg
    import sqlalchemy as sa

    conninfo = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connections: dict[int, Any] = {}

    def connection(w: int) -> Any:
        if w not in connections:
            conn = psycopg.connect(conninfo, autocommit=True)
            stack.callback(conn.close)
            connections[w] = conn
        return connections[w]

    def factory(w: int) -> Callable[[int], object]:
        conn = connection(w)
        tag = secrets.token_hex(4)
        order_id = f"ord-{tag}-{w}"
        now = _now_us()
        conn.execute(_PG_ORDER, (tenant, order_id, now, now))
        version = 1

        def op(i: int) -> None:
            nonlocal version
            row = conn.execute(
                _PG_APPLY,
                {
                    "event_id": f"evt_{tag}_{w}_{i}",
                    "created": 1_767_225_600 + i,
                    "payload": EVENT_PAYLOAD,
                    "order_id": order_id,
                    "tenant": tenant,
                    "version": version,
                    "now": _now_us(),
                    "genesis": GENESIS,
                    "details": DETAILS,
                    "effect": EFFECT_PAYLOAD,
                },
            ).fetchone()
            if row is None:
                raise AssertionError("the floor's compare-and-set found nothing to update")
            version = row[0]

        return op

    return factory


# --- SQLite ----------------------------------------------------------------------------------

_SQLITE_INBOX: Final = """
INSERT INTO idempay_inbox (account, event_id, type, created, payload, status, object_id,
                           payment_intent_id, order_id, attempts, received_at, processed_at,
                           error)
VALUES ('', ?, 'payment_intent.processing', ?, ?, 'processed', 'pi_3Bench', NULL, ?, 0, ?, ?,
        NULL)
ON CONFLICT (account, event_id) DO NOTHING
"""
_SQLITE_UPDATE: Final = """
UPDATE idempay_orders SET observed_at = observed_at + 1, version = version + 1, updated_at = ?
 WHERE tenant = ? AND order_id = ? AND version = ?
"""
_SQLITE_LAST: Final = """
SELECT seq, hash FROM idempay_audit WHERE tenant = ? AND order_id = ? ORDER BY seq DESC LIMIT 1
"""
_SQLITE_AUDIT: Final = """
INSERT INTO idempay_audit (tenant, order_id, seq, step, source, at, from_status, to_status,
                           event_id, key_digest, details, prev_hash, hash)
VALUES (?, ?, ?, 'processing', 'webhook', ?, 'processing', 'processing', ?, NULL, ?, ?, ?)
"""
_SQLITE_OUTBOX: Final = """
INSERT INTO idempay_outbox (tenant, order_id, effect, discriminator, payload, status, attempts,
                            created_at, next_attempt_at, last_error, lease_token, lease_fence,
                            lease_expires_at)
VALUES (?, ?, 'processing', ?, ?, 'pending', 0, ?, ?, NULL, NULL, 0, NULL)
ON CONFLICT DO NOTHING
"""
_SQLITE_ORDER: Final = (
    f"INSERT INTO idempay_orders ({_ORDER_COLUMNS}) "  # noqa: S608 - constant column list
    "VALUES (?, ?, 'processing', 1999, 'eur', NULL, 0, 'none', NULL, 0, 0, 1, ?, ?)"
)


def sqlite_floor(path: Path, *, tenant: str, stack: ExitStack) -> Callable[[int], Any]:
    """Worker factory for the raw sqlite3 apply on the database file ``path``."""
    connections: dict[int, sqlite3.Connection] = {}

    def connection(w: int) -> sqlite3.Connection:
        if w not in connections:
            # Autocommit at the driver level: the transaction is the explicit BEGIN IMMEDIATE.
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            stack.callback(conn.close)
            connections[w] = conn
        return connections[w]

    def factory(w: int) -> Callable[[int], object]:
        conn = connection(w)
        tag = secrets.token_hex(4)
        order_id = f"ord-{tag}-{w}"
        now = _now_us()
        conn.execute(_SQLITE_ORDER, (tenant, order_id, now, now))
        version = 1

        def op(i: int) -> None:
            nonlocal version
            event_id = f"evt_{tag}_{w}_{i}"
            now = _now_us()
            conn.execute("BEGIN IMMEDIATE")
            try:
                cur = conn.execute(
                    _SQLITE_INBOX, (event_id, 1_767_225_600 + i, EVENT_PAYLOAD, order_id, now, now)
                )
                if cur.rowcount != 1:
                    raise AssertionError("a new event was taken for a duplicate")
                cur = conn.execute(_SQLITE_UPDATE, (now, tenant, order_id, version))
                if cur.rowcount != 1:
                    raise AssertionError("the floor's compare-and-set found nothing to update")
                last = conn.execute(_SQLITE_LAST, (tenant, order_id)).fetchone()
                seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
                conn.execute(
                    _SQLITE_AUDIT,
                    (
                        tenant,
                        order_id,
                        seq,
                        now,
                        event_id,
                        DETAILS,
                        prev,
                        _chain(prev, event_id, seq),
                    ),
                )
                conn.execute(_SQLITE_OUTBOX, (tenant, order_id, event_id, EFFECT_PAYLOAD, now, now))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            version += 1

        return op

    return factory
