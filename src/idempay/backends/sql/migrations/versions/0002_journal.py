"""Add the journal of decisions that changed nothing (duplicates, replays, refusals).

Revision ID: 0002
Revises: 0001

Frozen: the types and names are spelled out here, not imported.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_MYSQL = ("mysql", "mariadb")


def _ascii(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, charset="ascii", collation="ascii_bin"), *_MYSQL
    )


def upgrade() -> None:
    op.create_table(
        "idempay_journal",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("tenant", _ascii(255), nullable=False),
        sa.Column("order_id", _ascii(255)),
        sa.Column("step", _ascii(32), nullable=False),
        sa.Column("source", _ascii(16), nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("event_id", _ascii(255)),
        sa.Column("key_digest", _ascii(64)),
        sa.Column(
            "reason",
            sa.Text().with_variant(
                mysql.MEDIUMTEXT(charset="utf8mb4", collation="utf8mb4_bin"), *_MYSQL
            ),
        ),
        sa.PrimaryKeyConstraint("id", name="pk_idempay_journal"),
        mysql_engine="InnoDB",
    )
    op.create_index(
        "ix_idempay_journal_tenant_order_id_id", "idempay_journal", ["tenant", "order_id", "id"]
    )
    op.create_index("ix_idempay_journal_at", "idempay_journal", ["at"])


def downgrade() -> None:
    op.drop_table("idempay_journal")
