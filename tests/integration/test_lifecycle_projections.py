"""Statistics and emails follow the registration lifecycle (issue 11), on SQLite and
PostgreSQL: the events the enrollment decider and UpdateCourse really produce (waitlisted,
promoted, cancelled) go through the stats and notifier consumers' dispatch, redelivered;
the figures equal a brute-force count of the enrollments that stand, a rebuild from the
enrollment service ends identical to the live projection, and each email is owed once."""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter

import pytest
from google.type import date_pb2
from sqlalchemy import select

from coursesignup.events.v1 import events_pb2
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.envelope import decode_envelope, new_envelope
from libs.worker import dispatch
from services.enrollment.adapters import tables as enrollment_tables
from services.enrollment.service_layer import catalogue
from services.enrollment.service_layer.deciding import REGISTRATIONS
from services.notifier.adapters import repository as notifier_repository
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.entrypoints import stream as notifier_stream
from services.stats.adapters.enrollment_export import EnrollmentExport
from services.stats.adapters.tables import create_schema
from services.stats.domain.ages import age_on
from services.stats.service_layer import views
from services.stats.service_layer.projection import ENROLLMENT_EVENTS as STATS_EVENTS
from services.stats.service_layer.rebuild import rebuild_from_enrollments
from tests import helpers
from tests.integration.test_stats_rebuild import _contents

AS_OF = dt.date(2026, 6, 1)
COURSES = {"c1": ("north", 3), "c2": ("north", 2), "c3": ("south", 2)}


@pytest.fixture
def enrollment_url(database_url, tmp_path):
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'enrollment.db'}"
    else:
        with helpers.postgres_schema() as url:
            yield url


@pytest.fixture
def enrollment(enrollment_url):
    engine = make_engine(enrollment_url)
    for meta in (enrollment_tables.metadata, consumer_lib.metadata, outbox_lib.metadata):
        meta.create_all(engine)
    for campus in ("north", "south"):
        catalogue.create_campus(engine, campus, campus.title())
    for course_id, (campus, capacity) in COURSES.items():
        catalogue.create_course(engine, course_id, campus, course_id.upper(), capacity)
    yield engine
    engine.dispose()


@pytest.fixture
def stats(database_url):
    engine = make_engine(database_url)
    create_schema(engine)
    consumer_lib.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _records(stream: str, payloads: list[bytes], start: int) -> list[StreamRecord]:
    now = dt.datetime.now(dt.UTC)
    return [StreamRecord(stream, "shard-0", str(start + i), "k", data, now) for i, data in enumerate(payloads)]


def _history(enrollment) -> None:
    """Sign-ups (some waiting), cancellations of each kind and capacity rises, decided for real."""
    rng = random.Random(12)
    people = [(f"student{i}@example.org",
               dt.date(1960 + rng.randrange(45), 1 + rng.randrange(12), 1 + rng.randrange(28))) for i in range(14)]
    payloads: list[bytes] = []
    ids: list[tuple[str, str]] = []
    for number in range(40):
        email, born = rng.choice(people)
        course_id = rng.choice(sorted(COURSES))
        registration_id = f"reg-{number:03d}"
        ids.append((registration_id, course_id))
        body = events_pb2.RegisterStudent(
            registration_id=registration_id, course_id=course_id, name=f"Student {number}", email=email,
            birth_date=date_pb2.Date(year=born.year, month=born.month, day=born.day),
            locale="pt-BR" if number % 2 else "en", course_name=course_id.upper(), join_waitlist=number % 3 != 0)
        payloads.append(new_envelope(registration_id, register_student=body).SerializeToString())
    for registration_id, course_id in rng.sample(ids, 14):
        body = events_pb2.CancelRegistration(registration_id=registration_id, course_id=course_id)
        payloads.append(new_envelope(registration_id, cancel_registration=body).SerializeToString())
    sequence = 100
    for start in range(0, len(payloads), 9):
        batch = _records("registrations", payloads[start:start + 9], sequence)
        sequence += len(batch)
        with enrollment.begin() as conn:
            dispatch(conn, batch, REGISTRATIONS, lambda base: base)
        if start == 27:
            catalogue.update_course(enrollment, "c1", "", 5, ["capacity"])
    catalogue.update_course(enrollment, "c2", "", 4, ["capacity"])


def _published(enrollment) -> list[bytes]:
    with enrollment.connect() as conn:
        return list(conn.execute(select(outbox_lib.outbox.c.data).order_by(outbox_lib.outbox.c.id)).scalars())


def _project(stats, published: list[bytes]) -> None:
    """The events in order, in batches, each batch delivered twice (a redelivery)."""
    for start in range(0, len(published), 7):
        batch = _records("enrollment-events", published[start:start + 7], 1000 + start)
        for _ in range(2):
            with stats.begin() as conn:
                dispatch(conn, batch, STATS_EVENTS)


def _brute_force(enrollment, scope_filter) -> tuple[int, int, int]:
    """(students, min age, max age) of the enrollments that stand, distinct students by email."""
    query = (select(enrollment_tables.enrollments.c.email, enrollment_tables.enrollments.c.birth_date,
                    enrollment_tables.enrollments.c.enroll_time, enrollment_tables.enrollments.c.registration_id,
                    enrollment_tables.courses.c.course_id, enrollment_tables.courses.c.campus_id)
             .join(enrollment_tables.courses))
    with enrollment.connect() as conn:
        rows = [row for row in conn.execute(query) if scope_filter(row)]
    first: dict[str, tuple] = {}
    for row in sorted(rows, key=lambda r: (r.enroll_time, r.registration_id)):
        first.setdefault(row.email, row)
    ages = [age_on(row.birth_date, AS_OF) for row in first.values()]
    return (len(ages), min(ages, default=0), max(ages, default=0))


def _figures(stats, scope: str) -> tuple[int, int, int]:
    metrics = views.age_stats(stats, scope, AS_OF).metrics
    return (metrics.student_count, metrics.min_age, metrics.max_age)


def test_statistics_follow_cancellations_and_promotions_and_a_rebuild_ends_identical(enrollment, stats,
                                                                                     enrollment_url, kinesis_env):
    _history(enrollment)
    published = _published(enrollment)
    kinds = Counter(decode_envelope(data).WhichOneof("body") for data in published)
    promotions = sum(1 for data in published if decode_envelope(data).student_enrolled.promoted)
    seat_freed = sum(1 for data in published if decode_envelope(data).registration_cancelled.seat_freed)
    assert kinds["registration_waitlisted"] and promotions and seat_freed, kinds
    assert seat_freed < kinds["registration_cancelled"], "some cancellations were of waiting registrations"

    _project(stats, published)
    for course_id in COURSES:
        assert _figures(stats, f"course:{course_id}") == _brute_force(
            enrollment, lambda r, c=course_id: r.course_id == c)
    for campus in ("north", "south"):
        assert _figures(stats, f"campus:{campus}") == _brute_force(enrollment, lambda r, c=campus: r.campus_id == c)
    assert _figures(stats, "overall") == _brute_force(enrollment, lambda r: True)
    with enrollment.connect() as conn:
        waiting = conn.execute(select(enrollment_tables.waitlist.c.registration_id)).scalars().all()
    live = _contents(stats)
    assert waiting and not {row[0] for row in live["roster"]} & set(waiting), "waitlisted students are not counted"

    with helpers.serve_enrollment(enrollment_url) as target:
        rebuild_from_enrollments(stats, EnrollmentExport(target, helpers.ADMIN_TOKEN, page_size=5))
    assert _contents(stats) == live


@pytest.fixture
def notifier(database_url):
    engine = make_engine(database_url)
    notifier_repository.metadata.create_all(engine)
    consumer_lib.metadata.create_all(engine)
    yield engine
    engine.dispose()


def test_waitlisted_promoted_and_cancelled_are_emailed_once_each_in_both_locales(enrollment, notifier):
    _history(enrollment)
    published = _published(enrollment)
    for _ in range(2):  # the whole stream delivered twice
        with notifier.begin() as conn:
            dispatch(conn, _records("enrollment-events", published, 5000), notifier_stream.ENROLLMENT_EVENTS)
    with notifier.connect() as conn:
        rows = list(conn.execute(select(notifier_repository.notifications)))
    owed = Counter((row.registration_id, row.kind) for row in rows)
    assert set(owed.values()) == {1}, "one email per (registration, kind)"

    events = [decode_envelope(data) for data in published]
    expected = Counter()
    for event in events:
        kind = event.WhichOneof("body")
        if kind == "registration_waitlisted":
            expected["WAITLISTED"] += 1
        elif kind == "registration_cancelled":
            expected["CANCELLED"] += 1
        elif kind == "student_enrolled":
            expected["PROMOTED" if event.student_enrolled.promoted else "ENROLLED"] += 1
        elif event.registration_declined.reason == events_pb2.DECLINE_REASON_FULL:
            expected["DECLINED_FULL"] += 1
        else:
            expected["DECLINED_DUPLICATE"] += 1
    assert Counter(row.kind for row in rows) == expected
    assert expected["WAITLISTED"] and expected["PROMOTED"] and expected["CANCELLED"]
    positions = {event.registration_waitlisted.registration_id: event.registration_waitlisted.waitlist_position
                 for event in events if event.WhichOneof("body") == "registration_waitlisted"}
    assert {row.registration_id: row.waitlist_position for row in rows if row.kind == "WAITLISTED"} == positions
    assert all(row.recipient.endswith("@example.org") for row in rows)

    renderer = TemplateRenderer()
    store = notifier_repository.NotificationStore(notifier)
    claimed = store.claim_due(now=dt.datetime.now(dt.UTC).timestamp() + 1, limit=1000, lease_seconds=60)
    locales_seen: Counter[tuple[str, str]] = Counter()
    for claim in claimed:
        notification = claim.notification
        if notification.kind.value not in ("WAITLISTED", "PROMOTED", "CANCELLED"):
            continue
        email = renderer.render(notification)
        locales_seen[(notification.kind.value, notification.locale)] += 1
        if notification.kind.value == "WAITLISTED":
            number = str(notification.waitlist_position)
            assert number in email.subject and number in email.text and number in email.html
        if notification.locale == "pt-BR":
            assert {"WAITLISTED": "espera", "PROMOTED": "vaga", "CANCELLED": "cancelada"}[notification.kind.value] \
                in email.text
        else:
            assert {"WAITLISTED": "waiting list", "PROMOTED": "seat", "CANCELLED": "cancelled"}[
                notification.kind.value] in email.text
    assert {kind for kind, _ in locales_seen} == {"WAITLISTED", "PROMOTED", "CANCELLED"}
    assert {locale for _, locale in locales_seen} == {"en", "pt-BR"}


def test_a_cancellation_never_decided_is_not_emailed_and_registrations_commands_are_ignored(notifier):
    early = events_pb2.RegistrationCancelled(registration_id="reg-x", course_id="c1", seat_freed=False)
    command = events_pb2.CancelRegistration(registration_id="reg-x", course_id="c1")
    with notifier.begin() as conn:
        dispatch(conn, _records("enrollment-events", [
            new_envelope("reg-x", registration_cancelled=early).SerializeToString()], 1),
            notifier_stream.ENROLLMENT_EVENTS)
        dispatch(conn, _records("registrations", [
            new_envelope("reg-x", cancel_registration=command).SerializeToString()], 1),
            notifier_stream.REGISTRATIONS)
    with notifier.connect() as conn:
        assert conn.execute(select(notifier_repository.notifications)).all() == []
        assert conn.execute(select(consumer_lib.dead_letters)).all() == []


def test_a_cancellation_reaching_stats_before_its_enrollment_keeps_it_out(stats):
    born = date_pb2.Date(year=1990, month=3, day=4)
    cancelled = events_pb2.RegistrationCancelled(
        registration_id="reg-late", course_id="c1", campus_id="north", seat_freed=True, email="late@example.org",
        birth_date=born)
    cancelled.cancel_time.GetCurrentTime()
    enrolled = events_pb2.StudentEnrolled(
        registration_id="reg-late", course_id="c1", campus_id="north", name="Late", email="late@example.org",
        birth_date=born)
    enrolled.enroll_time.GetCurrentTime()
    kept = events_pb2.StudentEnrolled(
        registration_id="reg-kept", course_id="c1", campus_id="north", name="Kept", email="kept@example.org",
        birth_date=born)
    kept.enroll_time.GetCurrentTime()
    with stats.begin() as conn:  # delivered once: a redelivered cancellation would hide a missing tombstone
        dispatch(conn, _records("enrollment-events", [
            new_envelope("reg-late", registration_cancelled=cancelled).SerializeToString(),
            new_envelope("reg-late", student_enrolled=enrolled).SerializeToString(),
            new_envelope("reg-kept", student_enrolled=kept).SerializeToString()], 1), STATS_EVENTS)
    for scope in ("course:c1", "campus:north", "overall"):
        assert _figures(stats, scope)[0] == 1, scope
    waitlisted = events_pb2.RegistrationWaitlisted(registration_id="reg-wait", course_id="c1", waitlist_position=1)
    _project(stats, [new_envelope("reg-wait", registration_waitlisted=waitlisted).SerializeToString()])
    assert _figures(stats, "course:c1")[0] == 1
    with stats.connect() as conn:
        assert conn.execute(select(consumer_lib.dead_letters)).all() == []
