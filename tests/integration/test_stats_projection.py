"""The stats read model on both databases: exact, idempotent, and reversible by removal."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import func, select

from libs.db import make_engine
from services.stats.adapters.tables import (
    age_buckets,
    age_totals,
    birthday_buckets,
    campus_students,
    metadata,
    roster,
    students,
)
from services.stats.domain.ages import age_on
from services.stats.domain.model import OVERALL_SCOPE, StudentEnrolled, campus_scope, course_scope
from services.stats.service_layer.projection import add_enrollments, remove_enrollments
from services.stats.service_layer.views import age_metrics

COURSES = {"cs101": "north", "cs102": "north", "ma201": "north", "bio1": "south", "art9": "south"}
AS_OF_DAYS = [
    date(2025, 2, 28),
    date(2025, 3, 1),
    date(2024, 2, 28),
    date(2024, 2, 29),
    date(2026, 11, 5),
]


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    metadata.create_all(engine)
    yield engine
    engine.dispose()


def _people(rng: random.Random, count: int) -> list[tuple[str, date]]:
    people = []
    for number in range(count):
        birth = (
            date(2000, 2, 29)
            if number % 9 == 0
            else date(1950, 1, 1) + timedelta(days=rng.randrange(20000))
        )
        people.append((f"student{number}@example.org", birth))
    return people


def _enrollments(
    rng: random.Random, people: list[tuple[str, date]], count: int
) -> list[StudentEnrolled]:
    events = []
    for number in range(count):
        email, birth = rng.choice(people)
        course_id = rng.choice(sorted(COURSES))
        events.append(
            StudentEnrolled(
                registration_id=f"r{number}",
                course_id=course_id,
                campus_id=COURSES[course_id],
                email=email,
                name=f"Student {number}",
                birth_date=birth,
                enroll_time=datetime(2025, 1, 1, tzinfo=UTC),
            )
        )
    return events


def _brute_force(
    enrolled: list[StudentEnrolled], as_of: date
) -> dict[str, tuple[int, int, int, float]]:
    """Figures per scope recomputed from the list of enrollments, one student at a time."""
    members: dict[str, dict[str, date]] = {}
    for event in enrolled:
        members.setdefault(course_scope(event.course_id), {})[event.registration_id] = (
            event.birth_date
        )
        members.setdefault(campus_scope(event.campus_id), {}).setdefault(
            event.email, event.birth_date
        )
        members.setdefault(OVERALL_SCOPE, {}).setdefault(event.email, event.birth_date)
    figures = {}
    for scope, births in members.items():
        ages = [age_on(b, as_of) for b in births.values()]
        figures[scope] = (len(ages), min(ages), max(ages), sum(ages) / len(ages))
    return figures


def _assert_exact(engine, enrolled: list[StudentEnrolled]) -> None:
    scopes = (
        [course_scope(c) for c in COURSES]
        + [campus_scope(c) for c in set(COURSES.values())]
        + [OVERALL_SCOPE]
    )
    for as_of in AS_OF_DAYS:
        expected = _brute_force(enrolled, as_of)
        for scope in scopes:
            metrics = age_metrics(engine, scope, as_of)
            got = (metrics.student_count, metrics.min_age, metrics.max_age, metrics.average_age)
            assert got == expected.get(scope, (0, 0, 0, 0.0)), (scope, as_of)


def test_statistics_equal_a_brute_force_recomputation_and_redelivery_changes_nothing(engine):
    rng = random.Random(7)
    events = _enrollments(rng, _people(rng, 60), 400)
    first, second = events[:250], events[250:]

    with engine.begin() as conn:
        assert add_enrollments(conn, first + first[:40]) == 250  # duplicates inside one batch
    with engine.begin() as conn:
        assert add_enrollments(conn, first[100:] + second) == 150  # redelivered earlier batch
    _assert_exact(engine, events)

    with engine.begin() as conn:
        assert add_enrollments(conn, events) == 0
        roster_rows = conn.execute(select(func.count()).select_from(roster)).scalar_one()
    assert roster_rows == 400
    _assert_exact(engine, events)


def test_a_student_in_two_courses_of_a_campus_counts_once_there_and_once_overall(engine):
    born = date(2001, 5, 20)
    events = [
        StudentEnrolled(
            f"r{n}",
            course,
            COURSES[course],
            "ana@example.org",
            "Ana",
            born,
            datetime(2025, 1, 1, tzinfo=UTC),
        )
        for n, course in enumerate(["cs101", "cs102", "bio1"])
    ]
    with engine.begin() as conn:
        add_enrollments(conn, events[:1])
    with engine.begin() as conn:
        add_enrollments(conn, events[1:])
    as_of = date(2025, 6, 1)
    assert age_metrics(engine, campus_scope("north"), as_of).student_count == 1
    assert age_metrics(engine, campus_scope("south"), as_of).student_count == 1
    assert age_metrics(engine, OVERALL_SCOPE, as_of).student_count == 1
    assert age_metrics(engine, course_scope("cs102"), as_of).student_count == 1
    with engine.connect() as conn:
        assert conn.execute(select(students.c.enrollments)).scalar_one() == 3


def test_removing_enrollments_brings_every_figure_back_and_redelivery_does_not_undo_it(engine):
    rng = random.Random(11)
    events = _enrollments(rng, _people(rng, 40), 300)
    removed_time = datetime(2025, 2, 1, tzinfo=UTC)
    with engine.begin() as conn:
        add_enrollments(conn, events)
    cancelled = set(rng.sample([e.registration_id for e in events], 120))
    with engine.begin() as conn:
        assert remove_enrollments(conn, [*cancelled, "never-enrolled"], removed_time) == 120
        assert remove_enrollments(conn, cancelled, removed_time) == 0  # a removal redelivered
    with engine.begin() as conn:
        assert add_enrollments(conn, events) == 0  # a late redelivery of the enrollments
    remaining = [e for e in events if e.registration_id not in cancelled]
    _assert_exact(engine, remaining)

    with engine.begin() as conn:
        remove_enrollments(conn, [e.registration_id for e in remaining], removed_time)
    _assert_exact(engine, [])
    with engine.connect() as conn:
        for table in (age_buckets, birthday_buckets, age_totals, campus_students, students):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0, (
                table.name
            )
        assert conn.execute(select(func.count()).select_from(roster)).scalar_one() == 300


def test_two_workers_enrolling_one_student_at_once_count_them_once_and_keep_both_enrollments(engine):
    """Courses on different shards are projected by different workers, concurrently. The
    second worker waits for the first one's lock on the student, then recounts the
    student from a roster that includes the first one's enrollment."""
    import threading
    import time

    born = date(1999, 9, 9)

    def enrolled(number: int, course_id: str, minute: int) -> StudentEnrolled:
        return StudentEnrolled(
            f"r{number}", course_id, COURSES[course_id], "ana@example.org", "Ana", born,
            datetime(2025, 1, 1, 0, minute, tzinfo=UTC),
        )

    first = engine.connect()
    transaction = first.begin()
    add_enrollments(first, [enrolled(1, "cs101", minute=5)])
    second_done = threading.Event()

    def second_worker() -> None:
        with engine.begin() as conn:
            add_enrollments(conn, [enrolled(2, "cs102", minute=1)])
        second_done.set()

    thread = threading.Thread(target=second_worker)
    thread.start()
    time.sleep(0.5)
    assert not second_done.is_set(), "the second worker should wait for the first one's lock"
    transaction.commit()
    first.close()
    thread.join(30)
    assert second_done.is_set()

    as_of = date(2025, 6, 1)
    for scope in (campus_scope("north"), OVERALL_SCOPE):
        assert age_metrics(engine, scope, as_of).student_count == 1, scope
    with engine.connect() as conn:
        assert conn.execute(select(campus_students.c.enrollments)).scalar_one() == 2
        assert conn.execute(select(students.c.enrollments)).scalar_one() == 2
    with engine.begin() as conn:
        remove_enrollments(conn, ["r2"], datetime(2025, 2, 1, tzinfo=UTC))
    assert age_metrics(engine, OVERALL_SCOPE, as_of).student_count == 1, "still enrolled in cs101"
