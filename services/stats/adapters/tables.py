"""The read model's tables (SQLAlchemy Core), in the stats service's own database.

- `roster`: one row per enrollment, keyed by registration id; a redelivered event finds
  its row already there and changes nothing. A removed enrollment keeps its row with a
  `removed_time` (a tombstone), so a late redelivery cannot bring it back.
- `campus_students` / `students`: each distinct student (by email) per campus and
  overall, with how many of their enrollments are in that scope, so a student counts
  once however many courses they take, and leaves the scope when the count drops to 0.
- `age_buckets`, `birthday_buckets`, `age_totals`: per scope ("course:<id>",
  "campus:<id>", "overall"), students per birth date, students per birthday (month,
  day), and the count with the sum of birth years. A metric query reads one totals row,
  at most 366 birthday rows and the two ends of the birth-date index, however many
  enrollments there are. Rows that reach 0 are deleted.
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
    Column("removed_time", DateTime(timezone=True), nullable=True),
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

# Students per birth date per scope: the earliest and latest rows give the oldest and
# youngest ages (index seeks on the primary key), and removals find the next ones.
age_buckets = Table(
    "age_buckets",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_date", Date, primary_key=True),
    Column("students", BigInteger, nullable=False),
)

# Students per birthday (month, day) per scope, at most 366 rows: how many have not yet
# had their birthday by a given day of the year.
birthday_buckets = Table(
    "birthday_buckets",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_month", Integer, primary_key=True),
    Column("birth_day", Integer, primary_key=True),
    Column("students", BigInteger, nullable=False),
)

# One row per scope: the student count and the sum of their birth years.
age_totals = Table(
    "age_totals",
    metadata,
    Column("scope", String, primary_key=True),
    Column("students", BigInteger, nullable=False),
    Column("birth_year_total", BigInteger, nullable=False),
)
