"""Decides a batch of RegisterStudent commands inside the consumer's checkpoint transaction.

`REGISTRATIONS` declares it to the runtime (libs.worker), which decodes each record
once and dead-letters what `parse_command` rejects. A batch then goes through three
jobs: load (decisions already made, the courses and their enrollees among the
batch's emails), decide (the pure capacity rule in `domain.model`, in stream order) and
write: bulk inserts of decisions and enrollments and one executemany of conditional
seat-count updates; it returns one event per decision, which the runtime writes to the
outbox in the same transaction. The event carries what the notifier's email needs
too (each fact is written once; stats and the notifier both read it). If a course's
conditional update finds fewer seats than expected (capacity lowered meanwhile) the
transaction fails and the consumer retries the batch from its checkpoint.

Every statement is built once at import with bound parameters (expanding IN lists),
so a batch costs SQLAlchemy a cache lookup per statement, not a compilation: measured,
compiling per batch was a third of the worker's CPU.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from google.type import date_pb2
from prometheus_client import Counter, Histogram
from sqlalchemy import Connection, bindparam, insert, select, update

from coursesignup.events.v1 import events_pb2
from libs.consumer import StreamRecord
from libs.db import after_commit
from libs.envelope import MalformedRecord, new_envelope
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from libs.metrics import LAG_BUCKETS
from libs.worker import Consume, Event, Handle, Message
from services.enrollment.adapters.tables import courses, decisions, enrollments
from services.enrollment.domain.model import CourseSeats, Outcome, normalize_email

log = logging.getLogger(__name__)

_DECLINE_REASON = {
    Outcome.DECLINED_FULL: events_pb2.DECLINE_REASON_FULL,
    Outcome.DECLINED_DUPLICATE: events_pb2.DECLINE_REASON_DUPLICATE,
    Outcome.DECLINED_UNKNOWN_COURSE: events_pb2.DECLINE_REASON_UNKNOWN_COURSE,
}

_DECIDED = select(decisions.c.registration_id).where(
    decisions.c.registration_id.in_(bindparam("ids", expanding=True)))
_COURSES = select(courses.c.course_id, courses.c.campus_id, courses.c.name, courses.c.capacity,
                  courses.c.enrolled_count).where(courses.c.course_id.in_(bindparam("ids", expanding=True)))
_ENROLLED = select(enrollments.c.course_id, enrollments.c.email).where(
    enrollments.c.course_id.in_(bindparam("courses", expanding=True)),
    enrollments.c.email.in_(bindparam("emails", expanding=True)))
_INSERT_DECISIONS = insert(decisions)
_INSERT_ENROLLMENTS = insert(enrollments)
_TAKE_SEATS = (
    update(courses)
    .where(courses.c.course_id == bindparam("b_course"),
           courses.c.enrolled_count + bindparam("b_taken") <= courses.c.capacity)
    .values(enrolled_count=courses.c.enrolled_count + bindparam("b_taken"))
)


class SeatsChanged(Exception):
    """A course's seat count changed under the batch; the batch is retried."""


@dataclass(frozen=True)
class Decision:
    """One sign-up decided: what is written and what the event says."""

    record: StreamRecord
    command: events_pb2.RegisterStudent
    email: str
    outcome: Outcome
    course: CourseSeats | None


def _to_date(value: date_pb2.Date) -> dt.date:
    return dt.date(value.year, value.month, value.day)


def parse_command(envelope: events_pb2.Envelope) -> events_pb2.RegisterStudent:
    """The RegisterStudent an envelope carries, checked; MalformedRecord (to dead letters) otherwise."""
    command = envelope.register_student
    if not command.registration_id:
        raise MalformedRecord("RegisterStudent without registration_id")
    if not command.course_id:
        raise MalformedRecord("RegisterStudent without course_id")
    if "@" not in command.email:
        raise MalformedRecord("RegisterStudent without a valid email")
    try:
        _to_date(command.birth_date)
    except ValueError:
        raise MalformedRecord("RegisterStudent with an invalid birth_date") from None
    return command


def load_seats(conn: Connection, commands: list[events_pb2.RegisterStudent]) -> tuple[set[str], dict[str, CourseSeats]]:
    """The registration ids decided already, and the seats of the batch's courses."""
    already = set(conn.execute(_DECIDED, {"ids": list({c.registration_id for c in commands})}).scalars())
    seats = {
        row.course_id: CourseSeats(row.course_id, row.campus_id, row.name, row.capacity, row.enrolled_count, set())
        for row in conn.execute(_COURSES, {"ids": list({c.course_id for c in commands})})
    }
    if seats:
        emails = list({normalize_email(c.email) for c in commands})
        for row in conn.execute(_ENROLLED, {"courses": list(seats), "emails": emails}):
            seats[row.course_id].enrolled_emails.add(row.email)
    return already, seats


def decide_all(parsed: list[tuple[StreamRecord, events_pb2.RegisterStudent]], already: set[str],
               seats: dict[str, CourseSeats]) -> list[Decision]:
    """Decides each new sign-up in stream order (FIFO per course); redeliveries are skipped."""
    decided: list[Decision] = []
    for record, command in parsed:
        if command.registration_id in already:
            continue  # redelivered or retried: decided once already
        already.add(command.registration_id)
        email = normalize_email(command.email)
        course = seats.get(command.course_id)
        outcome = course.decide(email) if course else Outcome.DECLINED_UNKNOWN_COURSE
        decided.append(Decision(record, command, email, outcome, course))
    return decided


def event_for(decision: Decision, timestamp: timestamp_pb2.Timestamp) -> events_pb2.Envelope:
    """The one event a decision produces: stats projects it and the notifier emails it."""
    command, course = decision.command, decision.course
    campus_id = course.campus_id if course else ""
    course_name = course.name if course else ""
    contact_email = command.email.strip()
    if decision.outcome is Outcome.ENROLLED:
        return new_envelope(
            command.registration_id,
            time=timestamp,
            student_enrolled=events_pb2.StudentEnrolled(
                registration_id=command.registration_id,
                course_id=command.course_id,
                campus_id=campus_id,
                name=command.name,
                email=decision.email,
                birth_date=command.birth_date,
                enroll_time=timestamp,
                contact_email=contact_email,
                course_name=course_name,
                locale=command.locale,
            ),
        )
    return new_envelope(
        command.registration_id,
        time=timestamp,
        registration_declined=events_pb2.RegistrationDeclined(
            registration_id=command.registration_id,
            course_id=command.course_id,
            campus_id=campus_id,
            reason=_DECLINE_REASON[decision.outcome],
            decide_time=timestamp,
            name=command.name,
            contact_email=contact_email,
            course_name=course_name,
            locale=command.locale,
        ),
    )


def write_decisions(conn: Connection, decided: list[Decision], now: dt.datetime) -> None:
    """Records the decisions and their seats in the caller's transaction."""
    seats_taken: dict[str, int] = {}
    enrolled = [d for d in decided if d.outcome is Outcome.ENROLLED]
    for decision in enrolled:
        seats_taken[decision.command.course_id] = seats_taken.get(decision.command.course_id, 0) + 1
    conn.execute(_INSERT_DECISIONS, [
        {
            "registration_id": d.command.registration_id,
            "course_id": d.command.course_id,
            "email": d.email,
            "outcome": d.outcome.value,
            "decide_time": now,
            "shard_id": d.record.shard_id,
            "sequence_number": d.record.sequence_number,
            "worker_id": d.record.worker_id,
            "lease_counter": d.record.lease_counter,
        }
        for d in decided
    ])
    if enrolled:
        conn.execute(_INSERT_ENROLLMENTS, [
            {
                "course_id": d.command.course_id,
                "email": d.email,
                "registration_id": d.command.registration_id,
                "name": d.command.name,
                "birth_date": _to_date(d.command.birth_date),
                "enroll_time": now,
            }
            for d in enrolled
        ])
        taken = conn.execute(_TAKE_SEATS, [{"b_course": course_id, "b_taken": count}
                                           for course_id, count in sorted(seats_taken.items())])
        if taken.rowcount != len(seats_taken):
            raise SeatsChanged(sorted(seats_taken))


def decide(conn: Connection, messages: list[Message[events_pb2.RegisterStudent]]) -> list[Event]:
    """Decides a run of sign-ups; returns their events (to enrollment-events, keyed by course)."""
    parsed = [(message.record, message.body) for message in messages]
    already, seats = load_seats(conn, [command for _, command in parsed])
    decided = decide_all(parsed, already, seats)
    if not decided:
        return []
    now = dt.datetime.now(dt.UTC)
    write_decisions(conn, decided, now)
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(now)
    log.debug("batch decided", extra={"decided": len(decided), "records": len(messages)})
    after_commit(conn, lambda: _count(decided, now))
    return [Event(ENROLLMENT_EVENTS_STREAM, d.command.course_id, event_for(d, timestamp)) for d in decided]


DECISIONS = Counter("coursesignup_decisions_total", "Sign-ups decided, by outcome.", ["outcome"])
DECISION_LAG = Histogram("coursesignup_decision_lag_seconds",
                         "Time from a sign-up's acceptance by Register to its decision.", buckets=LAG_BUCKETS)


def _count(decided: list[Decision], now: dt.datetime) -> None:
    """Metrics of a committed batch (a batch rolled back and retried is counted once)."""
    decide_time = now.timestamp()
    for decision in decided:
        DECISIONS.labels(decision.outcome.value).inc()
        accepted = decision.command.accept_time
        if accepted.seconds:
            DECISION_LAG.observe(max(0.0, decide_time - accepted.seconds - accepted.nanos / 1e9))


# What the enrollment service consumes: the sign-ups, each decided by the shard's one writer.
REGISTRATIONS = Consume(REGISTRATIONS_STREAM, {"register_student": Handle(decide, parse_command)})
