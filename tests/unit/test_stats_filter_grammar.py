"""The AIP-160 filter and AIP-132 order_by parser (libs.aip_filter), without a database:
what a filter compiles to, and the errors clients get."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import Integer, String, column
from sqlalchemy.dialects import sqlite

from libs.aip_filter import Field, FieldKind, OrderKey, compile_filter, parse_order_by
from libs.errors import InvalidArgument

FIELDS = [
    Field("campus_id", FieldKind.STRING, column("campus_id", String)),
    Field("student_count", FieldKind.INTEGER, column("students", Integer)),
    Field("average_age", FieldKind.NUMBER, column("average_age", Integer)),
    Field("enroll_time", FieldKind.TIMESTAMP, column("enroll_time", String), sortable=False),
]


def _sql(text: str) -> tuple[str, dict]:
    compiled = compile_filter(text, FIELDS).compile(dialect=sqlite.dialect())
    return str(compiled), compiled.params


def test_or_binds_tighter_than_and_as_aip_160_says():
    sql, params = _sql('campus_id = "a" AND campus_id = "b" OR student_count > 3')
    assert sql == "campus_id = ? AND (campus_id = ? OR students > ?)"
    assert params == {"campus_id_1": "a", "campus_id_2": "b", "students_1": 3}


def test_not_and_minus_negate_and_parentheses_group():
    assert _sql('NOT (campus_id = "a" AND student_count = 1)')[0] == "NOT (campus_id = ? AND students = ?)"
    assert _sql("-student_count = 1")[0] == "students != ?"
    assert _sql("student_count > -1")[1] == {"students_1": -1}


def test_literals_are_bound_as_typed_parameters_never_spliced_into_sql():
    sql, params = _sql('campus_id = "x\\" OR 1=1; --" AND average_age >= 20.5')
    assert sql == "campus_id = ? AND average_age >= ?"
    assert params == {"campus_id_1": 'x" OR 1=1; --', "average_age_1": 20.5}


def test_timestamps_are_rfc_3339_and_compared_in_utc():
    _, params = _sql('enroll_time >= "2025-03-01T09:30:00-03:00"')
    assert params == {"enroll_time_1": datetime(2025, 3, 1, 12, 30, tzinfo=UTC)}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unknown = 1", "unknown field 'unknown'; filterable fields: average_age, campus_id, enroll_time, student"),
        ('student_count >= "x"', "student_count is a whole number: compare it with a number, not a string"),
        ("campus_id = 1", "campus_id is a string: compare it with a string in double quotes"),
        ("student_count = 1.5", "student_count is a whole number: '1.5' is not one"),
        ('enroll_time < "yesterday"', "enroll_time is a timestamp: write it in RFC 3339"),
        ("campus_id = sp", "unexpected 'sp' at position 13"),
        ('campus_id : "sp"', "the ':' (has) operator is not supported"),
        ("student_count > 1 AND", "the text ends too early"),
        ("'; DROP TABLE roster; --", "unexpected \"'\" at position 1; strings go in double quotes"),
    ],
)
def test_errors_name_the_argument_and_the_problem(text, expected):
    with pytest.raises(InvalidArgument) as caught:
        compile_filter(text, FIELDS)
    [violation] = caught.value.violations
    assert violation.field == "filter"
    assert violation.description.startswith(expected), violation.description


def test_nesting_and_length_are_limited_before_anything_deep_is_built():
    with pytest.raises(InvalidArgument, match="deeper than 32"):
        compile_filter("(" * 33 + "student_count = 1" + ")" * 33, FIELDS)
    assert compile_filter("(" * 32 + "student_count = 1" + ")" * 32, FIELDS) is not None
    with pytest.raises(InvalidArgument, match="at most 2000 characters"):
        compile_filter("(" * 10_000 + "student_count = 1" + ")" * 10_000, FIELDS)
    assert compile_filter("   ", FIELDS) is None


def test_order_by_follows_aip_132():
    keys = parse_order_by(" average_age desc ,campus_id", FIELDS, [])
    assert [(k.field.name, k.descending) for k in keys] == [("average_age", True), ("campus_id", False)]
    default = [OrderKey(FIELDS[0])]
    assert parse_order_by("", FIELDS, default) == default
    for bad, message in [
        ("enroll_time", "cannot order by 'enroll_time'"),
        ("campus_id, campus_id", "campus_id appears twice"),
        ("campus_id DESC", "unexpected 'DESC'"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            parse_order_by(bad, FIELDS, [])
        assert caught.value.violations[0].field == "order_by"
        assert caught.value.violations[0].description.startswith(message), caught.value.violations[0].description
