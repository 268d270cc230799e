"""The read model's tables (SQLAlchemy Core), in the stats service's own database.

- `roster`: one row per enrollment, keyed by registration id; a redelivered event finds
  its row already there and changes nothing. A removed enrollment keeps its row with a
  `removed_time` (a tombstone), so a late redelivery cannot bring it back.
- `campus_students` / `students`: each distinct student (by email) per campus and
  overall, with how many of their live enrollments are in that scope and the birth date
  counted for them: the one of their earliest live enrollment there (by enroll time,
  then registration id), so the figures do not depend on the order events arrive in.
  A student counts once however many courses they take, and leaves the scope when the
  count drops to 0.
- `age_buckets`, `birthday_buckets`, `age_years`, `age_totals`: per scope
  ("course:<id>", "campus:<id>", "overall"), students per birth date, per birthday
  (month, day), per birth year, and the count with the sum of birth years. A metric
  query reads one totals row, at most 366 birthday rows, the two ends of the
  birth-date index, the birth years (about a hundred) and the birth dates of one or
  two years for the median, however many enrollments there are. Rows that reach 0 are
  deleted.
- `course_summaries`: one row per course with students, its campus and what its age
  metrics on any date follow from, so QueryCourseStats filters and sorts every course
  in one statement whose cost grows with the number of courses, not enrollments.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Date, DateTime, Engine, Index, Integer, MetaData, String, Table

from libs import consumer as consumer_lib
from libs.db import ensure_schema

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
    # The projection recounts a student's memberships from their live enrollments.
    Index("ix_roster_email", "email"),
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

# Students per birth year per scope (about a hundred rows): which year holds the median.
age_years = Table(
    "age_years",
    metadata,
    Column("scope", String, primary_key=True),
    Column("birth_year", Integer, primary_key=True),
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

BIRTH_MONTHS = range(1, 13)


def born_in_month(month: int) -> str:
    """The course_summaries column counting students born in that month (1-12)."""
    return f"born_in_month_{month:02d}"


# One row per course with live enrollments. Average age on a date needs the students
# whose birthday is still ahead: those born in a later month (the month columns) plus
# those born later in the same month (at most 31 birthday_buckets rows).
course_summaries = Table(
    "course_summaries",
    metadata,
    Column("course_id", String, primary_key=True),
    Column("campus_id", String, nullable=False),
    # The course's scope in the per-scope tables ("course:<id>").
    Column("scope", String, nullable=False, unique=True),
    Column("students", BigInteger, nullable=False),
    Column("birth_year_total", BigInteger, nullable=False),
    Column("earliest_birth_date", Date, nullable=False),
    Column("latest_birth_date", Date, nullable=False),
    *(Column(born_in_month(month), BigInteger, nullable=False) for month in BIRTH_MONTHS),
)

# The tables derived from the roster, in the order the projection writes them.
AGGREGATE_TABLES = (
    campus_students,
    students,
    age_buckets,
    birthday_buckets,
    age_years,
    age_totals,
    course_summaries,
)


def create_schema(engine: Engine) -> None:
    """Creates missing tables and indexes; refuses a database from an older version."""
    ensure_schema(engine, metadata, consumer_lib.metadata)
