"""Metric queries on the read model: a few statements over one scope's aggregates.

Count, youngest, oldest and mean age come from one statement reading the scope's
totals row, at most 366 birthday rows and the two ends of its birth-date index. The
median reads the scope's birth years (about a hundred rows), then walks in SQL the birth
dates of the one or two years holding the middle ranks (at most 732 rows). None of this grows with
the number of enrollments, and the roster is never read here. The histogram (asked
for explicitly) groups the scope's distinct birth dates into ages in SQL: bounded by
the number of distinct birth dates, never by enrollments.

Each view reads one snapshot (REPEATABLE READ on PostgreSQL, a read transaction on
SQLite), so its statements agree with each other while batches commit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import Connection, Date, Engine, Integer, Select, String, and_, bindparam, func, or_, select

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
RANGES_PER_STATEMENT = 100


@dataclass(frozen=True)
class ScopeStats:
    metrics: AgeMetrics
    median_age: float
    # Students per age, ages in increasing order; None unless asked for.
    histogram: dict[int, int] | None = None


@contextmanager
def snapshot(engine: Engine) -> Iterator[Connection]:
    """A read-only connection whose statements all see the same committed state."""
    with _snapshot_engine(engine).connect() as conn, conn.begin():
        yield conn


@functools.lru_cache(maxsize=64)
def _snapshot_engine(engine: Engine) -> Engine:
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ")
    return read_only(engine)


def age_stats(engine: Engine, scope: str, as_of: date, with_histogram: bool = False) -> ScopeStats:
    with snapshot(engine) as conn:
        metrics = age_metrics_in(conn, scope, as_of)
        median = median_age(conn, scope, as_of)
        histogram = age_histogram(conn, scope, as_of) if with_histogram else None
    return ScopeStats(metrics, median, histogram)


def age_metrics(engine: Engine, scope: str, as_of: date) -> AgeMetrics:
    with snapshot(engine) as conn:
        return age_metrics_in(conn, scope, as_of)


# The statements are built once, with parameters: a call only binds values.
_scope = bindparam("scope", type_=String)
_month = bindparam("month", type_=Integer)
_day = bindparam("day", type_=Integer)


def _metrics_statement() -> Select[Any]:
    totals = age_totals.c
    birthdays = birthday_buckets.c
    birth_dates = age_buckets.c.birth_date
    birthday_ahead = or_(
        birthdays.birth_month > _month,
        and_(birthdays.birth_month == _month, birthdays.birth_day > _day),
    )
    return select(
        select(totals.students).where(totals.scope == _scope).scalar_subquery(),
        select(totals.birth_year_total).where(totals.scope == _scope).scalar_subquery(),
        select(func.sum(birthdays.students)).where(birthdays.scope == _scope, birthday_ahead).scalar_subquery(),
        select(birth_dates)
        .where(age_buckets.c.scope == _scope, age_buckets.c.students > 0)
        .order_by(birth_dates)
        .limit(1)
        .scalar_subquery(),
        select(birth_dates)
        .where(age_buckets.c.scope == _scope, age_buckets.c.students > 0)
        .order_by(birth_dates.desc())
        .limit(1)
        .scalar_subquery(),
    )


def _middle_dates_statement() -> Select[Any]:
    """The birth dates at two ranks, each given as (year's first day, last day, rank in year)."""

    def date_at(n: int) -> Any:
        buckets = age_buckets.c
        running = (
            select(buckets.birth_date, func.sum(buckets.students).over(order_by=buckets.birth_date).label("through"))
            .where(
                buckets.scope == _scope,
                buckets.students > 0,
                buckets.birth_date >= bindparam(f"first_{n}", type_=Date),
                buckets.birth_date <= bindparam(f"last_{n}", type_=Date),
            )
            .subquery()
        )
        return (
            select(running.c.birth_date)
            .where(running.c.through > bindparam(f"rank_{n}", type_=Integer))
            .order_by(running.c.birth_date)
            .limit(1)
            .scalar_subquery()
        )

    return select(date_at(0), date_at(1))


def _years_statement() -> Select[Any]:
    return (
        select(age_years.c.birth_year, age_years.c.students)
        .where(age_years.c.scope == _scope, age_years.c.students > 0)
        .order_by(age_years.c.birth_year)
    )


_METRICS = _metrics_statement()
_MIDDLE_DATES = _middle_dates_statement()
_YEARS = _years_statement()


def age_metrics_in(conn: Connection, scope: str, as_of: date) -> AgeMetrics:
    row = conn.execute(_METRICS, {"scope": scope, "month": as_of.month, "day": as_of.day}).one()
    students, birth_year_total, ahead, earliest, latest = row
    # PostgreSQL sums bigints as numeric (Decimal); the figures are whole numbers.
    sums = BirthDateTally(
        students=int(students or 0),
        birth_year_total=int(birth_year_total or 0),
        birthday_ahead=int(ahead or 0),
        earliest_birth_date=earliest,
        latest_birth_date=latest,
    )
    return metrics_on(sums, as_of)


def median_age(conn: Connection, scope: str, as_of: date) -> float:
    """The median age of one scope on as_of (0 without students).

    Birth-date order is age order (reversed), so the middle students are found by
    walking the scope's birth years to the year holding each middle rank, then, in
    SQL, that year's running count of students per birth date.
    """
    years = [(year, int(n)) for year, n in conn.execute(_YEARS, {"scope": scope})]
    spots = _middle_spots(years)
    if not spots:
        return 0.0
    params: dict[str, Any] = {"scope": scope}
    for n, (year, rank) in enumerate(spots):
        params.update({f"first_{n}": date(year, 1, 1), f"last_{n}": date(year, 12, 31), f"rank_{n}": rank})
    middle = conn.execute(_MIDDLE_DATES, params).one()
    return sum(age_on(birth, as_of) for birth in middle) / 2


def median_ages(conn: Connection, scopes: Sequence[str], as_of: date) -> dict[str, float]:
    """The median age of each of many scopes on as_of (0 for a scope without students),
    in two statements whatever the number of scopes (QueryCourseStats pages)."""
    medians = dict.fromkeys(scopes, 0.0)
    years: dict[str, list[tuple[int, int]]] = {}
    for row in conn.execute(
        select(age_years.c.scope, age_years.c.birth_year, age_years.c.students)
        .where(age_years.c.scope.in_(sorted(set(scopes))), age_years.c.students > 0)
        .order_by(age_years.c.scope, age_years.c.birth_year)
    ):
        years.setdefault(row.scope, []).append((row.birth_year, int(row.students)))
    wanted = {scope: _middle_spots(counts) for scope, counts in years.items()}
    dates = _birth_dates_of_years(conn, sorted({(scope, year) for scope, spots in wanted.items() for year, _ in spots}))
    for scope, spots in wanted.items():
        middle = [locate(dates[(scope, year)], rank)[0] for year, rank in spots]
        medians[scope] = sum(age_on(birth, as_of) for birth in middle) / len(middle)
    return medians


def _middle_spots(years: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """For students counted per birth year (in year order): the year of each middle
    student and their rank among that year's students."""
    students = sum(n for _, n in years)
    return [locate(years, rank) for rank in median_ranks(students)] if students else []


def _birth_dates_of_years(
    conn: Connection, scope_years: Sequence[tuple[str, int]]
) -> Mapping[tuple[str, int], list[tuple[date, int]]]:
    """Students per birth date, in date order, of each (scope, birth year)."""
    found: dict[tuple[str, int], list[tuple[date, int]]] = {}
    for start in range(0, len(scope_years), RANGES_PER_STATEMENT):
        chunk = list(scope_years[start : start + RANGES_PER_STATEMENT])
        # Padded to a fixed length (with a scope that does not exist), so that one
        # compiled statement serves every call.
        chunk += [("", 1)] * (RANGES_PER_STATEMENT - len(chunk))
        params = {}
        for n, (scope, year) in enumerate(chunk):
            params.update({f"scope_{n}": scope, f"first_{n}": date(year, 1, 1), f"last_{n}": date(year, 12, 31)})
        for row in conn.execute(_BIRTH_DATES_OF_YEARS, params):
            found.setdefault((row.scope, row.birth_date.year), []).append((row.birth_date, int(row.students)))
    return found


def _birth_dates_of_years_statement() -> Select[Any]:
    buckets = age_buckets.c
    ranges = [
        and_(
            buckets.scope == bindparam(f"scope_{n}", type_=String),
            buckets.birth_date >= bindparam(f"first_{n}", type_=Date),
            buckets.birth_date <= bindparam(f"last_{n}", type_=Date),
        )
        for n in range(RANGES_PER_STATEMENT)
    ]
    return (
        select(buckets.scope, buckets.birth_date, buckets.students)
        .where(or_(*ranges), buckets.students > 0)
        .order_by(buckets.scope, buckets.birth_date)
    )


_BIRTH_DATES_OF_YEARS = _birth_dates_of_years_statement()


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
