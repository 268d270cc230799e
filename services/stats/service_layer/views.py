"""Metric queries on the read model: one statement over one scope's aggregates.

It reads the scope's totals row, at most 366 birthday rows and the two ends of its
birth-date index: the cost does not grow with the number of enrollments, and the
roster is never read here.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import Engine, and_, func, or_, select

from libs.db import read_only
from services.stats.adapters.tables import age_buckets, age_totals, birthday_buckets
from services.stats.domain.ages import AgeMetrics, BirthDateTally, metrics_on


def age_metrics(engine: Engine, scope: str, as_of: date) -> AgeMetrics:
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
    with read_only(engine).connect() as conn:
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
