"""Create idempay's tables: idempotency records, orders, inbox, audit trail and outbox.

Revision ID: 0001
Revises: (none)

Frozen: the types and names are spelled out here, not imported, so later changes to the
package's schema never rewrite this step (they get a migration of their own).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_MYSQL = ("mysql", "mariadb")


def _ascii(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), *_MYSQL
    )


def _text() -> sa.types.TypeEngine[str]:
    return sa.Text().with_variant(
        mysql.MEDIUMTEXT(charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
    )


def _blob() -> sa.types.TypeEngine[bytes]:
    return sa.LargeBinary().with_variant(mysql.LONGBLOB(), *_MYSQL)


def _check(table: str, column: str, values: tuple[str, ...]) -> sa.CheckConstraint:
    allowed = ", ".join(f"'{value}'" for value in values)
    return sa.CheckConstraint(f"{column} IN ({allowed})", name=f"ck_{table}_{column}")


_RECORD_STATES = ("in_progress", "completed", "failed", "unknown")
_ORDER_STATUSES = (
    "created",
    "awaiting_payment",
    "action_required",
    "processing",
    "authorized",
    "paid",
    "payment_failed",
    "canceled",
    "partially_refunded",
    "refunded",
    "needs_review",
)
_DISPUTES = ("none", "open", "won", "lost")
_INBOX_STATUSES = ("received", "processed", "ignored", "orphan", "failed")
_OUTBOX_STATUSES = ("pending", "done", "dead")


def upgrade() -> None:
    op.create_table(
        "idempay_idempotency_records",
        sa.Column("scope", _ascii(800), nullable=False),
        sa.Column("key", _ascii(255), nullable=False),
        sa.Column("fingerprint", _ascii(255), nullable=False),
        sa.Column("state", _ascii(16), nullable=False),
        sa.Column("fence", sa.BigInteger(), nullable=False),
        sa.Column("lease_token", _ascii(64)),
        sa.Column("lease_expires_at", sa.BigInteger()),
        sa.Column("recovery_point", _text()),
        sa.Column("resource_id", _text()),
        sa.Column("response_status", sa.Integer()),
        sa.Column("response_body", _blob()),
        sa.Column("response_content_type", _text()),
        sa.Column("response_headers", _text()),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name="pk_idempay_idempotency_records"),
        _check("idempay_idempotency_records", "state", _RECORD_STATES),
        mysql_engine="InnoDB",
    )
    op.create_index(
        "ix_idempay_idempotency_records_expires_at",
        "idempay_idempotency_records",
        ["expires_at"],
    )

    op.create_table(
        "idempay_orders",
        sa.Column("tenant", _ascii(255), nullable=False),
        sa.Column("order_id", _ascii(255), nullable=False),
        sa.Column("status", _ascii(32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", _ascii(3), nullable=False),
        sa.Column("payment_intent_id", _ascii(255)),
        sa.Column("amount_refunded", sa.BigInteger(), nullable=False),
        sa.Column("dispute", _ascii(16), nullable=False),
        sa.Column("review_reason", _ascii(32)),
        sa.Column("observed_at", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "order_id", name="pk_idempay_orders"),
        sa.UniqueConstraint("payment_intent_id", name="uq_idempay_orders_payment_intent_id"),
        _check("idempay_orders", "status", _ORDER_STATUSES),
        _check("idempay_orders", "dispute", _DISPUTES),
        mysql_engine="InnoDB",
    )
    op.create_index(
        "ix_idempay_orders_status_updated_at", "idempay_orders", ["status", "updated_at"]
    )

    op.create_table(
        "idempay_inbox",
        sa.Column("account", _ascii(255), nullable=False),
        sa.Column("event_id", _ascii(255), nullable=False),
        sa.Column("type", _ascii(255), nullable=False),
        sa.Column("created", sa.BigInteger(), nullable=False),
        sa.Column("payload", _blob(), nullable=False),
        sa.Column("status", _ascii(16), nullable=False),
        sa.Column("object_id", _ascii(255)),
        sa.Column("payment_intent_id", _ascii(255)),
        sa.Column("order_id", _ascii(255)),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.Column("processed_at", sa.BigInteger()),
        sa.Column("error", _text()),
        sa.PrimaryKeyConstraint("account", "event_id", name="pk_idempay_inbox"),
        _check("idempay_inbox", "status", _INBOX_STATUSES),
        mysql_engine="InnoDB",
    )
    op.create_index("ix_idempay_inbox_payment_intent_id", "idempay_inbox", ["payment_intent_id"])
    op.create_index("ix_idempay_inbox_order_id", "idempay_inbox", ["order_id"])
    op.create_index(
        "ix_idempay_inbox_status_received_at", "idempay_inbox", ["status", "received_at"]
    )

    op.create_table(
        "idempay_audit",
        sa.Column("tenant", _ascii(255), nullable=False),
        sa.Column("order_id", _ascii(255), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("step", _ascii(32), nullable=False),
        sa.Column("source", _ascii(16), nullable=False),
        sa.Column("at", sa.BigInteger(), nullable=False),
        sa.Column("from_status", _ascii(64)),
        sa.Column("to_status", _ascii(64)),
        sa.Column("event_id", _ascii(255)),
        sa.Column("key_digest", _ascii(64)),
        sa.Column("details", _text(), nullable=False),
        sa.Column("prev_hash", _ascii(64), nullable=False),
        sa.Column("hash", _ascii(64), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "order_id", "seq", name="pk_idempay_audit"),
        mysql_engine="InnoDB",
    )

    op.create_table(
        "idempay_outbox",
        sa.Column("tenant", _ascii(255), nullable=False),
        sa.Column("order_id", _ascii(255), nullable=False),
        sa.Column("effect", _ascii(255), nullable=False),
        sa.Column("discriminator", _ascii(255), nullable=False),
        sa.Column("payload", _text(), nullable=False),
        sa.Column("status", _ascii(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("next_attempt_at", sa.BigInteger(), nullable=False),
        sa.Column("last_error", _text()),
        sa.Column("lease_token", _ascii(64)),
        sa.Column("lease_fence", sa.BigInteger(), nullable=False),
        sa.Column("lease_expires_at", sa.BigInteger()),
        sa.PrimaryKeyConstraint(
            "tenant", "order_id", "effect", "discriminator", name="pk_idempay_outbox"
        ),
        _check("idempay_outbox", "status", _OUTBOX_STATUSES),
        mysql_engine="InnoDB",
    )
    op.create_index(
        "ix_idempay_outbox_status_next_attempt_at_created_at",
        "idempay_outbox",
        ["status", "next_attempt_at", "created_at"],
    )


def downgrade() -> None:
    op.drop_table("idempay_outbox")
    op.drop_table("idempay_audit")
    op.drop_table("idempay_inbox")
    op.drop_table("idempay_orders")
    op.drop_table("idempay_idempotency_records")
