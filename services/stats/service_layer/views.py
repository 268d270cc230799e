"""Metric queries on the read model: one statement over one scope's birth-date buckets.

The cost is bounded by the number of distinct birth dates in the scope (tens of
thousands at most), not by the number of enrollments: the roster is never read here.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import Engine, and_, case, func, or_, select

from services.stats.adapters.tables import age_buckets
from services.stats.domain.ages import AgeMetrics, BirthDateTally, metrics_on


def age_metrics(engine: Engine, scope: str, as_of: date) -> AgeMetrics:
    birthday_ahead = or_(
        age_buckets.c.birth_month > as_of.month,
        and_(age_buckets.c.birth_month == as_of.month, age_buckets.c.birth_day > as_of.day),
    )
    query = select(
        func.coalesce(func.sum(age_buckets.c.students), 0),
        func.coalesce(func.sum(age_buckets.c.students * age_buckets.c.birth_year), 0),
        func.coalesce(func.sum(case((birthday_ahead, age_buckets.c.students), else_=0)), 0),
        func.min(age_buckets.c.birth_date),
        func.max(age_buckets.c.birth_date),
    ).where(age_buckets.c.scope == scope, age_buckets.c.students > 0)
    with engine.connect() as conn:
        students, birth_year_total, ahead, earliest, latest = conn.execute(query).one()
    # PostgreSQL sums bigints as numeric (Decimal); the figures are whole numbers.
    sums = BirthDateTally(
        students=int(students),
        birth_year_total=int(birth_year_total),
        birthday_ahead=int(ahead),
        earliest_birth_date=earliest,
        latest_birth_date=latest,
    )
    return metrics_on(sums, as_of)
