"""SQL stores on SQLAlchemy 2 Core: SQLite, PostgreSQL and MySQL/MariaDB, sync and async.

:class:`SQLIdempotencyStore` keeps idempotency records; :class:`SQLPaymentStore` keeps orders,
the webhook inbox, the audit trail and the outbox, and can run inside the application's own
transaction. Their ``Async`` twins take an async engine. Each takes an engine of your own, or
builds one with ``from_url``::

    from idempay.backends.sql import SQLPaymentStore, upgrade

    upgrade("postgresql+psycopg://app@db/shop")          # versioned migrations, shipped
    payments = SQLPaymentStore.from_url("postgresql+psycopg://app@db/shop")

URLs: ``sqlite:///path`` (async ``sqlite+aiosqlite``), ``postgresql+psycopg://`` (sync and
async), ``mysql+pymysql://`` (async ``mysql+aiomysql``); :func:`sync_url` and :func:`async_url`
map one form to the other. Engines built from a URL run READ COMMITTED on PostgreSQL and MySQL,
without ``pool_pre_ping`` (pass ``pool_pre_ping=True`` to ``from_url`` to turn it on). SQLite
engines, yours included, are set to WAL with a busy timeout and ``BEGIN IMMEDIATE`` for every
transaction (SQLAlchemy's documented recipe), so that several processes can write one file;
pass a SQLite engine before it has opened connections.

Every time is stored as microseconds since the epoch, UTC; leases and expiry use the database
server's clock (on SQLite, this machine's), or the ``clock`` given to a store.
"""

from __future__ import annotations

from idempay.backends.sql._advisory import (
    AsyncPostgresAdvisoryLockProvider,
    PostgresAdvisoryLockProvider,
)
from idempay.backends.sql._async import (
    AsyncSQLIdempotencyStore,
    AsyncSQLPaymentStore,
)
from idempay.backends.sql._common import async_url, sync_url
from idempay.backends.sql._migrate import upgrade
from idempay.backends.sql._schema import create_all, metadata
from idempay.backends.sql._sync import (
    SQLIdempotencyStore,
    SQLPaymentStore,
)

__all__ = [
    "AsyncPostgresAdvisoryLockProvider",
    "AsyncSQLIdempotencyStore",
    "AsyncSQLPaymentStore",
    "PostgresAdvisoryLockProvider",
    "SQLIdempotencyStore",
    "SQLPaymentStore",
    "async_url",
    "create_all",
    "metadata",
    "sync_url",
    "upgrade",
]
