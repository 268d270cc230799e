"""Building blocks of the fault tests: PostgreSQL databases, load, monitors, invariant checks.

The fault tests run the real services as processes against PostgreSQL and kinesalite,
kill and pause them, and then check the invariants of DESIGN.md against the databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import os
import random
import threading
import time
import uuid
from collections import Counter, defaultdict
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
from libs.envelope import MalformedRecord, decode_envelope, new_envelope
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
    join_waitlist: bool = False


def make_applicants(rng: random.Random, courses: list[str], count: int, repeat_share: float = 0.08,
                    retry_share: float = 0.02, waitlist_share: float = 0.0) -> list[Applicant]:
    """Sign-ups over `courses`: some emails apply twice to one course (in any case), and
    some requests are sent twice with the same request_id (client retries);
    `waitlist_share` of the others ask to wait (`join_waitlist`) if the class is full."""
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
        if waitlist_share and applicant is not (applicants[-1] if applicants else None):
            applicant = dataclasses.replace(applicant, join_waitlist=rng.random() < waitlist_share)
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
    # Cancellations (`register_all(cancellations=...)`): what each CancelRegistration
    # finally answered (the status it returned, or the code of a refusal), and those that
    # failed otherwise than FAILED_PRECONDITION (a declined registration).
    cancel_answers: Counter[str] = field(default_factory=Counter)
    cancel_failures: list[tuple[str, str]] = field(default_factory=list)
    pending_without_course: int = 0  # answered INVALID_ARGUMENT: still PENDING, its course needed
    order: list[int] = field(default_factory=list)  # applicant indexes in the order Register accepted them


_RETRIED_CANCEL_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def register_all(target: str, applicants: list[Applicant], concurrency: int = 48,
                 progress: Callable[[int], None] | None = None, cancellations: int = 0,
                 rng: random.Random | None = None) -> LoadResult:
    """Registers every applicant from `concurrency` concurrent clients; retries UNAVAILABLE
    with the same request_id, like a well-behaved client.

    With `cancellations`, other clients meanwhile call CancelRegistration that many times,
    spread evenly over the load, each for a registration accepted so far (chosen with
    `rng`): a third among the latest accepted, most of them still PENDING (course_id
    given); a tenth again for a registration cancelled before (a repeated request); over a
    quarter among the recent ones that asked to wait; the others anywhere; those last two
    half without course_id (given on a retry if the answer says it is still PENDING).
    The answers are not the outcome, the stream is (LifecycleModel replays it).
    UNAVAILABLE and DEADLINE_EXCEEDED are retried; a declined registration answers
    FAILED_PRECONDITION."""
    result = LoadResult()
    choose = rng or random.Random(0)

    async def run() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = registration_pb2_grpc.RegistrationServiceStub(channel)
            queue: asyncio.Queue[int] = asyncio.Queue()
            for index in range(len(applicants)):
                queue.put_nowait(index)
            planned = iter(range(cancellations))
            cancelled: list[int] = []

            async def cancel(index: int, with_course: bool) -> None:
                registration_id, course_id = result.accepted[index], applicants[index].course_id
                for attempt in range(40):
                    request = registration_pb2.CancelRegistrationRequest(
                        registration_id=registration_id, course_id=course_id if with_course else "")
                    try:
                        reply = await stub.CancelRegistration(request, timeout=20)
                    except grpc.aio.AioRpcError as error:
                        if error.code() == grpc.StatusCode.INVALID_ARGUMENT and not with_course:
                            result.pending_without_course += 1
                            with_course = True  # still PENDING: its course is needed
                            continue
                        if error.code() in _RETRIED_CANCEL_CODES and attempt < 39:
                            await asyncio.sleep(0.2)
                            continue
                        if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                            result.cancel_failures.append((registration_id, error.code().name))
                        result.cancel_answers[error.code().name] += 1
                        return
                    status = registration_pb2.RegistrationStatus.Name(reply.status)
                    result.cancel_answers[status.removeprefix("REGISTRATION_STATUS_")] += 1
                    cancelled.append(index)
                    return

            async def canceller() -> None:
                for number in planned:
                    while (result.done < min(len(applicants), number * len(applicants) // cancellations + 1)
                           or not result.order):
                        await asyncio.sleep(0.01)
                    draw = choose.random()
                    if draw < 0.33:
                        await cancel(choose.choice(result.order[-30:]), True)
                    elif draw < 0.43 and cancelled:
                        await cancel(choose.choice(cancelled), choose.random() < 0.5)
                    elif draw < 0.7:  # likelier than most to be waiting, or promoted
                        willing = [i for i in result.order[-500:] if applicants[i].join_waitlist] or result.order
                        await cancel(choose.choice(willing), choose.random() < 0.5)
                    else:
                        await cancel(choose.choice(result.order), choose.random() < 0.5)

            async def client() -> None:
                while not queue.empty():
                    index = queue.get_nowait()
                    applicant = applicants[index]
                    request = registration_pb2.RegisterRequest(
                        name=applicant.name, email=applicant.email, course_id=applicant.course_id,
                        birth_date=date_pb2.Date(year=applicant.birth_date.year, month=applicant.birth_date.month,
                                                 day=applicant.birth_date.day),
                        request_id=applicant.request_id, join_waitlist=applicant.join_waitlist,
                    )
                    for attempt in range(20):
                        try:
                            reply = await stub.Register(request, timeout=20)
                            result.accepted[index] = reply.registration_id
                            result.order.append(index)
                            break
                        except grpc.aio.AioRpcError as error:
                            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 19:
                                result.failures[index] = error.code().name
                                break
                            await asyncio.sleep(0.2)
                    result.done += 1
                    if progress:
                        progress(result.done)

            await asyncio.gather(*(client() for _ in range(concurrency)),
                                 *(canceller() for _ in range(min(cancellations, 8))))

    asyncio.run(run())
    return result


def command_bytes(applicant: Applicant, registration_id: str) -> bytes:
    """The RegisterStudent record the registration service would put for `applicant`."""
    command = events_pb2.RegisterStudent(
        registration_id=registration_id, course_id=applicant.course_id, name=applicant.name, email=applicant.email,
        locale="en", birth_date=date_pb2.Date(year=applicant.birth_date.year, month=applicant.birth_date.month,
                                              day=applicant.birth_date.day),
        join_waitlist=applicant.join_waitlist,
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
    capacity (from the enrollment rows, independently of the counter), the counter against
    those rows and nobody waiting while a seat is free (each sample one statement, so one
    snapshot), and every shard's checkpoint, which must never move backwards."""

    def __init__(self, database_url: str, interval: float = 0.2) -> None:
        self.engine = make_engine(database_url.replace("application_name=", "application_name=monitor-"))
        self.interval = interval
        self.overbooked: list[tuple[str, int, int]] = []
        self.checkpoint_regressions: list[tuple[str, int, int]] = []
        self.miscounted: list[tuple[str, int, int]] = []  # (course, counter, enrollment rows)
        self.waiting_beside_free_seats: list[tuple[str, int, int, int]] = []  # (course, capacity, taken, waiting)
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
                "SELECT c.course_id, c.capacity, c.enrolled_count, "
                "(SELECT count(*) FROM enrollments e WHERE e.course_id = c.course_id), "
                "(SELECT count(*) FROM waitlist w WHERE w.course_id = c.course_id) FROM courses c"
            )).all()
            leases = conn.execute(sqlalchemy.text(
                "SELECT shard_id, owner, lease_counter, checkpoint FROM shard_leases"
            )).all()
        now = time.time()
        for course_id, capacity, counter, taken, waiting in seats:
            if taken > capacity:
                self.overbooked.append((course_id, capacity, taken))
            if counter != taken:
                self.miscounted.append((course_id, counter, taken))
            if waiting and taken < capacity:
                self.waiting_beside_free_seats.append((course_id, capacity, taken, waiting))
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


@dataclass(frozen=True)
class StreamedRecord:
    shard_id: str
    sequence_number: str
    partition_key: str
    data: bytes


class StreamReader:
    """Reads every shard of a stream from TRIM_HORIZON; `read` returns the records not
    returned yet, each shard's in its order (`records` holds all of them)."""

    def __init__(self, kinesis_endpoint: str, stream: str) -> None:
        self.client = kinesis_client("us-east-1", endpoint_url=kinesis_endpoint)
        self.stream = stream
        self.records: list[StreamedRecord] = []
        self._last: dict[str, str] = {}  # shard -> the last sequence number read

    def read(self) -> list[StreamedRecord]:
        new: list[StreamedRecord] = []
        for shard in self.client.list_shards(StreamName=self.stream)["Shards"]:
            shard_id = shard["ShardId"]
            where: dict[str, str] = {"ShardIteratorType": "TRIM_HORIZON"}
            if shard_id in self._last:
                where = {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": self._last[shard_id]}
            iterator = self.client.get_shard_iterator(StreamName=self.stream, ShardId=shard_id,
                                                      **where)["ShardIterator"]
            while iterator:
                page = self.client.get_records(ShardIterator=iterator, Limit=10000)
                new += [StreamedRecord(shard_id, r["SequenceNumber"], r["PartitionKey"], r["Data"])
                        for r in page["Records"]]
                if page["Records"]:
                    self._last[shard_id] = page["Records"][-1]["SequenceNumber"]
                elif not page.get("MillisBehindLatest"):
                    break
                iterator = page.get("NextShardIterator")
        self.records += new
        return new


def decoded(record: StreamedRecord) -> events_pb2.Envelope | None:
    """The record's envelope; None if it is none (poison)."""
    try:
        return decode_envelope(record.data)
    except MalformedRecord:
        return None


@dataclass
class ModelCourse:
    capacity: int
    enrolled: dict[str, str] = field(default_factory=dict)  # registration id -> student (normalized email)
    waiting: list[str] = field(default_factory=list)  # registration ids, next in line first
    students: dict[str, str] = field(default_factory=dict)  # student holding a seat or a place -> registration id


class LifecycleModel:
    """The registration rules of issue 11, replayed sequentially and written apart from the
    service's code: a course's records are applied one at a time in stream order.

    A sign-up is decided once (a redelivered or retried command changes nothing): a
    student already holding a seat or a place in the course is DECLINED_DUPLICATE; a free
    seat, with nobody waiting, ENROLLED; else WAITLISTED at the end of the line if it asked
    to wait, DECLINED_FULL if not. A cancellation ends an ENROLLED or WAITLISTED
    registration CANCELLED; the seat it frees goes at once to the head of the line; one for
    a registration decided otherwise changes nothing; one for a registration not decided
    yet is its decision (CANCELLED, it never gets a seat)."""

    def __init__(self, capacities: dict[str, int]) -> None:
        self.courses = {course_id: ModelCourse(capacity) for course_id, capacity in capacities.items()}
        self.status: dict[str, str] = {}
        self.course_of: dict[str, str] = {}
        self.student_of: dict[str, str] = {}
        self.promoted: set[str] = set()
        # (registration id, email kind) for every email the rules call for.
        self.emails: set[tuple[str, str]] = set()
        self.ever_enrolled: set[str] = set()
        self.counts: Counter[str] = Counter()

    def replay(self, records: list[StreamedRecord]) -> None:
        courses_per_shard: dict[str, set[str]] = defaultdict(set)
        for record in records:  # each shard's in order; courses never share state across shards
            envelope = decoded(record)
            if envelope is None:  # poison: the service dead-letters it
                self.counts["undecodable"] += 1
                continue
            body = envelope.WhichOneof("body")
            if body == "register_student":
                command = envelope.register_student
                courses_per_shard[record.shard_id].add(command.course_id)
                self.sign_up(command.registration_id, command.course_id, command.email, command.join_waitlist)
            elif body == "cancel_registration":
                command = envelope.cancel_registration
                courses_per_shard[record.shard_id].add(command.course_id)
                self.cancel(command.registration_id, command.course_id)
            else:
                self.counts["other"] += 1
        shards_of: Counter[str] = Counter(c for courses in courses_per_shard.values() for c in courses)
        assert all(n == 1 for n in shards_of.values()), "a course's records on one shard: their order is total"

    def sign_up(self, registration_id: str, course_id: str, email: str, join_waitlist: bool) -> None:
        if registration_id in self.status:
            self.counts["sign-up again"] += 1
            return
        self.course_of[registration_id] = course_id
        self.emails.add((registration_id, "received"))
        course = self.courses.get(course_id)
        if course is None:
            self.status[registration_id] = "DECLINED_UNKNOWN_COURSE"
            return
        student = email.strip().lower()
        self.student_of[registration_id] = student
        if student in course.students:
            outcome = "DECLINED_DUPLICATE"
        elif len(course.enrolled) < course.capacity and not course.waiting:
            outcome = "ENROLLED"
            course.enrolled[registration_id] = student
            course.students[student] = registration_id
            self.ever_enrolled.add(registration_id)
        elif join_waitlist:
            outcome = "WAITLISTED"
            course.waiting.append(registration_id)
            course.students[student] = registration_id
        else:
            outcome = "DECLINED_FULL"
        self.status[registration_id] = outcome
        self.counts[outcome] += 1
        self.emails.add((registration_id, outcome.lower().replace("_", "-")))

    def cancel(self, registration_id: str, course_id: str) -> None:
        status = self.status.get(registration_id)
        if status is None:
            self.status[registration_id] = "CANCELLED"
            self.course_of[registration_id] = course_id
            self.counts["cancelled before decided"] += 1
            return
        if self.course_of[registration_id] != course_id or status not in ("ENROLLED", "WAITLISTED"):
            self.counts[f"cancel of {status}: nothing"] += 1
            return
        course = self.courses[course_id]
        self.counts[f"cancel of {status}"] += 1
        self.status[registration_id] = "CANCELLED"
        self.emails.add((registration_id, "cancelled"))
        if status == "WAITLISTED":
            course.waiting.remove(registration_id)
            del course.students[self.student_of[registration_id]]
            return
        del course.students[course.enrolled.pop(registration_id)]
        while len(course.enrolled) < course.capacity and course.waiting:
            head = course.waiting.pop(0)
            course.enrolled[head] = self.student_of[head]
            self.status[head] = "ENROLLED"
            self.promoted.add(head)
            self.ever_enrolled.add(head)
            self.emails.add((head, "promoted"))
            self.counts["promoted"] += 1

    def position(self, registration_id: str) -> int:
        """1 = next in line; 0 unless WAITLISTED."""
        if self.status.get(registration_id) != "WAITLISTED":
            return 0
        return self.courses[self.course_of[registration_id]].waiting.index(registration_id) + 1
