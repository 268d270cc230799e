"""Baseline: the stats schema (read model) as the version before migrations created it.

A database made by that version (tables, no version row) is compared with `metadata`
and stamped with this revision (libs.migrations); a new one is created from it. Frozen:
later changes are later migrations, never edits here.

Revision ID: 0001
Revises:
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import BigInteger, Column, Date, DateTime, Index, Integer, MetaData, String, Table

from libs.migrations import add_runtime_tables_as_of_baseline

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

metadata = MetaData()

Table(
    "roster",
    metadata,
    Column("registration_id", String, primary_key=True),
    Column("course_id", String, nullable=False),
    Column("campus_id", String, nullable=False),
    Column("email", String, nullable=False),
    Column("name", String, nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("enroll_time", DateTime(timezone=True), nullable=False),
    Column("removed_time", DateTime(timezone=True), nullable=True),
    Index("ix_roster_course_id", "course_id"),
    Index("ix_roster_email", "email"),
)
Table(
    "campus_students",
    metadata,
    Column("campus_id", String, primary_key=True),
    Column("email", String, primary_key=True),
    Column("birth_date", Date, nullable=False),
    Column("enrollments", Integer, nullable=False),
)
Table(
    "students",
    metadata,
    Column("email", String, primary_key=True),
    Column("birth_date", Date, nullable=False),
    Column("enrollments", Integer, nullable=False),
)
Table(
    "age_buckets",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_date", Date, primary_key=True),
    Column("students", BigInteger, nullable=False),
)
Table(
    "birthday_buckets",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_month", Integer, primary_key=True),
    Column("birth_day", Integer, primary_key=True),
    Column("students", BigInteger, nullable=False),
)
Table(
    "age_years",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_year", Integer, primary_key=True),
    Column("students", BigInteger, nullable=False),
)
Table(
    "age_totals",
    metadata,
    Column("scope", String, primary_key=True),
    Column("students", BigInteger, nullable=False),
    Column("birth_year_total", BigInteger, nullable=False),
)
Table(
    "course_summaries",
    metadata,
    Column("course_id", String, primary_key=True),
    Column("campus_id", String, nullable=False),
    Column("scope", String, nullable=False, unique=True),
    Column("students", BigInteger, nullable=False),
    Column("birth_year_total", BigInteger, nullable=False),
    Column("earliest_birth_date", Date, nullable=False),
    Column("latest_birth_date", Date, nullable=False),
    *(Column(f"born_in_month_{month:02d}", BigInteger, nullable=False) for month in range(1, 13)),
)
add_runtime_tables_as_of_baseline(metadata, consumes=True)


def upgrade() -> None:
    metadata.create_all(op.get_bind())


def downgrade() -> None:
    metadata.drop_all(op.get_bind())
