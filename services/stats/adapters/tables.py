"""The read model's tables (SQLAlchemy Core), in the stats service's own database.

- `roster`: one row per enrollment, keyed by registration id; a redelivered event finds
  its row already there and changes nothing.
- `campus_students` / `students`: each distinct student (by email) per campus and
  overall, with how many of their enrollments are in that scope, so a student counts
  once however many courses they take, and leaves the scope when the count drops to 0.
- `age_buckets`: students per birth date per scope ("course:<id>", "campus:<id>",
  "overall"). Metrics are computed from these rows alone: at most one row per distinct
  birth date, however many enrollments there are. Rows that reach 0 are deleted.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Date, DateTime, Index, Integer, MetaData, String, Table

metadata = MetaData()

roster = Table(
    "roster",
    metadata,
    Column("registration_id", String, primary_key=True),
    Column("course_id", String, nullable=False),
    Column("campus_id", String, nullable=False),
    Column("email", String, nullable=False),
    Column("name", String, nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("enroll_time", DateTime(timezone=True), nullable=False),
    Index("ix_roster_course_id", "course_id"),
)

campus_students = Table(
    "campus_students",
    metadata,
    Column("campus_id", String, primary_key=True),
    Column("email", String, primary_key=True),
    # The birth date of the student's first enrollment in the scope; the one counted.
    Column("birth_date", Date, nullable=False),
    Column("enrollments", Integer, nullable=False),
)

students = Table(
    "students",
    metadata,
    Column("email", String, primary_key=True),
    Column("birth_date", Date, nullable=False),
    Column("enrollments", Integer, nullable=False),
)

# The primary key (scope, birth_date) is the index every metric query and update uses.
age_buckets = Table(
    "age_buckets",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_date", Date, primary_key=True),
    Column("birth_year", Integer, nullable=False),
    Column("birth_month", Integer, nullable=False),
    Column("birth_day", Integer, nullable=False),
    # BigInteger so that students * birth_year cannot overflow in the sums.
    Column("students", BigInteger, nullable=False),
)
