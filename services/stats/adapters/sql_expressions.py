"""SQL expressions the stats queries share, written once for SQLite and PostgreSQL.

- `age_on_sql`: the age in whole years of a birth-date column on a given day, the same
  arithmetic as domain.ages.age_on (a Feb 29 birthday is reached on Mar 1 in common
  years, because (2, 29) > (2, 28)).
- `bytewise`: a string column compared and sorted by code point on both databases
  (PostgreSQL otherwise sorts by the database's locale), so that orderings, keyset
  pages and brute-force checks in Python agree.
"""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import ColumnElement, Integer, case, cast, extract, literal


def age_on_sql(birth_date: ColumnElement[Any], as_of: date) -> ColumnElement[int]:
    year = cast(extract("year", birth_date), Integer)
    month = cast(extract("month", birth_date), Integer)
    day = cast(extract("day", birth_date), Integer)
    birthday_ahead = case((month * 100 + day > as_of.month * 100 + as_of.day, 1), else_=0)
    return literal(as_of.year, Integer) - year - birthday_ahead


def bytewise(column: ColumnElement[str], dialect_name: str) -> ColumnElement[str]:
    return column.collate("C") if dialect_name == "postgresql" else column
