"""The enrollment database: catalogue, decisions, enrollments, waiting lists (plus leases and outbox from libs)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    false,
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
    # When Register accepted the sign-up (NULL in decisions recorded before it was kept).
    Column("create_time", DateTime(timezone=True), nullable=True),
    # The seat came from the waiting list.
    Column("promoted", Boolean, nullable=False, default=False, server_default=false()),
    # The student's name, for ListDecisions ('' in older rows and in cancellations never decided).
    Column("name", String(200), nullable=False, default="", server_default=""),
    # ListDecisions filters and pages by student across courses.
    Index("ix_decisions_email", "email"),
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
    # The address as given and the email language, for the cancellation email ('' in older rows).
    Column("contact_email", String(320), nullable=False, default="", server_default=""),
    Column("locale", String(16), nullable=False, default="", server_default=""),
)

# One row per WAITLISTED registration. `seq` orders a course's waiting list (arrival order:
# the decider numbers them as it decides); a position is derived from it (the rows of the
# course with a smaller or equal seq), so a promotion or a cancellation deletes one row and
# every position after it moves up without a renumbering. Rows carry what the enrollment
# needs when a seat frees.
waitlist = Table(
    "waitlist",
    metadata,
    Column("registration_id", String(64), primary_key=True),
    Column("course_id", String(63), ForeignKey("courses.course_id"), nullable=False),
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), nullable=False),
    Column("email", String(320), nullable=False),
    Column("contact_email", String(320), nullable=False),
    Column("name", String(200), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("locale", String(16), nullable=False),
    Column("accept_time", DateTime(timezone=True), nullable=True),
    Column("wait_time", DateTime(timezone=True), nullable=False),
    UniqueConstraint("course_id", "seq", name="waitlist_course_seq"),
    # One place in line per student and course, as one seat per student and course.
    UniqueConstraint("course_id", "email", name="waitlist_course_email"),
)
