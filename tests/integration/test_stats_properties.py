"""Property tests of the stats read model (hypothesis, SQLite in a temporary file).

Random enrollments, redeliveries and cancellations over random birth dates (Feb 29 and
the days around it over-represented), campuses and query dates: every metric of every
course, campus and the whole school, through the metric view and through
QueryCourseStats, equals a brute-force recomputation from the live roster.
"""

from __future__ import annotations

import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from libs.db import make_engine
from services.stats.adapters.tables import create_schema
from services.stats.domain.ages import age_on
from services.stats.domain.model import OVERALL_SCOPE, StudentEnrolled, campus_scope, course_scope
from services.stats.service_layer import queries, views
from services.stats.service_layer.projection import add_enrollments, remove_enrollments

COURSES = {"cs101": "north", "cs102": "north", "ma201": "north", "bio1": "south", "art9": "south"}
CAMPUSES = sorted(set(COURSES.values()))
EMAILS = [f"student{n}@example.org" for n in range(10)]
LEAP_DAY_NEIGHBOURS = [
    date(year, month, day)
    for year in (1996, 2000, 2003, 2004, 2008)
    for month, day in ((2, 28), (3, 1))
] + [date(year, 2, 29) for year in (1996, 2000, 2004, 2008)]
INTERESTING_DAYS = [
    date(2023, 2, 28),
    date(2023, 3, 1),
    date(2024, 2, 28),
    date(2024, 2, 29),
    date(2024, 3, 1),
    date(2100, 2, 28),  # 2100 is a common year
    date(2100, 3, 1),
]
REMOVED_TIME = datetime(2025, 6, 1, tzinfo=UTC)

birth_dates = st.one_of(st.dates(date(1940, 1, 1), date(2012, 12, 31)), st.sampled_from(LEAP_DAY_NEIGHBOURS))
query_days = st.one_of(st.dates(date(1995, 1, 1), date(2040, 12, 31)), st.sampled_from(INTERESTING_DAYS))


@dataclass(frozen=True)
class Enrollment:
    course_id: str
    email: str
    birth_date: date
    minute: int  # enroll time: few distinct values, so ties fall to the registration id


enrollments = st.builds(
    Enrollment,
    course_id=st.sampled_from(sorted(COURSES)),
    email=st.sampled_from(EMAILS),
    birth_date=birth_dates,
    minute=st.integers(0, 20),
)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, list[int]]]:
    """Batches of ("add", indexes of new enrollments) and ("remove", indexes to cancel)."""
    batches: list[tuple[str, list[int]]] = []
    added = 0
    for _ in range(draw(st.integers(1, 6))):
        if added and draw(st.booleans()):
            batches.append(("remove", draw(st.lists(st.integers(0, added - 1), max_size=6))))
        else:
            size = draw(st.integers(1, 12))
            redelivered = draw(st.lists(st.integers(0, added - 1), max_size=3)) if added else []
            batches.append(("add", [*range(added, added + size), *redelivered]))
            added += size
    return batches


def _event(number: int, enrollment: Enrollment) -> StudentEnrolled:
    return StudentEnrolled(
        registration_id=f"reg-{number:03d}",
        course_id=enrollment.course_id,
        campus_id=COURSES[enrollment.course_id],
        email=enrollment.email,
        name=f"Student {number}",
        birth_date=enrollment.birth_date,
        # Later registrations may carry earlier enroll times (other shards, other workers).
        enroll_time=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(minutes=enrollment.minute),
    )


def _brute_force_ages(live: list[StudentEnrolled], as_of: date) -> dict[str, list[int]]:
    """Every scope's ages, student by student. A student counted once per campus and
    overall takes the birth date of their earliest live enrollment there."""
    courses: dict[str, list[date]] = {}
    earliest: dict[str, dict[str, StudentEnrolled]] = {}
    for event in live:
        courses.setdefault(course_scope(event.course_id), []).append(event.birth_date)
        for scope in (campus_scope(event.campus_id), OVERALL_SCOPE):
            members = earliest.setdefault(scope, {})
            current = members.get(event.email)
            if current is None or (event.enroll_time, event.registration_id) < (
                current.enroll_time,
                current.registration_id,
            ):
                members[event.email] = event
    ages = {scope: [age_on(b, as_of) for b in births] for scope, births in courses.items()}
    for scope, members in earliest.items():
        ages[scope] = [age_on(event.birth_date, as_of) for event in members.values()]
    return ages


def _expected(ages: list[int]) -> tuple[int, int, int, float, float, dict[int, int]]:
    if not ages:
        return (0, 0, 0, 0.0, 0.0, {})
    return (
        len(ages),
        min(ages),
        max(ages),
        sum(ages) / len(ages),
        float(statistics.median(ages)),
        dict(sorted(Counter(ages).items())),
    )


@settings(max_examples=60, deadline=None)
@given(
    pool=st.lists(enrollments, min_size=1, max_size=50),
    history=histories(),
    days=st.lists(query_days, min_size=1, max_size=3),
)
def test_every_metric_equals_a_brute_force_recount_after_enrollments_and_cancellations(pool, history, days):
    with tempfile.TemporaryDirectory() as directory:
        engine = make_engine(f"sqlite:///{directory}/stats.db")
        try:
            create_schema(engine)
            live: dict[str, StudentEnrolled] = {}
            cancelled: set[str] = set()
            for kind, indexes in history:
                events = [_event(n, pool[n % len(pool)]) for n in indexes]
                with engine.begin() as conn:
                    if kind == "add":
                        add_enrollments(conn, events)
                        live.update({e.registration_id: e for e in events if e.registration_id not in cancelled})
                    else:
                        remove_enrollments(conn, [e.registration_id for e in events], REMOVED_TIME)
                        cancelled.update(e.registration_id for e in events)
                        for event in events:
                            live.pop(event.registration_id, None)
            for as_of in days:
                _check_figures(engine, list(live.values()), as_of)
        finally:
            engine.dispose()


def _check_figures(engine, live: list[StudentEnrolled], as_of: date) -> None:
    ages = _brute_force_ages(live, as_of)
    scopes = [course_scope(c) for c in COURSES] + [campus_scope(c) for c in CAMPUSES] + [OVERALL_SCOPE]
    for scope in scopes:
        stats = views.age_stats(engine, scope, as_of, with_histogram=True)
        m = stats.metrics
        got = (m.student_count, m.min_age, m.max_age, m.average_age, stats.median_age, stats.histogram)
        assert got == _expected(ages.get(scope, [])), (scope, as_of)

    page = queries.query_course_stats(
        engine, queries.ListingRequest("", "", 1000, "", as_of), b"test key"
    )
    got_courses = {
        row.course_id: (row.campus_id, row.student_count, row.min_age, row.max_age, row.average_age, row.median_age)
        for row in page.items
    }
    expected_courses = {
        course_id: (COURSES[course_id], *_expected(ages[course_scope(course_id)])[:5])
        for course_id in COURSES
        if ages.get(course_scope(course_id))
    }
    assert got_courses == expected_courses, as_of
    assert [row.course_id for row in page.items] == sorted(expected_courses)
