"""The stats service end to end in-process: real kinesalite, both databases, a gRPC client.

The service runs through the shared bootstrap (`serve`) on this test's event loop, so
health, the error interceptor and the consumer are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import select

from coursesignup.events.v1 import events_pb2
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs import consumer as consumer_lib
from libs.db import make_engine
from libs.envelope import new_envelope
from libs.grpc_server import serve
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, OutgoingRecord, kinesis_client, put_records
from services.stats.adapters.tables import create_schema
from services.stats.bootstrap import SERVICE_NAME, build_hooks
from services.stats.domain.ages import age_on
from services.stats.domain.model import StudentEnrolled
from services.stats.service_layer.projection import add_enrollments
from services.stats.settings import StatsSettings
from tests import helpers
from tests.helpers import free_port

COURSES = {"cs101": "north", "cs102": "north", "bio1": "south"}
FEB_29_BORN = date(2004, 2, 29)


@pytest.fixture
def settings(kinesis_env, database_url, monkeypatch) -> StatsSettings:
    monkeypatch.setenv("STATS_PORT", str(free_port()))
    monkeypatch.setenv("BIND_HOST", "127.0.0.1")
    monkeypatch.setenv("STATS_DATABASE_URL", database_url)
    monkeypatch.setenv("KINESIS_SHARD_COUNT", "2")
    monkeypatch.setenv("LEASE_SECONDS", "3")
    return StatsSettings()


@contextlib.asynccontextmanager
async def running_stats_service(settings: StatsSettings) -> AsyncIterator[grpc.aio.Channel]:
    stop = asyncio.Event()
    server = asyncio.create_task(serve(build_hooks(settings), stop))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{settings.stats_port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            if server.done():
                raise AssertionError(
                    "the stats service stopped during start-up"
                ) from server.exception()
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the stats service never turned SERVING")
        yield channel
    finally:
        await channel.close()
        stop.set()
        await asyncio.wait_for(server, 30)


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _enrolled(
    registration_id: str, course_id: str, email: str, birth: date
) -> events_pb2.StudentEnrolled:
    return events_pb2.StudentEnrolled(
        registration_id=registration_id,
        course_id=course_id,
        campus_id=COURSES[course_id],
        name="Student " + email.split("@")[0],
        email=email,
        birth_date=date_pb2.Date(year=birth.year, month=birth.month, day=birth.day),
        enroll_time=_timestamp(datetime(2025, 1, 10, tzinfo=UTC)),
    )


def _enrollment_events(rng: random.Random) -> list[events_pb2.StudentEnrolled]:
    """Distinct enrollments: some students in two courses of one campus, some in both campuses."""
    people = [
        (
            f"student{n}@example.org",
            FEB_29_BORN if n % 7 == 0 else date(1960, 1, 1) + timedelta(days=rng.randrange(16000)),
        )
        for n in range(14)
    ]
    events = []
    for email, birth in people:
        for course_id in rng.sample(sorted(COURSES), rng.randint(1, 3)):
            events.append(_enrolled(f"reg-{uuid.uuid4().hex[:10]}", course_id, email, birth))
    rng.shuffle(events)
    return events


def _brute_force(events: list[events_pb2.StudentEnrolled], as_of: date) -> dict[str, tuple]:
    """(count, min age, max age, mean age) per scope name, recomputed student by student."""
    members: dict[str, dict[str, date]] = {}
    for event in events:
        birth = date(event.birth_date.year, event.birth_date.month, event.birth_date.day)
        members.setdefault(f"courses/{event.course_id}", {})[event.registration_id] = birth
        members.setdefault(f"campuses/{event.campus_id}", {})[event.email] = birth
        members.setdefault("overall", {})[event.email] = birth
    figures = {}
    for scope, births in members.items():
        ages = [age_on(b, as_of) for b in births.values()]
        figures[scope] = (len(ages), min(ages), max(ages), sum(ages) / len(ages))
    return figures


async def _figures(channel: grpc.aio.Channel, as_of: date) -> dict[str, tuple]:
    stub = stats_pb2_grpc.StatsServiceStub(channel)
    when = date_pb2.Date(year=as_of.year, month=as_of.month, day=as_of.day)
    replies = [
        await stub.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id=c, as_of=when))
        for c in COURSES
    ]
    replies += [
        await stub.GetCampusStats(stats_pb2.GetCampusStatsRequest(campus_id=c, as_of=when))
        for c in sorted(set(COURSES.values()))
    ]
    replies.append(await stub.GetOverallStats(stats_pb2.GetOverallStatsRequest(as_of=when)))
    for reply in replies:
        assert (reply.as_of.year, reply.as_of.month, reply.as_of.day) == (
            as_of.year,
            as_of.month,
            as_of.day,
        )
    return {r.scope: (r.student_count, r.min_age, r.max_age, r.average_age) for r in replies}


async def _wait_for_markers(database_url: str, marker: bytes) -> list:
    """Waits until every course's marker is a dead letter: then all before it was applied."""
    engine = make_engine(database_url)
    try:
        for _ in range(300):
            with engine.connect() as conn:
                letters = conn.execute(select(consumer_lib.dead_letters)).all()
            if {r.partition_key for r in letters if r.data == marker} == set(COURSES):
                return letters
            await asyncio.sleep(0.1)
        raise AssertionError(f"markers not consumed in time; dead letters: {len(letters)}")
    finally:
        engine.dispose()


def _markers(round_number: int) -> list[OutgoingRecord]:
    # Put after everything else on each course's shard (its partition key): once they
    # are dead letters, every record before them on that key has been applied.
    return [OutgoingRecord(course_id, b"\x00marker %d" % round_number) for course_id in COURSES]


def test_figures_equal_a_brute_force_recount_despite_redelivered_and_malformed_records(
    settings, database_url
):
    rng = random.Random(42)
    events = _enrollment_events(rng)
    north = [e for e in events if e.campus_id == "north"]
    assert len({e.email for e in north}) < len(north), (
        "some student should take two courses on one campus"
    )
    records = [
        OutgoingRecord(
            e.course_id, new_envelope(e.registration_id, student_enrolled=e).SerializeToString()
        )
        for e in events
    ]
    first_batch = [*records, records[0]]  # the outbox published one event twice
    declined = events_pb2.RegistrationDeclined(
        registration_id="reg-declined",
        course_id="cs101",
        campus_id="north",
        reason=events_pb2.DECLINE_REASON_FULL,
    )
    first_batch.append(
        OutgoingRecord(
            "cs101",
            new_envelope("reg-declined", registration_declined=declined).SerializeToString(),
        )
    )
    impossible_birthday = _enrolled("reg-bad-date", "cs102", "bad@example.org", date(2000, 1, 1))
    impossible_birthday.birth_date.month = 13
    first_batch.append(
        OutgoingRecord(
            "cs102",
            new_envelope("reg-bad-date", student_enrolled=impossible_birthday).SerializeToString(),
        )
    )
    # Later, long after they were applied: the same records again, and one event in a new envelope.
    redelivered = [
        *records[3:9],
        OutgoingRecord(
            events[1].course_id,
            new_envelope(events[1].registration_id, student_enrolled=events[1]).SerializeToString(),
        ),
    ]
    days = (date(2025, 2, 28), date(2025, 3, 1), date(2024, 2, 29), date(2031, 7, 4))

    async def scenario() -> None:
        async with running_stats_service(settings) as channel:
            client = kinesis_client(settings.aws_region)
            stream = settings.stream_name(ENROLLMENT_EVENTS_STREAM)
            assert all(await asyncio.to_thread(put_records, client, stream, first_batch))
            assert all(await asyncio.to_thread(put_records, client, stream, _markers(1)))
            letters = await _wait_for_markers(database_url, b"\x00marker 1")
            assert sorted(r.partition_key for r in letters) == ["bio1", "cs101", "cs102", "cs102"]
            for as_of in days:
                assert await _figures(channel, as_of) == _brute_force(events, as_of), as_of

            assert all(await asyncio.to_thread(put_records, client, stream, redelivered))
            assert all(await asyncio.to_thread(put_records, client, stream, _markers(2)))
            await _wait_for_markers(database_url, b"\x00marker 2")
            for as_of in days:
                assert await _figures(channel, as_of) == _brute_force(events, as_of), as_of

    asyncio.run(scenario())


def _violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details"
    found = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


def test_bad_requests_get_invalid_argument_naming_the_field_and_unknown_scopes_get_zeros(settings):
    async def scenario() -> None:
        async with running_stats_service(settings) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = stats_pb2_grpc.StatsServiceStub(channel)

            bad_calls = [
                (stub.GetCourseStats(stats_pb2.GetCourseStatsRequest()), {"course_id"}),
                (
                    stub.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id="Intro to CS")),
                    {"course_id"},
                ),
                (
                    stub.GetCourseStats(
                        stats_pb2.GetCourseStatsRequest(
                            course_id="cs101", as_of=date_pb2.Date(year=2025, month=13, day=1)
                        )
                    ),
                    {"as_of"},
                ),
                (
                    stub.GetCourseStats(
                        stats_pb2.GetCourseStatsRequest(
                            as_of=date_pb2.Date(year=2024, month=2, day=30)
                        )
                    ),
                    {"course_id", "as_of"},
                ),
                (stub.GetCampusStats(stats_pb2.GetCampusStatsRequest(campus_id="")), {"campus_id"}),
                (
                    stub.GetCampusStats(stats_pb2.GetCampusStatsRequest(campus_id="9-north")),
                    {"campus_id"},
                ),
                (
                    stub.GetOverallStats(
                        stats_pb2.GetOverallStatsRequest(
                            as_of=date_pb2.Date(year=2023, month=2, day=29)
                        )
                    ),
                    {"as_of"},
                ),
                (
                    stub.GetOverallStats(
                        stats_pb2.GetOverallStatsRequest(
                            as_of=date_pb2.Date(year=0, month=6, day=1)
                        )
                    ),
                    {"as_of"},
                ),
            ]
            for call, fields in bad_calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert set(_violations(caught.value)) == fields

            before = datetime.now(UTC).date()
            empty = await stub.GetCourseStats(
                stats_pb2.GetCourseStatsRequest(course_id="no-such-course")
            )
            after = datetime.now(UTC).date()
            assert empty.scope == "courses/no-such-course"
            assert (empty.student_count, empty.min_age, empty.max_age, empty.average_age) == (
                0,
                0,
                0,
                0.0,
            )
            assert date(empty.as_of.year, empty.as_of.month, empty.as_of.day) in {before, after}
            leap_day = await stub.GetCampusStats(
                stats_pb2.GetCampusStatsRequest(
                    campus_id="nowhere", as_of=date_pb2.Date(year=2024, month=2, day=29)
                )
            )
            assert (leap_day.scope, leap_day.student_count, leap_day.as_of.day) == (
                "campuses/nowhere",
                0,
                29,
            )

    asyncio.run(scenario())


def _seed_read_model(database_url: str) -> list[StudentEnrolled]:
    """Enrollments written straight into the read model the service reads."""
    rng = random.Random(132)
    events = [
        StudentEnrolled(
            registration_id=f"reg-{n:03d}",
            course_id=course_id,
            campus_id=COURSES[course_id],
            email=f"student{n % 23}@example.org",
            name=rng.choice(["Ana", "ana", "Zoë", "Bob", "Émile"]),
            birth_date=FEB_29_BORN if n % 5 == 0 else date(1970, 1, 1) + timedelta(days=rng.randrange(12000)),
            enroll_time=datetime(2025, 1, 10, 8, tzinfo=UTC) + timedelta(seconds=rng.randrange(40)),
        )
        for n, course_id in enumerate(rng.choice(sorted(COURSES)) for _ in range(60))
    ]
    engine = make_engine(database_url)
    try:
        create_schema(engine)
        with engine.begin() as conn:
            add_enrollments(conn, events)
    finally:
        engine.dispose()
    return events


async def _pages(call, request, size: int) -> tuple[list, list]:
    """Every item of a paginated method, and the tokens it handed out."""
    items, tokens = [], []
    while True:
        reply = await call(request, metadata=helpers.ADMIN_METADATA)
        items += list(reply.course_stats if hasattr(reply, "course_stats") else reply.enrollments)
        if not reply.next_page_token:
            return items, tokens
        tokens.append(reply.next_page_token)
        request.page_token = reply.next_page_token
        request.page_size = size


def test_dynamic_queries_page_through_everything_in_order_and_refuse_altered_tokens(settings, database_url):
    events = _seed_read_model(database_url)
    as_of = date(2025, 2, 28)
    when = date_pb2.Date(year=2025, month=2, day=28)

    async def scenario() -> None:
        async with running_stats_service(settings) as channel:
            stub = stats_pb2_grpc.StatsServiceStub(channel)

            ages = {c: [age_on(e.birth_date, as_of) for e in events if e.course_id == c] for c in COURSES}
            expected = sorted(
                (c for c in COURSES if COURSES[c] == "north" or len(ages[c]) > 100),
                key=lambda c: (-sum(ages[c]) / len(ages[c]), c),
            )
            request = stats_pb2.QueryCourseStatsRequest(
                filter='campus_id = "north" OR student_count > 100',
                order_by="average_age desc",
                page_size=1,
                as_of=when,
            )
            courses, tokens = await _pages(stub.QueryCourseStats, request, size=1)
            assert [c.course_id for c in courses] == expected
            assert len(tokens) == len(expected) - 1
            for course in courses:
                course_ages = sorted(ages[course.course_id])
                assert (course.campus_id, course.student_count, course.min_age, course.max_age) == (
                    "north", len(course_ages), course_ages[0], course_ages[-1],
                )
                assert course.average_age == sum(course_ages) / len(course_ages)
                assert course.median_age == float(statistics.median(course_ages))

            roster = sorted(
                (e for e in events if e.course_id == "cs101"),
                key=lambda e: (e.name, -e.enroll_time.timestamp(), e.registration_id),
            )
            listing = stats_pb2.ListEnrollmentsRequest(
                course_id="cs101", order_by="name, enroll_time desc", page_size=4, as_of=when
            )
            students, roster_tokens = await _pages(stub.ListEnrollments, listing, size=4)
            assert [s.registration_id for s in students] == [e.registration_id for e in roster]
            first = students[0]
            source = roster[0]
            assert (first.name, first.email, first.age) == (source.name, source.email, age_on(source.birth_date, as_of))
            assert (first.birth_date.year, first.birth_date.month, first.birth_date.day) == (
                source.birth_date.year, source.birth_date.month, source.birth_date.day,
            )
            assert first.enroll_time.ToDatetime(tzinfo=UTC) == source.enroll_time

            older = [e.registration_id for e in roster if age_on(e.birth_date, as_of) >= 30]
            filtered = await stub.ListEnrollments(
                stats_pb2.ListEnrollmentsRequest(
                    course_id="cs101", filter='age >= 30 AND enroll_time >= "2025-01-10T08:00:00Z"',
                    order_by="name, enroll_time desc", page_size=1000, as_of=when,
                ), metadata=helpers.ADMIN_METADATA)
            assert [s.registration_id for s in filtered.enrollments] == older

            bad_requests = [
                (stub.QueryCourseStats(stats_pb2.QueryCourseStatsRequest(filter="'; DROP TABLE roster; --")),
                 {"filter"}),
                (stub.QueryCourseStats(stats_pb2.QueryCourseStatsRequest(filter='student_count >= "x"')),
                 {"filter"}),
                (stub.QueryCourseStats(stats_pb2.QueryCourseStatsRequest(order_by="name")), {"order_by"}),
                (stub.QueryCourseStats(stats_pb2.QueryCourseStatsRequest(page_size=-1)), {"page_size"}),
                (stub.ListEnrollments(stats_pb2.ListEnrollmentsRequest(course_id="CS 101", filter="age >"),
                    metadata=helpers.ADMIN_METADATA),
                 {"course_id"}),
                (stub.ListEnrollments(stats_pb2.ListEnrollmentsRequest(course_id="cs101", filter="unknown = 1"),
                    metadata=helpers.ADMIN_METADATA),
                 {"filter"}),
                (stub.GetOverallStats(stats_pb2.GetOverallStatsRequest(view=7)), {"view"}),
            ]
            token = tokens[0]
            tampered = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
            for altered in (
                stats_pb2.QueryCourseStatsRequest(filter=request.filter, order_by=request.order_by, as_of=when,
                                                  page_token=tampered),
                stats_pb2.QueryCourseStatsRequest(filter='campus_id = "south"', order_by=request.order_by,
                                                  as_of=when, page_token=token),
                stats_pb2.QueryCourseStatsRequest(filter=request.filter, order_by=request.order_by,
                                                  page_token=token),
            ):
                bad_requests.append((stub.QueryCourseStats(altered), {"page_token"}))
            bad_requests.append(
                (stub.ListEnrollments(stats_pb2.ListEnrollmentsRequest(course_id="cs102", order_by=listing.order_by,
                                                                       as_of=when, page_token=roster_tokens[0]),
                                                                           metadata=helpers.ADMIN_METADATA),
                 {"page_token"})
            )
            for call, fields in bad_requests:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert set(_violations(caught.value)) == fields

            overall = await stub.GetOverallStats(
                stats_pb2.GetOverallStatsRequest(as_of=when, view=stats_pb2.AGE_STATS_VIEW_FULL)
            )
            basic = await stub.GetOverallStats(stats_pb2.GetOverallStatsRequest(as_of=when))
            histogram = {bucket.age: bucket.student_count for bucket in overall.age_histogram}
            assert sum(histogram.values()) == overall.student_count == basic.student_count == 23
            assert list(histogram) == sorted(histogram)
            assert (min(histogram), max(histogram)) == (overall.min_age, overall.max_age)
            assert basic.median_age == overall.median_age > 0
            assert not basic.age_histogram, "the histogram is only computed when asked for"

    asyncio.run(scenario())
