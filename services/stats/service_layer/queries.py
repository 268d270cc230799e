"""Dynamic queries: QueryCourseStats and ListEnrollments (AIP-160 filter, AIP-132
order_by, AIP-158 pagination).

QueryCourseStats reads `course_summaries`, one row per course with students: each
course's age metrics on the query's date are SQL expressions over its row (and, for
the mean, at most 31 of its birthday rows), so filtering and sorting on them costs in
proportion to the number of courses, never to enrollments. ListEnrollments reads one
course's live roster rows.

Pages are keyset pages: the next page starts after the last row's sort key (which ends
in the unique course id or registration id), so each page costs the same however deep.
The token carries that key (for a roster, only the registration id: the rest is read
back, so names and emails stay out of tokens) and the date ages were computed on, so
the pages of one listing use one date even across midnight. Tokens are signed
(libs.pagination) and tied to the request's other parameters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from sqlalchemy import CTE, ColumnElement, Connection, Double, Engine, Select, cast, func, literal, select

from libs.aip_filter import Field, FieldKind, OrderKey, compile_filter, parse_order_by
from libs.db import as_utc
from libs.errors import InvalidArgument
from libs.pagination import after_keyset, decode_token, encode_token, page_size
from services.stats.adapters.sql_expressions import age_on_sql, bytewise
from services.stats.adapters.tables import BIRTH_MONTHS, birthday_buckets, born_in_month, course_summaries, roster
from services.stats.service_layer.views import median_ages, snapshot

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_page_token: str
    as_of: date


@dataclass(frozen=True)
class CourseStatsRow:
    course_id: str
    campus_id: str
    student_count: int
    min_age: int
    max_age: int
    average_age: float
    median_age: float


@dataclass(frozen=True)
class RosterEntry:
    registration_id: str
    name: str
    email: str
    age: int
    birth_date: date
    enroll_time: datetime


@dataclass(frozen=True)
class ListingRequest:
    """What every dynamic query takes; as_of None means today (or the token's date)."""

    filter: str
    order_by: str
    page_size: int
    page_token: str
    as_of: date | None


# QueryCourseStats -----------------------------------------------------------------


def course_metrics(as_of: date) -> CTE:
    """Every course's metrics on as_of, as SQL over course_summaries, computed once per
    course (a materialized CTE) before the filter, the order and the page use them."""
    summary = course_summaries.c
    later_months = [summary[born_in_month(month)] for month in BIRTH_MONTHS if month > as_of.month]
    later_in_month = (
        select(func.sum(birthday_buckets.c.students))
        .where(
            birthday_buckets.c.scope == summary.scope,
            birthday_buckets.c.birth_month == as_of.month,
            birthday_buckets.c.birth_day > as_of.day,
        )
        .scalar_subquery()
    )
    birthday_ahead = sum(later_months, literal(0)) + func.coalesce(later_in_month, 0)
    total_age = summary.students * as_of.year - summary.birth_year_total - birthday_ahead
    return (
        select(
            summary.course_id,
            summary.campus_id,
            summary.scope,
            summary.students.label("student_count"),
            age_on_sql(summary.latest_birth_date, as_of).label("min_age"),
            age_on_sql(summary.earliest_birth_date, as_of).label("max_age"),
            # Both sides as doubles: the same correctly rounded quotient as Python's total / n.
            (cast(total_age, Double) / cast(summary.students, Double)).label("average_age"),
        )
        .where(summary.students > 0)
        .cte("course_metrics")
        .prefix_with("MATERIALIZED")
    )


def course_stats_fields(metrics: CTE, dialect_name: str) -> list[Field]:
    """The fields QueryCourseStats filters and sorts on: the columns of course_metrics."""
    return [
        Field("course_id", FieldKind.STRING, bytewise(metrics.c.course_id, dialect_name)),
        Field("campus_id", FieldKind.STRING, bytewise(metrics.c.campus_id, dialect_name)),
        Field("student_count", FieldKind.INTEGER, metrics.c.student_count),
        Field("min_age", FieldKind.INTEGER, metrics.c.min_age),
        Field("max_age", FieldKind.INTEGER, metrics.c.max_age),
        Field("average_age", FieldKind.NUMBER, metrics.c.average_age),
    ]


def query_course_stats(engine: Engine, request: ListingRequest, token_key: bytes) -> Page[CourseStatsRow]:
    query_id = {"method": "QueryCourseStats", "filter": request.filter, "order_by": request.order_by,
                "as_of": _iso(request.as_of)}
    after, as_of = _resume(request, query_id, token_key)
    metrics = course_metrics(as_of)
    fields = course_stats_fields(metrics, engine.dialect.name)
    listing = _Listing(request, fields, default_order=[OrderKey(fields[0])], unique=fields[0])
    if after is not None and not isinstance(after, list):
        raise _bad_token()
    with snapshot(engine) as conn:
        rows, more = listing.fetch(conn, select(metrics), listing.decode(after) if after is not None else None)
        medians = median_ages(conn, [row.scope for row in rows], as_of)
    # Course ids and ages are no personal data: the token carries the last row's sort key.
    last_key = [_jsonable(value) for value in listing.sort_values(rows[-1])] if more else None
    items = [
        CourseStatsRow(
            course_id=row.course_id,
            campus_id=row.campus_id,
            student_count=int(row.student_count),
            min_age=int(row.min_age),
            max_age=int(row.max_age),
            average_age=float(row.average_age),
            median_age=medians[row.scope],
        )
        for row in rows
    ]
    return Page(items, _next_token(last_key, as_of, query_id, token_key), as_of)


# ListEnrollments ------------------------------------------------------------------


def roster_fields(dialect_name: str, as_of: date) -> list[Field]:
    """The fields ListEnrollments filters and sorts on, as SQL over the roster."""
    return [
        Field("name", FieldKind.STRING, bytewise(roster.c.name, dialect_name)),
        Field("email", FieldKind.STRING, bytewise(roster.c.email, dialect_name)),
        Field("age", FieldKind.INTEGER, age_on_sql(roster.c.birth_date, as_of)),
        Field("enroll_time", FieldKind.TIMESTAMP, roster.c.enroll_time),
    ]


def list_enrollments(
    engine: Engine, course_id: str, request: ListingRequest, token_key: bytes
) -> Page[RosterEntry]:
    query_id = {"method": "ListEnrollments", "course_id": course_id, "filter": request.filter,
                "order_by": request.order_by, "as_of": _iso(request.as_of)}
    after, as_of = _resume(request, query_id, token_key)
    dialect_name = engine.dialect.name
    fields = {field.name: field for field in roster_fields(dialect_name, as_of)}
    registration_id = Field("registration_id", FieldKind.STRING, bytewise(roster.c.registration_id, dialect_name))
    listing = _Listing(
        request, list(fields.values()), default_order=[OrderKey(fields["enroll_time"])], unique=registration_id
    )
    query = select(
        roster.c.registration_id,
        roster.c.name,
        roster.c.email,
        roster.c.birth_date,
        roster.c.enroll_time,
        fields["age"].expression.label("age"),
    ).where(roster.c.course_id == course_id, roster.c.removed_time.is_(None))
    if after is not None and not isinstance(after, str):
        raise _bad_token()
    with snapshot(engine) as conn:
        last = None
        if after is not None:
            # Tokens carry only the last registration id (names and emails stay out of
            # them); its sort key is read back here. Removed rows keep theirs.
            last = listing.values_where(conn, roster.c.registration_id == after, roster.c.course_id == course_id)
            if last is None:
                raise _bad_token()
        rows, more = listing.fetch(conn, query, last)
    last_key = rows[-1].registration_id if more else None
    items = [
        RosterEntry(
            registration_id=row.registration_id,
            name=row.name,
            email=row.email,
            age=int(row.age),
            birth_date=row.birth_date,
            enroll_time=as_utc(row.enroll_time),
        )
        for row in rows
    ]
    return Page(items, _next_token(last_key, as_of, query_id, token_key), as_of)


# shared ---------------------------------------------------------------------------


class _Listing:
    """A filtered, ordered, keyset-paginated select over an allow-list of fields."""

    def __init__(self, request: ListingRequest, fields: Sequence[Field], default_order: Sequence[OrderKey],
                 unique: Field) -> None:
        self.size = page_size(request.page_size)
        self.condition = compile_filter(request.filter, fields)
        order = parse_order_by(request.order_by, fields, default_order)
        if all(key.field.name != unique.name for key in order):
            order.append(OrderKey(unique))
        self.order = order

    def fetch(self, conn: Connection, query: Select[Any], after: Sequence[Any] | None) -> tuple[list[Any], bool]:
        """This page's rows (after the row whose sort key is `after`), and whether more follow."""
        keys = self._sort_keys()
        query = query.add_columns(*(expression.label(f"sort_key_{n}") for n, (expression, _) in enumerate(keys)))
        if self.condition is not None:
            query = query.where(self.condition)
        if after is not None:
            query = query.where(after_keyset(keys, after))
        query = query.order_by(*(e.desc() if descending else e.asc() for e, descending in keys))
        rows = list(conn.execute(query.limit(self.size + 1)).all())
        return rows[: self.size], len(rows) > self.size

    def sort_values(self, row: Any) -> list[Any]:
        """The sort key of a row `fetch` returned."""
        return [getattr(row, f"sort_key_{n}") for n in range(len(self.order))]

    def values_where(self, conn: Connection, *condition: ColumnElement[bool]) -> list[Any] | None:
        """The sort key of the one row matching condition, read from the database."""
        row = conn.execute(select(*(expression for expression, _ in self._sort_keys())).where(*condition)).first()
        return list(row) if row is not None else None

    def decode(self, values: list[Any]) -> list[Any]:
        """A sort key from a token, checked against this order's field types."""
        if len(values) != len(self.order):
            raise _bad_token()
        return [_from_json(key.field.kind, value) for key, value in zip(self.order, values)]

    def _sort_keys(self) -> list[tuple[ColumnElement[Any], bool]]:
        return [(key.field.expression, key.descending) for key in self.order]


def _resume(request: ListingRequest, query_id: dict[str, Any], token_key: bytes) -> tuple[Any, date]:
    """What the previous page's token says of its last row (None on the first page),
    and the date to compute ages on."""
    last_key = decode_token(request.page_token, query_id, token_key)
    if last_key is None:
        return None, request.as_of or datetime.now(UTC).date()
    try:
        state = json.loads(last_key)
        after, as_of = state["after"], date.fromisoformat(state["as_of"])
    except (ValueError, TypeError, KeyError):
        raise _bad_token() from None
    return after, as_of


def _next_token(last_key: Any, as_of: date, query_id: dict[str, Any], token_key: bytes) -> str:
    if last_key is None:
        return ""
    state = json.dumps({"after": last_key, "as_of": as_of.isoformat()}, separators=(",", ":"))
    return encode_token(state, query_id, token_key)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):  # PostgreSQL numerics
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _from_json(kind: FieldKind, value: Any) -> Any:
    if kind is FieldKind.STRING and isinstance(value, str):
        return value
    if kind is FieldKind.INTEGER and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is FieldKind.NUMBER and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _bad_token()


def _bad_token() -> InvalidArgument:
    return InvalidArgument.single("page_token", "not a token returned by this method")




def _iso(day: date | None) -> str:
    return day.isoformat() if day else ""
