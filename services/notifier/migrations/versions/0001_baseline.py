"""Baseline: the notifier schema as the version before migrations created it.

A database made by that version (tables, no version row) is compared with `metadata`
and stamped with this revision (libs.migrations); a new one is created from it. Frozen:
later changes are later migrations, never edits here.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    literal_column,
)

from libs.migrations import add_runtime_tables_as_of_baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = MetaData()

notifications = Table(
    "notifications",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("registration_id", String(256), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("locale", String(16), nullable=False),
    Column("name", Text, nullable=False),
    Column("course_id", String(128), nullable=False),
    Column("course_name", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("send_time", DateTime(timezone=True), nullable=True),
    Column("next_attempt_at", Float, nullable=True),
    UniqueConstraint("registration_id", "kind", name="uq_notifications_registration_kind"),
)
_pending = notifications.c.status == literal_column("'PENDING'")
_failed = notifications.c.status == literal_column("'FAILED'")
Index("ix_notifications_due", notifications.c.next_attempt_at, postgresql_where=_pending, sqlite_where=_pending)
Index("ix_notifications_failed", notifications.c.id, postgresql_where=_failed, sqlite_where=_failed)
add_runtime_tables_as_of_baseline(metadata, consumes=True)


def upgrade() -> None:
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
