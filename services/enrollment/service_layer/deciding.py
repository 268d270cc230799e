"""Decides a batch of RegisterStudent commands inside the consumer's checkpoint transaction.

The whole batch is read and written with a handful of set-based statements: existing
decisions (redeliveries are skipped), the courses and their current enrollees, then
bulk inserts of decisions and enrollments, one conditional seat-count update per
course, and one outbox row per decision: the event, which carries what the notifier's
email needs too (each fact is written once; stats and the notifier both read it). If a course's
conditional update finds fewer seats than expected (capacity lowered meanwhile) the
transaction fails and the consumer retries the batch from its checkpoint.
"""

from __future__ import annotations

import datetime as dt
import logging

from google.protobuf import timestamp_pb2
from google.type import date_pb2
from sqlalchemy import Connection, insert, select, update

from coursesignup.events.v1 import events_pb2
from libs.consumer import StreamRecord, decode_or_dead_letter, record_dead_letter
from libs.envelope import decode_envelope, new_envelope
from libs.outbox import enqueue
from services.enrollment.adapters.tables import courses, decisions, enrollments
from services.enrollment.domain.model import CourseSeats, Outcome, normalize_email

log = logging.getLogger(__name__)

_DECLINE_REASON = {
    Outcome.DECLINED_FULL: events_pb2.DECLINE_REASON_FULL,
    Outcome.DECLINED_DUPLICATE: events_pb2.DECLINE_REASON_DUPLICATE,
    Outcome.DECLINED_UNKNOWN_COURSE: events_pb2.DECLINE_REASON_UNKNOWN_COURSE,
}


class SeatsChanged(Exception):
    """A course's seat count changed under the batch; the batch is retried."""


def _to_date(value: date_pb2.Date) -> dt.date:
    return dt.date(value.year, value.month, value.day)


def _validate(command: events_pb2.RegisterStudent) -> str | None:
    if not command.registration_id:
        return "RegisterStudent without registration_id"
    if not command.course_id:
        return "RegisterStudent without course_id"
    if "@" not in command.email:
        return "RegisterStudent without a valid email"
    try:
        _to_date(command.birth_date)
    except ValueError:
        return "RegisterStudent with an invalid birth_date"
    return None


def decide_batch(conn: Connection, records: list[StreamRecord], stream: str) -> None:
    """Decides the batch's sign-ups; `stream` is where their events go (enrollment-events)."""
    commands: list[tuple[StreamRecord, events_pb2.RegisterStudent]] = []
    for record, envelope in decode_or_dead_letter(conn, records, decode_envelope):
        if envelope.WhichOneof("body") != "register_student":
            record_dead_letter(conn, record, f"unexpected message type {envelope.WhichOneof('body')}")
            continue
        problem = _validate(envelope.register_student)
        if problem:
            record_dead_letter(conn, record, problem)
            continue
        commands.append((record, envelope.register_student))
    if not commands:
        return

    registration_ids = {c.registration_id for _, c in commands}
    already = set(
        conn.execute(
            select(decisions.c.registration_id).where(decisions.c.registration_id.in_(registration_ids))
        ).scalars()
    )
    course_ids = {c.course_id for _, c in commands}
    seats: dict[str, CourseSeats] = {
        row.course_id: CourseSeats(row.course_id, row.campus_id, row.name, row.capacity, row.enrolled_count, set())
        for row in conn.execute(select(courses).where(courses.c.course_id.in_(course_ids)))
    }
    emails = {normalize_email(c.email) for _, c in commands}
    for row in conn.execute(
        select(enrollments.c.course_id, enrollments.c.email).where(
            enrollments.c.course_id.in_(seats), enrollments.c.email.in_(emails)
        )
    ):
        seats[row.course_id].enrolled_emails.add(row.email)

    now = dt.datetime.now(dt.UTC)
    timestamp = timestamp_pb2.Timestamp()
    timestamp.FromDatetime(now)
    new_decisions: list[dict[str, object]] = []
    new_enrollments: list[dict[str, object]] = []
    outbox_rows: list[tuple[str, str, bytes]] = []
    seats_taken: dict[str, int] = {}
    for record, command in commands:
        if command.registration_id in already:
            continue  # redelivered or retried: decided once already
        already.add(command.registration_id)
        email = normalize_email(command.email)
        course = seats.get(command.course_id)
        outcome = course.decide(email) if course else Outcome.DECLINED_UNKNOWN_COURSE
        new_decisions.append(
            {
                "registration_id": command.registration_id,
                "course_id": command.course_id,
                "email": email,
                "outcome": outcome.value,
                "decide_time": now,
                "shard_id": record.shard_id,
                "sequence_number": record.sequence_number,
                "worker_id": record.worker_id,
                "lease_counter": record.lease_counter,
            }
        )
        campus_id = course.campus_id if course else ""
        course_name = course.name if course else ""
        contact_email = command.email.strip()
        if outcome is Outcome.ENROLLED:
            assert course is not None
            seats_taken[course.course_id] = seats_taken.get(course.course_id, 0) + 1
            new_enrollments.append(
                {
                    "course_id": command.course_id,
                    "email": email,
                    "registration_id": command.registration_id,
                    "name": command.name,
                    "birth_date": _to_date(command.birth_date),
                    "enroll_time": now,
                }
            )
            event = new_envelope(
                command.registration_id,
                time=timestamp,
                student_enrolled=events_pb2.StudentEnrolled(
                    registration_id=command.registration_id,
                    course_id=command.course_id,
                    campus_id=campus_id,
                    name=command.name,
                    email=email,
                    birth_date=command.birth_date,
                    enroll_time=timestamp,
                    contact_email=contact_email,
                    course_name=course_name,
                    locale=command.locale,
                ),
            )
        else:
            event = new_envelope(
                command.registration_id,
                time=timestamp,
                registration_declined=events_pb2.RegistrationDeclined(
                    registration_id=command.registration_id,
                    course_id=command.course_id,
                    campus_id=campus_id,
                    reason=_DECLINE_REASON[outcome],
                    decide_time=timestamp,
                    name=command.name,
                    contact_email=contact_email,
                    course_name=course_name,
                    locale=command.locale,
                ),
            )
        # One event per decision: stats projects it and the notifier emails it.
        outbox_rows.append((stream, command.course_id, event.SerializeToString()))

    if new_decisions:
        conn.execute(insert(decisions), new_decisions)
    if new_enrollments:
        conn.execute(insert(enrollments), new_enrollments)
    for course_id, taken in seats_taken.items():
        result = conn.execute(
            update(courses)
            .where(courses.c.course_id == course_id, courses.c.enrolled_count + taken <= courses.c.capacity)
            .values(enrolled_count=courses.c.enrolled_count + taken)
        )
        if result.rowcount != 1:
            raise SeatsChanged(course_id)
    enqueue(conn, outbox_rows)
    log.info("batch decided", extra={"decided": len(new_decisions), "enrolled": len(new_enrollments),
                                     "records": len(records)})
