"""Add the reconciler's next check to orders and inbox events.

Revision ID: 0003
Revises: 0002

Frozen: the types and names are spelled out here, not imported.

Both columns are nullable (None: never checked), so adding them rewrites no row. No index: the
claims filter on the ``(status, updated_at)`` and ``(status, received_at)`` indexes that exist
already, and sort the few rows in the statuses being reconciled.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("idempay_orders", sa.Column("check_at", sa.BigInteger))
    op.add_column("idempay_inbox", sa.Column("check_at", sa.BigInteger))


def downgrade() -> None:
    op.drop_column("idempay_inbox", "check_at")
    op.drop_column("idempay_orders", "check_at")
