"""The original brief's webhook handler, written by hand: the baseline of the webhook storm.

The brief (a Laravel sketch) handles ``payment_intent.succeeded`` like this::

    Cache::lock('stripe_webhook_'.$intentId, 5)->get(function () {
        $order = Order::where('stripe_payment_intent_id', $intentId)->firstOrFail();
        if ($order->status === 'paid') { Log::info("Duplicate webhook ..."); return 200; }
        DB::transaction(fn () => $order->update(['status' => 'paid']));
        return 200;
    });

Written here as fast as that design allows, with the work any real handler must do too (check
the ``Stripe-Signature`` with the standard library's hmac, parse the JSON body):

- PostgreSQL + Redis: the lock is ``SET key token NX PX 5000`` and its release a
  compare-and-delete script (EVALSHA), as Laravel's Redis lock does; the order is read on a
  raw psycopg 3 connection in autocommit (one round trip), and the transaction's BEGIN, UPDATE
  and COMMIT are pipelined (one round trip: the least a transaction of one statement costs).
  One connection per worker thread, as PHP has one per worker process; one redis-py client.
- SQLite (the embedded configuration): raw ``sqlite3`` with idempay's PRAGMAs (WAL, busy
  timeout), ``BEGIN IMMEDIATE`` for the transaction, and an in-process lock per PaymentIntent
  (a mutex-guarded set of held names: ``get()`` fails at once when taken, like Laravel's).

Orders live in ``brief_orders(id, stripe_payment_intent_id unique, status)``, in the
benchmark's own database. It writes nothing but the order's status: no inbox, no audit, no
outbox, and the duplicate check is the order's status alone.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

__all__ = [
    "BriefPostgres",
    "BriefSQLite",
    "verify_stripe_signature",
]

logger = logging.getLogger("brief.webhook")

TOLERANCE: Final = 300
LOCK_MS: Final = 5000
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""
_SELECT: Final = "SELECT id, status FROM brief_orders WHERE stripe_payment_intent_id = %s"
_UPDATE: Final = "UPDATE brief_orders SET status = 'paid' WHERE id = %s"
_COUNT_PAID: Final = (
    "SELECT count(*) FROM brief_orders WHERE status = 'paid' "
    "AND substr(stripe_payment_intent_id, 1, length(?)) = ?"
)


class Refused(Exception):  # noqa: N818 - reads as "the webhook was refused"
    """The handler answered 4xx: bad signature, unknown order, or the lock was taken."""


def verify_stripe_signature(body: bytes, header: str, secret: str, *, now: float) -> None:
    """Stripe's scheme: HMAC-SHA256 of ``<t>.<body>``, any ``v1`` matching, within 300 s."""
    timestamp, signatures = None, []
    for item in header.split(","):
        key, _, value = item.partition("=")
        if key == "t":
            timestamp = value
        elif key == "v1":
            signatures.append(value)
    if timestamp is None or not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE:
        raise Refused("bad signature timestamp")
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise Refused("bad signature")


def _read_event(body: bytes, header: str, secret: str) -> tuple[str, str]:
    verify_stripe_signature(body, header, secret, now=time.time())
    payload = json.loads(body)
    return payload["type"], payload["data"]["object"]["id"]


class BriefPostgres:
    """The brief's handler on PostgreSQL (psycopg 3) and Redis (redis-py)."""

    def __init__(
        self, conninfo: str, redis_url: str, *, prefix: str, secret: str, stack: ExitStack
    ) -> None:
        import psycopg
        import redis

        self._psycopg = psycopg
        self._conninfo = conninfo
        self._secret = secret
        self._prefix = prefix
        self._stack = stack
        self._conns: dict[int, Any] = {}
        self._redis = redis.Redis.from_url(
            redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        stack.callback(self._redis.close)
        self._release = self._redis.register_script(_RELEASE)
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS brief_orders (id bigserial PRIMARY KEY, "
                "stripe_payment_intent_id text UNIQUE, status text NOT NULL DEFAULT 'pending')"
            )

    def _conn(self, worker: int) -> Any:
        """The worker's connection, opened at its first webhook (a PHP worker's keeps open)."""
        conn = self._conns.get(worker)
        if conn is None:
            conn = self._psycopg.connect(self._conninfo, autocommit=True)
            self._stack.callback(conn.close)
            self._conns[worker] = conn
        return conn

    def create_orders(self, intents: Sequence[str]) -> None:
        with self._psycopg.connect(self._conninfo) as conn, conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO brief_orders (stripe_payment_intent_id) VALUES (%s)",
                [(i,) for i in intents],
            )

    def paid(self, intent_prefix: str) -> int:
        """How many orders whose PaymentIntent id starts with ``intent_prefix`` are paid."""
        with self._psycopg.connect(self._conninfo, autocommit=True) as conn:
            row = conn.execute(_COUNT_PAID.replace("?", "%s"), (intent_prefix,) * 2).fetchone()
        return int(row[0]) if row else 0

    def handle(self, body: bytes, header: str, worker: int = 0) -> str:
        """Handle one webhook on ``worker``'s connection; return the outcome (4xx: Refused)."""
        event_type, intent = _read_event(body, header, self._secret)
        key, token = f"{self._prefix}stripe_webhook_{intent}", secrets.token_hex(8)
        if not self._redis.set(key, token, nx=True, px=LOCK_MS):
            raise Refused("locked")
        try:
            conn = self._conn(worker)
            row = conn.execute(_SELECT, (intent,)).fetchone()
            if row is None:
                raise Refused("no such order")
            if row[1] == "paid":
                logger.info("Duplicate webhook for Order %s", row[0])
                return "duplicate"
            if event_type == "payment_intent.succeeded":
                self._pay(conn, row[0])
            return "applied"
        finally:
            self._release(keys=[key], args=[token])

    @staticmethod
    def _pay(conn: Any, order: int) -> None:
        """The transaction, BEGIN, UPDATE and COMMIT sent together: one round trip.

        (psycopg's ``transaction()`` block waits for the BEGIN and again for the COMMIT, even
        in a pipeline: three or four round trips.)
        """
        try:
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(_UPDATE, (order,))
                conn.execute("COMMIT")
        except BaseException:
            conn.rollback()  # the server skipped the rest of the batch: end the transaction
            raise


class _NameLocks:
    """In-process locks by name; taking a held one fails at once (Laravel's ``get()``)."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: set[str] = set()

    def acquire(self, name: str) -> bool:
        with self._mutex:
            if name in self._held:
                return False
            self._held.add(name)
            return True

    def release(self, name: str) -> None:
        with self._mutex:
            self._held.discard(name)


class BriefSQLite:
    """The brief's handler on one SQLite file, with an in-process lock."""

    def __init__(self, path: Path, *, secret: str, busy_timeout_ms: int, stack: ExitStack) -> None:
        self._path = path
        self._secret = secret
        self._busy = busy_timeout_ms
        self._stack = stack
        self._conns: dict[int, sqlite3.Connection] = {}
        self._locks = _NameLocks()
        conn = self._connect()
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS brief_orders (id INTEGER PRIMARY KEY, "
                "stripe_payment_intent_id TEXT UNIQUE, status TEXT NOT NULL DEFAULT 'pending')"
            )
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        # Autocommit at the driver (transactions are explicit), idempay's PRAGMAs.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    def _conn(self, worker: int) -> sqlite3.Connection:
        conn = self._conns.get(worker)
        if conn is None:
            conn = self._connect()
            self._stack.callback(conn.close)
            self._conns[worker] = conn
        return conn

    def create_orders(self, intents: Sequence[str]) -> None:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO brief_orders (stripe_payment_intent_id) VALUES (?)",
                [(i,) for i in intents],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()

    def paid(self, intent_prefix: str) -> int:
        """How many orders whose PaymentIntent id starts with ``intent_prefix`` are paid."""
        conn = self._connect()
        try:
            row = conn.execute(_COUNT_PAID, (intent_prefix,) * 2).fetchone()
            return int(row[0])
        finally:
            conn.close()

    def handle(self, body: bytes, header: str, worker: int = 0) -> str:
        """Handle one webhook on ``worker``'s connection; return the outcome (4xx: Refused)."""
        event_type, intent = _read_event(body, header, self._secret)
        name = f"stripe_webhook_{intent}"
        if not self._locks.acquire(name):
            raise Refused("locked")
        try:
            conn = self._conn(worker)
            row = conn.execute(
                "SELECT id, status FROM brief_orders WHERE stripe_payment_intent_id = ?",
                (intent,),
            ).fetchone()
            if row is None:
                raise Refused("no such order")
            if row[1] == "paid":
                logger.info("Duplicate webhook for Order %s", row[0])
                return "duplicate"
            if event_type == "payment_intent.succeeded":
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute("UPDATE brief_orders SET status = 'paid' WHERE id = ?", (row[0],))
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            return "applied"
        finally:
            self._locks.release(name)
