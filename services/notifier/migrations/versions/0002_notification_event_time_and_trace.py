"""Notifications keep the time of the fact that called for them (email lag metric) and
the traceparent of the span that recorded them (tracing); both NULL in older rows.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("notifications", sa.Column("event_time", sa.Float(), nullable=True))
    op.add_column("notifications", sa.Column("trace_parent", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("notifications") as batch:
        batch.drop_column("trace_parent")
        batch.drop_column("event_time")
