"""Dynamic queries on both databases: AIP-160 filters give the rows a Python filter
gives, orderings and keyset pages agree with Python's sort, and hostile or malformed
requests are INVALID_ARGUMENT naming the argument and change nothing."""

from __future__ import annotations

import base64
import dataclasses
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from libs.db import make_engine
from libs.errors import InvalidArgument
from services.stats.adapters.tables import course_summaries, create_schema, metadata, roster
from services.stats.domain.ages import age_on
from services.stats.domain.model import StudentEnrolled
from services.stats.service_layer import queries
from services.stats.service_layer.projection import add_enrollments, remove_enrollments

KEY = b"test page-token key"
AS_OF = date(2025, 2, 28)
COURSES = {f"c{n:02d}": ("north", "south", "east")[n % 3] for n in range(14)}
NAMES = ["Ana", "ana", "Ångström", "Zoë", 'Quote "Q" Smith', "Back\\slash", "Bob", "bob", "Émile", "Ólafur", "Z"]
START = datetime(2025, 1, 6, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Dataset:
    engine: Any
    roster: dict[str, list[StudentEnrolled]]  # live enrollments per course


@pytest.fixture
def dataset(database_url) -> Dataset:
    """Courses of 1 to 40 students (one course emptied by cancellations), names that
    sort differently by locale and by code point, Feb 29 birthdays, equal enroll times."""
    engine = make_engine(database_url)
    create_schema(engine)
    rng = random.Random(160)
    events = []
    for index, course_id in enumerate(COURSES):
        for n in range(1 + (index * 7) % 40):
            birth = date(2004, 2, 29) if n % 11 == 0 else date(1960, 1, 1) + timedelta(days=rng.randrange(17000))
            events.append(
                StudentEnrolled(
                    registration_id=f"r-{course_id}-{n:02d}",
                    course_id=course_id,
                    campus_id=COURSES[course_id],
                    email=f"{rng.choice(['ana', 'bob', 'zoe', 'li'])}{rng.randrange(30)}@"
                    + rng.choice(["a.org", "b.net"]),
                    name=rng.choice(NAMES),
                    birth_date=birth,
                    enroll_time=START + timedelta(minutes=rng.randrange(25)),
                )
            )
    cancelled = {e.registration_id for e in events if e.course_id == "c00"} | {
        e.registration_id for e in events[::9]
    }
    with engine.begin() as conn:
        add_enrollments(conn, events)
        remove_enrollments(conn, cancelled, datetime(2025, 2, 1, tzinfo=UTC))
    live: dict[str, list[StudentEnrolled]] = {}
    for event in events:
        if event.registration_id not in cancelled:
            live.setdefault(event.course_id, []).append(event)
    yield Dataset(engine, live)
    engine.dispose()


# brute force ------------------------------------------------------------------------


def _course_records(data: Dataset) -> list[dict[str, Any]]:
    records = []
    for course_id, events in data.roster.items():
        ages = [age_on(e.birth_date, AS_OF) for e in events]
        records.append(
            {
                "course_id": course_id,
                "campus_id": COURSES[course_id],
                "student_count": len(ages),
                "min_age": min(ages),
                "max_age": max(ages),
                "average_age": sum(ages) / len(ages),
            }
        )
    return records


def _roster_records(data: Dataset, course_id: str) -> list[dict[str, Any]]:
    return [
        {
            "registration_id": e.registration_id,
            "name": e.name,
            "email": e.email,
            "age": age_on(e.birth_date, AS_OF),
            "enroll_time": e.enroll_time,
        }
        for e in data.roster.get(course_id, [])
    ]


def _sorted(records: list[dict[str, Any]], order: list[tuple[str, bool]], unique: str) -> list[Any]:
    """Python's sort by the order's keys (strings by code point), ties by the unique key."""
    ordered = sorted(records, key=lambda r: r[unique])
    for name, descending in reversed(order):
        ordered = sorted(ordered, key=lambda r: r[name], reverse=descending)
    return [r[unique] for r in ordered]


def _all_course_ids(data: Dataset, filter_text: str, order_by: str = "", size: int = 1000) -> list[str]:
    found, token = [], ""
    while True:
        page = queries.query_course_stats(
            data.engine, queries.ListingRequest(filter_text, order_by, size, token, AS_OF), KEY
        )
        found += [row.course_id for row in page.items]
        token = page.next_page_token
        if not token:
            return found


def _all_registration_ids(
    data: Dataset, course_id: str, filter_text: str, order_by: str = "", size: int = 1000
) -> list[str]:
    found, token = [], ""
    while True:
        page = queries.list_enrollments(
            data.engine, course_id, queries.ListingRequest(filter_text, order_by, size, token, AS_OF), KEY
        )
        found += [entry.registration_id for entry in page.items]
        token = page.next_page_token
        if not token:
            return found


# generated filters ------------------------------------------------------------------

Predicate = Callable[[dict[str, Any]], bool]
OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _rfc3339(moment: datetime, offset_hours: int) -> str:
    local = moment.astimezone(timezone(timedelta(hours=offset_hours)))
    text = local.isoformat()
    return text.replace("+00:00", "Z") if offset_hours == 0 else text


def restrictions(fields: dict[str, st.SearchStrategy[tuple[str, Any]]]) -> st.SearchStrategy[tuple[str, Predicate]]:
    """A comparison as filter text, with the Python predicate it stands for."""

    @st.composite
    def build(draw: st.DrawFn) -> tuple[str, Predicate]:
        name = draw(st.sampled_from(sorted(fields)))
        literal, value = draw(fields[name])
        operator = draw(st.sampled_from(sorted(OPERATORS)))
        compare = OPERATORS[operator]
        return f"{name} {operator} {literal}", lambda record: compare(record[name], value)

    return build()


def expressions(leaf: st.SearchStrategy[tuple[str, Predicate]]) -> st.SearchStrategy[tuple[str, Predicate, str]]:
    """Filters of AND, OR, NOT, - and parentheses, rendered with no more parentheses than
    AIP-160 needs (OR binds tighter than AND), so precedence is under test too.
    The third element is the node kind: leaf, not, or, and."""

    Node = tuple[str, Predicate, str]

    def extend(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
        def negate(child: tuple[str, Predicate, str], word: str) -> tuple[str, Predicate, str]:
            text, predicate, kind = child
            inner = text if kind in ("leaf", "not") else f"({text})"
            return f"{word}{inner}", lambda r: not predicate(r), "not"

        def combine(parts: list[tuple[str, Predicate, str]], operator: str) -> tuple[str, Predicate, str]:
            texts = [t if kind != "and" or operator == "AND" else f"({t})" for t, _, kind in parts]
            predicates = [p for _, p, _ in parts]
            join = all if operator == "AND" else any
            return f" {operator} ".join(texts), lambda r: join(p(r) for p in predicates), operator.lower()

        def parenthesize(child: tuple[str, Predicate, str]) -> tuple[str, Predicate, str]:
            return f"({child[0]})", child[1], "leaf"

        return st.one_of(
            st.builds(negate, children, st.sampled_from(["NOT ", "-"])),
            st.builds(combine, st.lists(children, min_size=2, max_size=3), st.sampled_from(["AND", "OR"])),
            st.builds(parenthesize, children),
        )

    leaves = st.builds(lambda pair: (pair[0], pair[1], "leaf"), leaf)
    return st.recursive(leaves, extend, max_leaves=6)


def _strings(values: list[str]) -> st.SearchStrategy[tuple[str, Any]]:
    return st.sampled_from(values).map(lambda v: (_quoted(v), v))


def _numbers(low: int, high: int) -> st.SearchStrategy[tuple[str, Any]]:
    return st.integers(low, high).map(lambda v: (str(v), v))


COURSE_FIELDS = {
    "course_id": _strings([*COURSES, "c07x", "", "C01"]),
    "campus_id": _strings(["north", "south", "east", "west", "North"]),
    "student_count": _numbers(0, 41),
    "min_age": _numbers(18, 66),
    "max_age": _numbers(18, 66),
    "average_age": st.one_of(
        st.floats(18, 66, allow_nan=False).map(lambda v: (repr(v), v)),
        st.integers(18, 66).map(lambda v: (f"{v}.0", float(v))),
    ),
}


def _roster_fields() -> dict[str, st.SearchStrategy[tuple[str, Any]]]:
    moments = [START + timedelta(minutes=m) for m in range(-1, 27, 3)]
    return {
        "name": _strings([*NAMES, "An", "ana ", ""]),
        "email": _strings(["ana1@a.org", "bob2@b.net", "zoe", "li9@a.org"]),
        "age": _numbers(15, 70),
        "enroll_time": st.tuples(st.sampled_from(moments), st.sampled_from([0, 2, -5])).map(
            lambda pair: (_quoted(_rfc3339(pair[0], pair[1])), pair[0])
        ),
    }


FILTER_SETTINGS = settings(max_examples=70, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FILTER_SETTINGS
@given(case=expressions(restrictions(COURSE_FIELDS)))
def test_course_filters_select_what_a_python_filter_selects(dataset, case):
    text, predicate, _kind = case
    records = _course_records(dataset)
    expected = sorted(r["course_id"] for r in records if predicate(r))
    assert _all_course_ids(dataset, text) == expected, text


@FILTER_SETTINGS
@given(case=expressions(restrictions(_roster_fields())), course_id=st.sampled_from(["c05", "c11", "c13"]))
def test_roster_filters_select_what_a_python_filter_selects(dataset, case, course_id):
    text, predicate, _kind = case
    records = _roster_records(dataset, course_id)
    expected = sorted(r["registration_id"] for r in records if predicate(r))
    assert sorted(_all_registration_ids(dataset, course_id, text)) == expected, text


def test_course_orderings_and_pages_agree_with_pythons_sort(dataset):
    records = _course_records(dataset)
    for order_by, order in [
        ("", []),
        ("average_age desc", [("average_age", True)]),
        ("campus_id, student_count desc", [("campus_id", False), ("student_count", True)]),
        ("min_age, max_age desc, course_id desc", [("min_age", False), ("max_age", True), ("course_id", True)]),
    ]:
        expected = _sorted(records, order, "course_id")
        for size in (1, 3, 1000):
            assert _all_course_ids(dataset, "", order_by, size) == expected, (order_by, size)
    filtered = [r for r in records if r["campus_id"] == "south" and r["student_count"] >= 10]
    assert _all_course_ids(dataset, 'campus_id = "south" AND student_count >= 10', "average_age desc", 2) == (
        _sorted(filtered, [("average_age", True)], "course_id")
    )
    assert "c00" not in _all_course_ids(dataset, ""), "a course whose students all left is not listed"


def test_roster_orderings_and_pages_agree_with_pythons_sort(dataset):
    course_id = "c11"  # the largest course (38 enrollments)
    records = _roster_records(dataset, course_id)
    assert len(records) > 20
    for order_by, order in [
        ("", [("enroll_time", False)]),
        ("name", [("name", False)]),
        ("age desc, name", [("age", True), ("name", False)]),
        ("email desc, enroll_time", [("email", True), ("enroll_time", False)]),
    ]:
        expected = _sorted(records, order, "registration_id")
        for size in (1, 4, 1000):
            assert _all_registration_ids(dataset, course_id, "", order_by, size) == expected, (order_by, size)
    assert _all_registration_ids(dataset, "c00", "") == [], "cancelled enrollments are not listed"
    assert _all_registration_ids(dataset, "no-such-course", "") == []


def test_pages_of_one_listing_keep_the_date_of_the_first_page(dataset):
    first = queries.list_enrollments(dataset.engine, "c13", queries.ListingRequest("", "age", 5, "", None), KEY)
    assert first.as_of == datetime.now(UTC).date()
    state = json.loads(json.loads(base64.urlsafe_b64decode(first.next_page_token + "==")[12:])["k"])
    assert state == {"after": first.items[-1].registration_id, "as_of": first.as_of.isoformat()}, (
        "the token carries the registration id, not names or emails"
    )


# hostile and malformed requests -------------------------------------------------------

HOSTILE_FILTERS = [
    "'; DROP TABLE roster; --",
    '"; DROP TABLE roster; --',
    'campus_id = "x"; DROP TABLE roster',
    'campus_id = "x" -- comment',
    "campus_id = sp OR 1=1",
    "1 = 1",
    'campus_id = "sp" OR 1=1',
    "student_count >= \"x\"",
    'campus_id = 5',
    "min_age = 20.5",
    "average_age > 1e400",
    "student_count > 99999999999999999999",
    "unknown = 1",
    "Campus_id = \"sp\"",
    "roster.course_id = \"c01\"",
    "campus_id.x = \"sp\"",
    "(student_count > 1",
    "student_count > 1)",
    "((((student_count > 1)))",
    "(" * 10_000 + "student_count > 1" + ")" * 10_000,
    "(" * 40 + "student_count > 1" + ")" * 40,
    "NOT " * 40 + "student_count > 1",
    "-" * 40 + "student_count > 1",
    "student_count > 1 AND " * 200 + "student_count > 1",
    "campus_id = \"a\x00b\"",
    "campus_id = \"sp\"\x00 OR student_count > 0",
    "campus_id = 'sp'",
    'campus_id = "unterminated',
    'campus_id = "bad \\n escape"',
    'campus_id: "sp"',
    'campus_id = "s*"  student_count > 1',
    "student_count > 1 AND",
    "AND student_count > 1",
    "student_count",
    "student_count =",
    "= 1",
    "student_count => 1",
    "student_count == 1",
    "student_count <> 1",
    "count(*) > 1",
    "student_count > 1 UNION SELECT * FROM roster",
    "student_count IN (1, 2)",
    "student_count > 1 and campus_id = \"x\"",
    "average_age > NaN",
    "min_age > -",
    "campus_id = \"\U0001f600\" OR",
    "\u00e9tudiant = 1",
    "\\",
]


def _table_contents(engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {
            table.name: sorted(map(tuple, conn.execute(select(table)).all()), key=repr)
            for table in metadata.sorted_tables
        }


def _violation(error: InvalidArgument) -> tuple[str, str]:
    assert len(error.violations) == 1
    return error.violations[0].field, error.violations[0].description


def test_hostile_and_malformed_filters_are_invalid_argument_and_change_nothing(dataset):
    before = _table_contents(dataset.engine)
    for text in HOSTILE_FILTERS:
        request = queries.ListingRequest(text, "", 10, "", AS_OF)
        for run in (
            lambda r: queries.query_course_stats(dataset.engine, r, KEY),
            lambda r: queries.list_enrollments(dataset.engine, "c05", r, KEY),
        ):
            with pytest.raises(InvalidArgument) as caught:
                run(request)
            field, description = _violation(caught.value)
            assert field == "filter", text
            assert description and len(description) < 300, (text, description)
    assert _table_contents(dataset.engine) == before


@pytest.mark.parametrize(
    ("filter_text", "words"),
    [
        ("unknown = 1", ["unknown field 'unknown'", "campus_id", "student_count"]),
        ('student_count >= "x"', ["student_count", "number"]),
        ("campus_id = 5", ["campus_id", "string"]),
        ("campus_id = sp", ["position 13", "double quotes"]),
        ("(" * 40 + "student_count > 1" + ")" * 40, ["deeper than 32"]),
        ("x" * 2001, ["at most 2000 characters"]),
        ("campus_id = \"\x00\"", ["control characters"]),
        ("student_count > 1 AND", ["ends too early"]),
    ],
)
def test_filter_errors_name_the_problem(dataset, filter_text, words):
    with pytest.raises(InvalidArgument) as caught:
        queries.query_course_stats(dataset.engine, queries.ListingRequest(filter_text, "", 10, "", AS_OF), KEY)
    field, description = _violation(caught.value)
    assert field == "filter"
    for word in words:
        assert word in description, description


@pytest.mark.parametrize(
    "order_by",
    ["unknown", "median_age", "student_count desc desc", "student_count, student_count", "student_count;", "1",
     "student_count DESC", "student_count asc, ", "name", "(student_count)", "x" * 501],
)
def test_bad_orderings_are_invalid_argument_naming_order_by(dataset, order_by):
    before = _table_contents(dataset.engine)
    with pytest.raises(InvalidArgument) as caught:
        queries.query_course_stats(dataset.engine, queries.ListingRequest("", order_by, 10, "", AS_OF), KEY)
    assert _violation(caught.value)[0] == "order_by"
    assert _table_contents(dataset.engine) == before


def test_tokens_are_tied_to_their_query_and_tamper_evident(dataset):
    request = queries.ListingRequest('campus_id = "south"', "average_age desc", 2, "", AS_OF)
    token = queries.query_course_stats(dataset.engine, request, KEY).next_page_token
    assert token
    changed = [
        queries.ListingRequest('campus_id = "north"', "average_age desc", 2, token, AS_OF),
        queries.ListingRequest('campus_id = "south"', "average_age", 2, token, AS_OF),
        queries.ListingRequest('campus_id = "south"', "average_age desc", 2, token, AS_OF + timedelta(days=1)),
        queries.ListingRequest('campus_id = "south"', "average_age desc", 2, token, None),
    ]
    for other in changed:
        with pytest.raises(InvalidArgument) as caught:
            queries.query_course_stats(dataset.engine, other, KEY)
        assert _violation(caught.value)[0] == "page_token"
    resumed = queries.ListingRequest('campus_id = "south"', "average_age desc", 5, token, AS_OF)
    assert queries.query_course_stats(dataset.engine, resumed, KEY).items, "a page size may change between pages"
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for position in (0, 13, len(raw) - 2):
        forged = bytearray(raw)
        forged[position] ^= 0x01
        text = base64.urlsafe_b64encode(bytes(forged)).decode().rstrip("=")
        with pytest.raises(InvalidArgument) as caught:
            queries.query_course_stats(dataset.engine, dataclasses.replace(resumed, page_token=text), KEY)
        assert _violation(caught.value)[0] == "page_token"
    for garbage in ("x", "!!!", "a" * 500, token[:-3]):
        with pytest.raises(InvalidArgument):
            queries.query_course_stats(dataset.engine, dataclasses.replace(resumed, page_token=garbage), KEY)
    with pytest.raises(InvalidArgument):
        queries.query_course_stats(dataset.engine, resumed, b"another service's key")

    roster_token = queries.list_enrollments(
        dataset.engine, "c13", queries.ListingRequest("age > 20", "name", 3, "", AS_OF), KEY
    ).next_page_token
    for course_id, request in [
        ("c12", queries.ListingRequest("age > 20", "name", 3, roster_token, AS_OF)),
        ("c13", queries.ListingRequest("age > 21", "name", 3, roster_token, AS_OF)),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            queries.list_enrollments(dataset.engine, course_id, request, KEY)
        assert _violation(caught.value)[0] == "page_token"
    with pytest.raises(InvalidArgument) as caught:
        queries.query_course_stats(dataset.engine, queries.ListingRequest("", "", -1, "", AS_OF), KEY)
    assert _violation(caught.value)[0] == "page_size"


def test_course_summaries_hold_exactly_the_courses_with_students(dataset):
    with dataset.engine.connect() as conn:
        summarized = dict(conn.execute(select(course_summaries.c.course_id, course_summaries.c.students)).all())
        live = dict(
            conn.execute(
                select(roster.c.course_id, func.count())
                .where(roster.c.removed_time.is_(None))
                .group_by(roster.c.course_id)
            ).all()
        )
    assert summarized == live
    assert "c00" not in summarized
