"""The enrollment database: catalogue, decisions, enrollments (plus leases and outbox from libs)."""

from __future__ import annotations

from sqlalchemy import (
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
)

metadata = MetaData()

campuses = Table(
    "campuses",
    metadata,
    Column("campus_id", String(63), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

courses = Table(
    "courses",
    metadata,
    Column("course_id", String(63), primary_key=True),
    Column("campus_id", String(63), ForeignKey("campuses.campus_id"), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("capacity", Integer, nullable=False),
    Column("enrolled_count", Integer, nullable=False, default=0),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("update_time", DateTime(timezone=True), nullable=False),
    # The database itself refuses an overbooked course, whatever the code does.
    CheckConstraint("enrolled_count >= 0 AND enrolled_count <= capacity", name="seats_within_capacity"),
)

decisions = Table(
    "decisions",
    metadata,
    Column("registration_id", String(64), primary_key=True),
    Column("course_id", String(63), nullable=False, index=True),
    Column("email", String(320), nullable=False),
    Column("outcome", String(32), nullable=False),
    Column("decide_time", DateTime(timezone=True), nullable=False),
    Column("shard_id", String(128), nullable=False),
    Column("sequence_number", String(128), nullable=False),
    # Audit of the single writer: which worker decided, under which lease (fencing token).
    Column("worker_id", String(128), nullable=False, default=""),
    Column("lease_counter", Integer, nullable=False, default=0),
)

# One row per seat taken: the primary key makes a second seat for one email impossible.
enrollments = Table(
    "enrollments",
    metadata,
    Column("course_id", String(63), ForeignKey("courses.course_id"), primary_key=True),
    Column("email", String(320), primary_key=True),
    Column("registration_id", String(64), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("enroll_time", DateTime(timezone=True), nullable=False),
)
