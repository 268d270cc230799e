"""Decides a batch of RegisterStudent and CancelRegistration commands inside the consumer's
checkpoint transaction.

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

The batch's courses are locked first (service_layer.waitlist: UpdateCourse promoting into
new seats takes the same lock), so seats and waiting lists are read and written by one
transaction at a time. A full course puts a sign-up that asked for it on the waiting
list (WAITLISTED, with its position). A cancellation (rarer: one at a time, in stream
order between the runs of sign-ups) frees an enrolled seat, which goes to the head of
the waiting list in the same transaction, or takes a place off the waiting list; one for
a registration already cancelled or declined changes nothing (a redelivery, a second
request), and one for a registration never decided is recorded as its decision, so the
sign-up, if it ever arrives, never takes a seat.

Every statement is built once at import with bound parameters (expanding IN lists),
so a batch costs SQLAlchemy a cache lookup per statement, not a compilation: measured,
compiling per batch was a third of the worker's CPU.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from google.protobuf import timestamp_pb2
from google.type import date_pb2
from prometheus_client import Counter, Histogram
from sqlalchemy import Connection, bindparam, delete, insert, select, update

from coursesignup.events.v1 import events_pb2
from libs.consumer import StreamRecord
from libs.db import after_commit
from libs.envelope import MalformedRecord, new_envelope
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from libs.metrics import LAG_BUCKETS
from libs.proto_time import date_message
from libs.worker import Consume, Event, Handle, Message
from services.enrollment.adapters.tables import courses, decisions, enrollments, waitlist
from services.enrollment.domain.model import ACTIVE, CourseSeats, Outcome, normalize_email
from services.enrollment.service_layer.waitlist import SeatsChanged, lock_courses, promote, waiting_lists

log = logging.getLogger(__name__)

_DECLINE_REASON = {
    Outcome.DECLINED_FULL: events_pb2.DECLINE_REASON_FULL,
    Outcome.DECLINED_DUPLICATE: events_pb2.DECLINE_REASON_DUPLICATE,
    Outcome.DECLINED_UNKNOWN_COURSE: events_pb2.DECLINE_REASON_UNKNOWN_COURSE,
}

_DECIDED = select(decisions.c.registration_id).where(
    decisions.c.registration_id.in_(bindparam("ids", expanding=True)))
_ENROLLED = select(enrollments.c.course_id, enrollments.c.email).where(
    enrollments.c.course_id.in_(bindparam("courses", expanding=True)),
    enrollments.c.email.in_(bindparam("emails", expanding=True)))
_WAITING = select(waitlist.c.course_id, waitlist.c.email).where(
    waitlist.c.course_id.in_(bindparam("courses", expanding=True)),
    waitlist.c.email.in_(bindparam("emails", expanding=True)))
_INSERT_DECISIONS = insert(decisions)
_INSERT_ENROLLMENTS = insert(enrollments)
_INSERT_WAITLIST = insert(waitlist)
_TAKE_SEATS = (
    update(courses)
    .where(courses.c.course_id == bindparam("b_course"),
           courses.c.enrolled_count + bindparam("b_taken") <= courses.c.capacity)
    .values(enrolled_count=courses.c.enrolled_count + bindparam("b_taken"))
)

__all__ = ["REGISTRATIONS", "SeatsChanged", "cancel", "decide"]


@dataclass(frozen=True)
class Decision:
    """One sign-up decided: what is written and what the event says."""

    record: StreamRecord
    command: events_pb2.RegisterStudent
    email: str
    outcome: Outcome
    course: CourseSeats | None
    # WAITLISTED: the place's order key and its position when it joined.
    seq: int = 0
    position: int = 0


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
    """The registration ids decided already, and the seats of the batch's courses (locked)."""
    already = set(conn.execute(_DECIDED, {"ids": list({c.registration_id for c in commands})}).scalars())
    seats = {
        row.course_id: CourseSeats(row.course_id, row.campus_id, row.name, row.capacity, row.enrolled_count, set())
        for row in lock_courses(conn, [c.course_id for c in commands]).values()
    }
    if seats:
        emails = list({normalize_email(c.email) for c in commands})
        for query in (_ENROLLED, _WAITING):
            for row in conn.execute(query, {"courses": list(seats), "emails": emails}):
                seats[row.course_id].enrolled_emails.add(row.email)
        for course_id, (waiting, last_seq) in waiting_lists(conn, list(seats)).items():
            seats[course_id].waiting, seats[course_id].last_seq = waiting, last_seq
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
        outcome = course.decide(email, command.join_waitlist) if course else Outcome.DECLINED_UNKNOWN_COURSE
        if outcome is Outcome.WAITLISTED and course is not None:
            decided.append(Decision(record, command, email, outcome, course, course.last_seq, course.waiting))
        else:
            decided.append(Decision(record, command, email, outcome, course))
    return decided


def event_for(decision: Decision, timestamp: timestamp_pb2.Timestamp) -> events_pb2.Envelope:
    """The one event a decision produces: stats projects it and the notifier emails it."""
    command, course = decision.command, decision.course
    campus_id = course.campus_id if course else ""
    course_name = course.name if course else ""
    contact_email = command.email.strip()
    if decision.outcome is Outcome.WAITLISTED:
        return new_envelope(
            command.registration_id,
            time=timestamp,
            registration_waitlisted=events_pb2.RegistrationWaitlisted(
                registration_id=command.registration_id,
                course_id=command.course_id,
                campus_id=campus_id,
                waitlist_position=decision.position,
                decide_time=timestamp,
                name=command.name,
                contact_email=contact_email,
                course_name=course_name,
                locale=command.locale,
            ),
        )
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
                accept_time=command.accept_time,
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
            "create_time": _accept_time(d.command),
            "promoted": False,
            "name": d.command.name,
        }
        for d in decided
    ])
    waiting = [d for d in decided if d.outcome is Outcome.WAITLISTED]
    if waiting:
        conn.execute(_INSERT_WAITLIST, [
            {
                "registration_id": d.command.registration_id,
                "course_id": d.command.course_id,
                "seq": d.seq,
                "email": d.email,
                "contact_email": d.command.email.strip(),
                "name": d.command.name,
                "birth_date": _to_date(d.command.birth_date),
                "locale": d.command.locale,
                "accept_time": _accept_time(d.command),
                "wait_time": now,
            }
            for d in waiting
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
                "contact_email": d.command.email.strip(),
                "locale": d.command.locale,
            }
            for d in enrolled
        ])
        taken = conn.execute(_TAKE_SEATS, [{"b_course": course_id, "b_taken": count}
                                           for course_id, count in sorted(seats_taken.items())])
        if taken.rowcount != len(seats_taken):
            raise SeatsChanged(sorted(seats_taken))


def _accept_time(command: events_pb2.RegisterStudent) -> dt.datetime | None:
    accepted = command.accept_time
    return accepted.ToDatetime(tzinfo=dt.UTC) if accepted.seconds or accepted.nanos else None


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


def parse_cancellation(envelope: events_pb2.Envelope) -> events_pb2.CancelRegistration:
    """The CancelRegistration an envelope carries, checked; MalformedRecord (to dead letters) otherwise."""
    command = envelope.cancel_registration
    if not command.registration_id or len(command.registration_id) > 64:
        raise MalformedRecord("CancelRegistration without a valid registration_id")
    if not command.course_id:
        raise MalformedRecord("CancelRegistration without course_id")
    return command


_DECISION_FOR_UPDATE = select(decisions.c.outcome, decisions.c.course_id).where(
    decisions.c.registration_id == bindparam("id"))
_UNSEAT = delete(enrollments).where(enrollments.c.registration_id == bindparam("id")).returning(
    enrollments.c.email, enrollments.c.name, enrollments.c.birth_date, enrollments.c.contact_email,
    enrollments.c.locale)
_UNWAIT = delete(waitlist).where(waitlist.c.registration_id == bindparam("id")).returning(
    waitlist.c.email, waitlist.c.name, waitlist.c.contact_email, waitlist.c.locale)
_MARK_CANCELLED = update(decisions).where(decisions.c.registration_id == bindparam("b_id")).values(
    outcome=Outcome.CANCELLED.value)
_FREE_SEAT = (
    update(courses)
    .where(courses.c.course_id == bindparam("b_course"), courses.c.enrolled_count > 0)
    .values(enrolled_count=courses.c.enrolled_count - 1)
)


def cancel(conn: Connection, messages: list[Message[events_pb2.CancelRegistration]]) -> list[Event]:
    """Applies a run of cancellations in stream order; returns their events (and the promotions')."""
    events: list[Event] = []
    now = dt.datetime.now(dt.UTC)
    when = timestamp_pb2.Timestamp()
    when.FromDatetime(now)
    for message in messages:
        events.extend(_cancel_one(conn, message.record, message.body, now, when))
    return events


def _cancel_one(conn: Connection, record: StreamRecord, command: events_pb2.CancelRegistration,
                now: dt.datetime, when: timestamp_pb2.Timestamp) -> list[Event]:
    course = lock_courses(conn, [command.course_id]).get(command.course_id)
    decision = conn.execute(_DECISION_FOR_UPDATE, {"id": command.registration_id}).first()
    if decision is None:
        # Never decided here: its sign-up never reached this shard (a Register whose write
        # failed, or one still in flight). Recorded as decided, it can never take a seat.
        conn.execute(_INSERT_DECISIONS, {
            "registration_id": command.registration_id, "course_id": command.course_id, "email": "",
            "outcome": Outcome.CANCELLED.value, "decide_time": now, "shard_id": record.shard_id,
            "sequence_number": record.sequence_number, "worker_id": record.worker_id,
            "lease_counter": record.lease_counter, "create_time": None, "promoted": False, "name": "",
        })
        return [_cancelled_event(command, course, when, seat_freed=False)]
    if decision.course_id != command.course_id:
        # Another course's writer owns it (a wrong course given while it was PENDING).
        log.warning("cancellation names another course than the registration's; ignored",
                    extra={"registration_id": command.registration_id, "course_id": command.course_id})
        return []
    outcome = Outcome(decision.outcome)
    if outcome not in ACTIVE:
        return []  # cancelled already (a redelivery, a second request) or declined: nothing changes
    conn.execute(_MARK_CANCELLED, {"b_id": command.registration_id})
    if outcome is Outcome.WAITLISTED:
        place = conn.execute(_UNWAIT, {"id": command.registration_id}).one()
        return [_cancelled_event(command, course, when, seat_freed=False, student=place)]
    seat = conn.execute(_UNSEAT, {"id": command.registration_id}).one()
    if conn.execute(_FREE_SEAT, {"b_course": command.course_id}).rowcount != 1:
        raise SeatsChanged([command.course_id])
    events = [_cancelled_event(command, course, when, seat_freed=True, student=seat)]
    freed = lock_courses(conn, [command.course_id])[command.course_id]  # the count as it is now
    return events + promote(conn, freed, now)


def _cancelled_event(command: events_pb2.CancelRegistration, course: Any, when: timestamp_pb2.Timestamp, *,
                     seat_freed: bool, student: Any = None) -> Event:
    body = events_pb2.RegistrationCancelled(
        registration_id=command.registration_id,
        course_id=command.course_id,
        campus_id=course.campus_id if course is not None else "",
        seat_freed=seat_freed,
        cancel_time=when,
        course_name=course.name if course is not None else "",
    )
    if student is not None:
        body.email = student.email
        body.name = student.name
        body.contact_email = student.contact_email or student.email
        body.locale = student.locale
        if seat_freed:
            body.birth_date.CopyFrom(date_message(student.birth_date))
    return Event(ENROLLMENT_EVENTS_STREAM, command.course_id,
                 new_envelope(command.registration_id, time=when, registration_cancelled=body))


# What the enrollment service consumes: the sign-ups and their cancellations, each decided
# by the shard's one writer, in stream order.
REGISTRATIONS = Consume(REGISTRATIONS_STREAM, {"register_student": Handle(decide, parse_command),
                                               "cancel_registration": Handle(cancel, parse_cancellation)})
