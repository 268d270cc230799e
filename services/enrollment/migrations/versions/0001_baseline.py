"""Baseline: the enrollment schema as the version before migrations created it.

A database made by that version (tables, no version row) is compared with `metadata`
and stamped with this revision (libs.migrations); a new one is created from it. Frozen:
later changes are later migrations, never edits here.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import CheckConstraint, Column, Date, DateTime, ForeignKey, Integer, MetaData, String, Table

from libs.migrations import add_runtime_tables_as_of_baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = MetaData()

Table(
    "campuses",
    metadata,
    Column("campus_id", String(63), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)
Table(
    "courses",
    metadata,
    Column("course_id", String(63), primary_key=True),
    Column("campus_id", String(63), ForeignKey("campuses.campus_id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("enrolled_count", Integer, nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    CheckConstraint("enrolled_count >= 0 AND enrolled_count <= capacity", name="seats_within_capacity"),
)
Table(
    "decisions",
    metadata,
    Column("registration_id", String(64), primary_key=True),
    Column("course_id", String(63), nullable=False, index=True),
    Column("email", String(320), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("decide_time", DateTime(timezone=True), nullable=False),
    Column("shard_id", String(128), nullable=False),
    Column("sequence_number", String(128), nullable=False),
    Column("worker_id", String(128), nullable=False),
    Column("lease_counter", Integer, nullable=False),
)
Table(
    "enrollments",
    metadata,
    Column("course_id", String(63), ForeignKey("courses.course_id"), primary_key=True),
    Column("email", String(320), primary_key=True),
    Column("registration_id", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("enroll_time", DateTime(timezone=True), nullable=False),
)
add_runtime_tables_as_of_baseline(metadata, consumes=True, publishes=True)


def upgrade() -> None:
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
