"""Building blocks of the fault tests: PostgreSQL databases, load, monitors, invariant checks.

The fault tests run the real services as processes against PostgreSQL and kinesalite,
kill and pause them, and then check the invariants of DESIGN.md against the databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import sqlalchemy
from google.type import date_pb2

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.events.v1 import events_pb2
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from libs.db import make_engine
from libs.envelope import new_envelope
from libs.kinesis import OutgoingRecord, kinesis_client, put_records
from tests import helpers


def require_postgres() -> None:
    if helpers.postgres_available():
        return
    message = f"PostgreSQL not reachable at {helpers.postgres_url()} (set TEST_DATABASE_URL)"
    if os.environ.get("REQUIRE_POSTGRES") == "1":
        pytest.fail(message + "; REQUIRE_POSTGRES=1 forbids skipping")
    pytest.skip(message)


@contextlib.contextmanager
def postgres_databases(application_name: str) -> Iterator[dict[str, str]]:
    """One fresh schema per service; connections carry `application_name` so a test can
    terminate exactly the backends of this mesh."""
    require_postgres()
    with helpers.postgres_schema() as enrollment, helpers.postgres_schema() as stats, \
            helpers.postgres_schema() as notifier:
        yield {
            name: f"{url}&application_name={application_name}"
            for name, url in (("enrollment", enrollment), ("stats", stats), ("notifier", notifier))
        }


def terminate_backends(application_name: str) -> int:
    """Kills every PostgreSQL backend of the mesh (as a crashed or restarted server would)."""
    admin = sqlalchemy.create_engine(helpers.postgres_url().replace("postgresql://", "postgresql+psycopg://", 1))
    with admin.begin() as conn:
        killed = conn.execute(
            sqlalchemy.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = :name"
            ),
            {"name": application_name},
        ).scalar_one()
    admin.dispose()
    return int(killed)


@dataclass(frozen=True)
class Applicant:
    name: str
    email: str
    birth_date: dt.date
    course_id: str
    request_id: str = ""


def make_applicants(rng: random.Random, courses: list[str], count: int, repeat_share: float = 0.08,
                    retry_share: float = 0.02) -> list[Applicant]:
    """Sign-ups over `courses`: some emails apply twice to one course (in any case), and
    some requests are sent twice with the same request_id (client retries)."""
    applicants: list[Applicant] = []
    by_course: dict[str, list[Applicant]] = defaultdict(list)
    for index in range(count):
        course_id = rng.choice(courses)
        earlier = by_course[course_id]
        if earlier and rng.random() < repeat_share:
            first = rng.choice(earlier)
            applicant = Applicant(first.name, first.email.upper(), first.birth_date, course_id)
        elif applicants and rng.random() < retry_share and applicants[-1].request_id:
            applicant = applicants[-1]  # the same request again
        else:
            birth = dt.date(rng.randint(1950, 2008), rng.randint(1, 12), 1) + dt.timedelta(days=rng.randint(0, 27))
            if rng.random() < 0.01:
                birth = dt.date(rng.choice([1980, 1984, 1996, 2000, 2004]), 2, 29)
            applicant = Applicant(f"Student {index}", f"student{index}@example.com", birth, course_id,
                                  request_id=str(uuid.UUID(int=rng.getrandbits(128))))
        applicants.append(applicant)
        by_course[course_id].append(applicant)
    return applicants


def create_catalogue(target: str, capacities: dict[str, int], campus_of: Callable[[str], str]) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        for campus_id in sorted({campus_of(c) for c in capacities}):
            stub.CreateCampus(enrollment_pb2.CreateCampusRequest(
                campus=enrollment_pb2.Campus(campus_id=campus_id, name=campus_id.upper())),
                    metadata=helpers.ADMIN_METADATA)
        for course_id, capacity in capacities.items():
            stub.CreateCourse(enrollment_pb2.CreateCourseRequest(course=enrollment_pb2.Course(
                course_id=course_id, campus_id=campus_of(course_id), name=f"Course {course_id}", capacity=capacity)),
                    metadata=helpers.ADMIN_METADATA)


@dataclass
class LoadResult:
    accepted: dict[int, str] = field(default_factory=dict)  # applicant index -> registration id
    failures: dict[int, str] = field(default_factory=dict)  # applicant index -> status code name
    done: int = 0


def register_all(target: str, applicants: list[Applicant], concurrency: int = 48,
                 progress: Callable[[int], None] | None = None) -> LoadResult:
    """Registers every applicant from `concurrency` concurrent clients; retries UNAVAILABLE
    with the same request_id, like a well-behaved client."""
    result = LoadResult()

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = registration_pb2_grpc.RegistrationServiceStub(channel)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(len(applicants)):
                queue.put_nowait(index)

            async def client() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    applicant = applicants[index]
                    request = registration_pb2.RegisterRequest(
                        name=applicant.name, email=applicant.email, course_id=applicant.course_id,
                        birth_date=date_pb2.Date(year=applicant.birth_date.year, month=applicant.birth_date.month,
                                                 day=applicant.birth_date.day),
                        request_id=applicant.request_id,
                    )
                    for attempt in range(20):
                        try:
                            reply = await stub.Register(request, timeout=20)
                            result.accepted[index] = reply.registration_id
                            break
                        except grpc.aio.AioRpcError as error:
                            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                                result.failures[index] = error.code().name
                                break
                            await asyncio.sleep(0.2)
                    result.done += 1
                    if progress:
                        progress(result.done)

            await asyncio.gather(*(client() for _ in range(concurrency)))

    asyncio.run(run())
    return result


def command_bytes(applicant: Applicant, registration_id: str) -> bytes:
    """The RegisterStudent record the registration service would put for `applicant`."""
    command = events_pb2.RegisterStudent(
        registration_id=registration_id, course_id=applicant.course_id, name=applicant.name, email=applicant.email,
        locale="en", birth_date=date_pb2.Date(year=applicant.birth_date.year, month=applicant.birth_date.month,
                                              day=applicant.birth_date.day),
    )
    return new_envelope(registration_id, register_student=command).SerializeToString()


def redeliver(kinesis_endpoint: str, stream: str, applicants: list[Applicant], accepted: dict[int, str],
              rng: random.Random, count: int) -> int:
    """Puts RegisterStudent commands for already accepted registrations on the stream
    again, as an at-least-once producer or a retried PutRecords would."""
    os.environ.setdefault("AWS_ENDPOINT_URL_KINESIS", kinesis_endpoint)
    client = kinesis_client("us-east-1", endpoint_url=kinesis_endpoint)
    chosen = rng.sample(sorted(accepted), min(count, len(accepted)))
    records = [OutgoingRecord(applicants[i].course_id, command_bytes(applicants[i], accepted[i])) for i in chosen]
    assert all(put_records(client, stream, records))
    return len(records)


def put_poison(kinesis_endpoint: str, stream: str, partition_keys: list[str]) -> int:
    client = kinesis_client("us-east-1", endpoint_url=kinesis_endpoint)
    records = [OutgoingRecord(key, b"\x08\x96\x01 not an envelope " + key.encode()) for key in partition_keys]
    assert all(put_records(client, stream, records))
    return len(records)


class Monitor:
    """Samples the enrollment database while faults happen: seats taken per course against
    capacity (from the enrollment rows, independently of the counter), and every shard's
    checkpoint, which must never move backwards."""

    def __init__(self, database_url: str, interval: float = 0.2) -> None:
        self.engine = make_engine(database_url.replace("application_name=", "application_name=monitor-"))
        self.interval = interval
        self.overbooked: list[tuple[str, int, int]] = []
        self.checkpoint_regressions: list[tuple[str, int, int]] = []
        self.lease_history: dict[tuple[str, int], tuple[str | None, float]] = {}
        self.samples = 0
        self._last_checkpoint: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.engine.dispose()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError):
                self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        with self.engine.connect() as conn:
            seats = conn.execute(sqlalchemy.text(
                "SELECT c.course_id, c.capacity, count(e.email) FROM courses c "
                "LEFT JOIN enrollments e ON e.course_id = c.course_id GROUP BY c.course_id, c.capacity"
            )).all()
            leases = conn.execute(sqlalchemy.text(
                "SELECT shard_id, owner, lease_counter, checkpoint FROM shard_leases"
            )).all()
        now = time.time()
        for course_id, capacity, taken in seats:
            if taken > capacity:
                self.overbooked.append((course_id, capacity, taken))
        for shard_id, owner, counter, checkpoint in leases:
            self.lease_history.setdefault((shard_id, counter), (owner, now))
            if checkpoint is None:
                continue
            value = int(checkpoint)
            last = self._last_checkpoint.get(shard_id, 0)
            if value < last:
                self.checkpoint_regressions.append((shard_id, last, value))
            self._last_checkpoint[shard_id] = max(last, value)
        self.samples += 1


def scalar(engine: sqlalchemy.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sqlalchemy.text(sql), params).scalar_one()


def rows(engine: sqlalchemy.Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sqlalchemy.text(sql), params).all())


def expected_seats(applicants: list[Applicant], accepted: dict[int, str],
                   capacities: dict[str, int]) -> dict[str, int]:
    """min(capacity, distinct applicant emails) per course, over accepted registrations."""
    emails: dict[str, set[str]] = defaultdict(set)
    for index in accepted:
        emails[applicants[index].course_id].add(applicants[index].email.strip().lower())
    return {course: min(capacity, len(emails[course])) for course, capacity in capacities.items()}


def age_on(birth: dt.date, today: dt.date) -> int:
    return today.year - birth.year - ((birth.month, birth.day) > (today.month, today.day))
