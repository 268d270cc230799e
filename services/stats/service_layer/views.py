"""Metric queries on the read model: a few statements over one scope's aggregates.

Count, youngest, oldest and mean age come from one statement reading the scope's
totals row, at most 366 birthday rows and the two ends of its birth-date index. The
median reads the scope's birth years (about a hundred rows) and the birth dates of the
one or two years holding the middle ranks (at most 732 rows). None of this grows with
the number of enrollments, and the roster is never read here. The histogram (asked
for explicitly) groups the scope's distinct birth dates into ages in SQL: bounded by
the number of distinct birth dates, never by enrollments.

Each view reads one snapshot (REPEATABLE READ on PostgreSQL, a read transaction on
SQLite), so its statements agree with each other while batches commit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date

from sqlalchemy import Connection, Engine, and_, func, or_, select

from libs.db import read_only
from services.stats.adapters.sql_expressions import age_on_sql
from services.stats.adapters.tables import age_buckets, age_totals, age_years, birthday_buckets
from services.stats.domain.ages import (
    AgeMetrics,
    BirthDateTally,
    age_on,
    locate,
    median_ranks,
    metrics_on,
)

# (scope, birth year) ranges per statement: SQLite refuses deeper expression trees.
RANGES_PER_STATEMENT = 200


@dataclass(frozen=True)
class ScopeStats:
    metrics: AgeMetrics
    median_age: float
    # Students per age, ages in increasing order; None unless asked for.
    histogram: dict[int, int] | None = None


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only connection whose statements all see the same committed state."""
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    with read_only(engine).connect() as conn, conn.begin():
        yield conn


def age_stats(engine: Engine, scope: str, as_of: date, with_histogram: bool = False) -> ScopeStats:
    with snapshot(engine) as conn:
        metrics = age_metrics_in(conn, scope, as_of)
        median = median_ages(conn, [scope], as_of)[scope]
        histogram = age_histogram(conn, scope, as_of) if with_histogram else None
    return ScopeStats(metrics, median, histogram)


def age_metrics(engine: Engine, scope: str, as_of: date) -> AgeMetrics:
    with snapshot(engine) as conn:
        return age_metrics_in(conn, scope, as_of)


def age_metrics_in(conn: Connection, scope: str, as_of: date) -> AgeMetrics:
    totals = age_totals.c
    birthdays = birthday_buckets.c
    birth_dates = age_buckets.c.birth_date
    birthday_ahead = or_(
        birthdays.birth_month > as_of.month,
        and_(birthdays.birth_month == as_of.month, birthdays.birth_day > as_of.day),
    )
    query = select(
        select(totals.students).where(totals.scope == scope).scalar_subquery(),
        select(totals.birth_year_total).where(totals.scope == scope).scalar_subquery(),
        select(func.sum(birthdays.students))
        .where(birthdays.scope == scope, birthday_ahead)
        .scalar_subquery(),
        select(birth_dates)
        .where(age_buckets.c.scope == scope, age_buckets.c.students > 0)
        .order_by(birth_dates)
        .limit(1)
        .scalar_subquery(),
        select(birth_dates)
        .where(age_buckets.c.scope == scope, age_buckets.c.students > 0)
        .order_by(birth_dates.desc())
        .limit(1)
        .scalar_subquery(),
    )
    students, birth_year_total, ahead, earliest, latest = conn.execute(query).one()
    # PostgreSQL sums bigints as numeric (Decimal); the figures are whole numbers.
    sums = BirthDateTally(
        students=int(students or 0),
        birth_year_total=int(birth_year_total or 0),
        birthday_ahead=int(ahead or 0),
        earliest_birth_date=earliest,
        latest_birth_date=latest,
    )
    return metrics_on(sums, as_of)


def median_ages(conn: Connection, scopes: Sequence[str], as_of: date) -> dict[str, float]:
    """The median age of each scope on as_of (0 for a scope without students).

    Birth-date order is age order (reversed), so the middle students are found by
    walking the scope's birth years to the year holding each middle rank, then that
    year's birth dates.
    """
    medians = dict.fromkeys(scopes, 0.0)
    years: dict[str, list[tuple[int, int]]] = {}
    for row in conn.execute(
        select(age_years.c.scope, age_years.c.birth_year, age_years.c.students)
        .where(age_years.c.scope.in_(sorted(set(scopes))), age_years.c.students > 0)
        .order_by(age_years.c.scope, age_years.c.birth_year)
    ):
        years.setdefault(row.scope, []).append((row.birth_year, int(row.students)))
    wanted: dict[str, list[tuple[int, int]]] = {}
    for scope, counts in years.items():
        students = sum(n for _, n in counts)
        wanted[scope] = [locate(counts, rank) for rank in median_ranks(students)]
    dates = _birth_dates_of_years(conn, sorted({(scope, year) for scope, spots in wanted.items() for year, _ in spots}))
    for scope, spots in wanted.items():
        middle = [locate(dates[(scope, year)], offset)[0] for year, offset in spots]
        medians[scope] = sum(age_on(birth, as_of) for birth in middle) / len(middle)
    return medians


def _birth_dates_of_years(
    conn: Connection, scope_years: Sequence[tuple[str, int]]
) -> Mapping[tuple[str, int], list[tuple[date, int]]]:
    """Students per birth date, in date order, of each (scope, birth year)."""
    found: dict[tuple[str, int], list[tuple[date, int]]] = {}
    buckets = age_buckets.c
    for start in range(0, len(scope_years), RANGES_PER_STATEMENT):
        ranges = [
            and_(
                buckets.scope == scope,
                buckets.birth_date >= date(year, 1, 1),
                buckets.birth_date <= date(year, 12, 31),
            )
            for scope, year in scope_years[start : start + RANGES_PER_STATEMENT]
        ]
        for row in conn.execute(
            select(buckets.scope, buckets.birth_date, buckets.students)
            .where(or_(*ranges), buckets.students > 0)
            .order_by(buckets.scope, buckets.birth_date)
        ):
            found.setdefault((row.scope, row.birth_date.year), []).append((row.birth_date, int(row.students)))
    return found


def age_histogram(conn: Connection, scope: str, as_of: date) -> dict[int, int]:
    """Students per age on as_of, grouped in SQL from the scope's birth-date counts."""
    per_birth_date = (
        select(age_on_sql(age_buckets.c.birth_date, as_of).label("age"), age_buckets.c.students)
        .where(age_buckets.c.scope == scope, age_buckets.c.students > 0)
        .subquery()
    )
    rows = conn.execute(
        select(per_birth_date.c.age, func.sum(per_birth_date.c.students))
        .group_by(per_birth_date.c.age)
        .order_by(per_birth_date.c.age)
    )
    return {int(age): int(students) for age, students in rows}
