"""The SQL schema: six tables prefixed ``idempay_``, in SQLAlchemy Core.

Every time is a BIGINT of microseconds since the Unix epoch, UTC: one representation on every
dialect, with no time-zone conversion anywhere between the database and the stores.

Keys, ids and status names are ASCII (the core refuses anything else before it reaches a
store). On MySQL/MariaDB they are ``VARCHAR CHARACTER SET ascii COLLATE ascii_bin``: compared
byte for byte (``'Key'`` and ``'key'`` stay apart, trailing spaces count), and one byte per
character so that composite keys fit InnoDB's 3072-byte index limit. PostgreSQL and SQLite
compare plain VARCHARs byte for byte already. Free text (errors, details) is utf8mb4 on MySQL.

This module is the current shape of the schema; the shipped Alembic migrations
(``migrations/versions``) build exactly this, which a test checks on every dialect.
"""

from __future__ import annotations

from typing import Final

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

from idempay.core.models import InboxStatus, OutboxStatus
from idempay.core.orders import DisputeStatus, OrderStatus
from idempay.core.records import RecordState

__all__ = [
    "DUE_EFFECTS_INDEX",
    "audit",
    "create_all",
    "inbox",
    "journal",
    "metadata",
    "orders",
    "outbox",
    "records",
]

_MYSQL: Final = ("mysql", "mariadb")

metadata: Final = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)
"""Every idempay table, for ``create_all`` or your own Alembic environment's comparisons."""


def _ascii(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), *_MYSQL
    )


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(
        mysql.MEDIUMTEXT(charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
    )


def _blob() -> sa.types.TypeEngine[bytes]:
    # MySQL's BLOB stops at 64 KiB; a webhook payload or a stored response may be larger.
    return sa.LargeBinary().with_variant(mysql.LONGBLOB(), *_MYSQL)


def _one_of(
    column: str,
    values: type[RecordState | InboxStatus | OutboxStatus | OrderStatus | DisputeStatus],
) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{member.value}'" for member in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=column)


_TIME = sa.BigInteger
DUE_EFFECTS_INDEX: Final = "ix_idempay_outbox_status_next_attempt_at_created_at"

records: Final = sa.Table(
    "idempay_idempotency_records",
    metadata,
    sa.Column("scope", _ascii(800), nullable=False),
    sa.Column("key", _ascii(255), nullable=False),
    sa.Column("fingerprint", _ascii(255), nullable=False),
    sa.Column("state", _ascii(16), nullable=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("lease_token", _ascii(64)),
    sa.Column("lease_expires_at", _TIME),
    sa.Column("recovery_point", _text()),
    sa.Column("resource_id", _text()),
    sa.Column("response_status", sa.Integer),
    sa.Column("response_body", _blob()),
    sa.Column("response_content_type", _text()),
    sa.Column("response_headers", _text()),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("expires_at", _TIME, nullable=False),
    sa.PrimaryKeyConstraint("scope", "key"),
    sa.Index(None, "expires_at"),
    _one_of("state", RecordState),
    mysql_engine="InnoDB",
)
"""Idempotency records by (scope, key); ``lease_token`` and ``fence`` fence the owner's writes."""

orders: Final = sa.Table(
    "idempay_orders",
    metadata,
    sa.Column("tenant", _ascii(255), nullable=False),
    sa.Column("order_id", _ascii(255), nullable=False),
    sa.Column("status", _ascii(32), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", _ascii(3), nullable=False),
    sa.Column("payment_intent_id", _ascii(255)),
    sa.Column("amount_refunded", sa.BigInteger, nullable=False),
    sa.Column("dispute", _ascii(16), nullable=False),
    sa.Column("review_reason", _ascii(32)),
    sa.Column("observed_at", sa.BigInteger, nullable=False),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("updated_at", _TIME, nullable=False),
    # The reconciler's next check (None: never checked); see ``MaintenanceStore``.
    sa.Column("check_at", _TIME),
    sa.PrimaryKeyConstraint("tenant", "order_id"),
    sa.UniqueConstraint("payment_intent_id"),
    sa.Index(None, "status", "updated_at"),
    _one_of("status", OrderStatus),
    _one_of("dispute", DisputeStatus),
    mysql_engine="InnoDB",
)
"""Orders: the state machine's state, ``version`` for compare-and-set updates, and when the
reconciler checks the order next."""

inbox: Final = sa.Table(
    "idempay_inbox",
    metadata,
    sa.Column("account", _ascii(255), nullable=False),
    sa.Column("event_id", _ascii(255), nullable=False),
    sa.Column("type", _ascii(255), nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("payload", _blob(), nullable=False),
    sa.Column("status", _ascii(16), nullable=False),
    sa.Column("object_id", _ascii(255)),
    sa.Column("payment_intent_id", _ascii(255)),
    sa.Column("order_id", _ascii(255)),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("received_at", _TIME, nullable=False),
    sa.Column("processed_at", _TIME),
    sa.Column("error", _text()),
    sa.Column("check_at", _TIME),
    sa.PrimaryKeyConstraint("account", "event_id"),
    sa.Index(None, "payment_intent_id"),
    sa.Index(None, "order_id"),
    sa.Index(None, "status", "received_at"),
    _one_of("status", InboxStatus),
    mysql_engine="InnoDB",
)
"""Webhook events by (account, event_id), with the raw payload exactly as signed, and when the
reconciler checks the event next."""

audit: Final = sa.Table(
    "idempay_audit",
    metadata,
    sa.Column("tenant", _ascii(255), nullable=False),
    sa.Column("order_id", _ascii(255), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("step", _ascii(32), nullable=False),
    sa.Column("source", _ascii(16), nullable=False),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("from_status", _ascii(64)),
    sa.Column("to_status", _ascii(64)),
    sa.Column("event_id", _ascii(255)),
    sa.Column("key_digest", _ascii(64)),
    sa.Column("details", _text(), nullable=False),
    sa.Column("prev_hash", _ascii(64), nullable=False),
    sa.Column("hash", _ascii(64), nullable=False),
    sa.PrimaryKeyConstraint("tenant", "order_id", "seq"),
    mysql_engine="InnoDB",
)
"""Each order's hash-chained trail; the primary key makes two appends of one ``seq`` collide."""

outbox: Final = sa.Table(
    "idempay_outbox",
    metadata,
    sa.Column("tenant", _ascii(255), nullable=False),
    sa.Column("order_id", _ascii(255), nullable=False),
    sa.Column("effect", _ascii(255), nullable=False),
    sa.Column("discriminator", _ascii(255), nullable=False),
    sa.Column("payload", _text(), nullable=False),
    sa.Column("status", _ascii(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("created_at", _TIME, nullable=False),
    sa.Column("next_attempt_at", _TIME, nullable=False),
    sa.Column("last_error", _text()),
    sa.Column("lease_token", _ascii(64)),
    sa.Column("lease_fence", sa.BigInteger, nullable=False),
    sa.Column("lease_expires_at", _TIME),
    sa.PrimaryKeyConstraint("tenant", "order_id", "effect", "discriminator"),
    # Serves the dispatcher's query in its own order, so that MySQL's FOR UPDATE SKIP LOCKED
    # stops after LIMIT rows instead of locking every due row before a sort.
    sa.Index(DUE_EFFECTS_INDEX, "status", "next_attempt_at", "created_at"),
    _one_of("status", OutboxStatus),
    mysql_engine="InnoDB",
)
"""Effects to run after commit, unique per (order, effect, discriminator); leased to one
dispatcher at a time, ``lease_fence`` growing at every lease."""


journal: Final = sa.Table(
    "idempay_journal",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("tenant", _ascii(255), nullable=False),
    sa.Column("order_id", _ascii(255)),
    sa.Column("step", _ascii(32), nullable=False),
    sa.Column("source", _ascii(16), nullable=False),
    sa.Column("at", _TIME, nullable=False),
    sa.Column("event_id", _ascii(255)),
    sa.Column("key_digest", _ascii(64)),
    sa.Column("reason", _text()),
    sa.Index("ix_idempay_journal_tenant_order_id_id", "tenant", "order_id", "id"),
    sa.Index("ix_idempay_journal_at", "at"),
    mysql_engine="InnoDB",
)
"""Decisions that changed nothing (duplicates, replays, refusals), appended in batches."""


def create_all(bind: sa.Engine | sa.Connection) -> None:
    """Create the idempay tables that do not exist yet (a quick start; use :func:`upgrade` with
    its versioned migrations in production).

    With an async engine: ``async with engine.begin() as conn:
    await conn.run_sync(metadata.create_all)``.
    """
    metadata.create_all(bind)
