"""Waiting lists: seats given in arrival order, in the transaction that frees them.

Two writers free seats: the decider (a cancelled enrollment, in the consumer's checkpoint
transaction) and UpdateCourse (a capacity rise, in the RPC's transaction). Both lock the
course row first (`lock_course`, SELECT ... FOR UPDATE on PostgreSQL; SQLite's write
transactions begin with BEGIN IMMEDIATE, one at a time), as the decider does before it
decides a batch, so the course's seats and its waiting list are read and changed by one
transaction at a time: a waitlisted registration is promoted once, and the conditional
seat update (and the table's CHECK) still refuse an overbooking whatever happens.

Positions are never stored: a place's position is the number of the course's waiting rows
with an order key (`seq`) up to its own, so deleting the head (a promotion) or any place (a
cancellation) moves everyone behind it up one place, 1..n without gaps, with no renumbering.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from google.protobuf import timestamp_pb2
from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.sql import Select

from coursesignup.events.v1 import events_pb2
from libs.envelope import new_envelope
from libs.kinesis import ENROLLMENT_EVENTS_STREAM
from libs.proto_time import date_message, timestamp
from libs.worker import Event
from services.enrollment.adapters.tables import courses, decisions, enrollments, waitlist
from services.enrollment.domain.model import Outcome


class SeatsChanged(Exception):
    """A course's seat count changed under the batch; the batch is retried."""


_LOCK_COURSES = (
    select(courses.c.course_id, courses.c.campus_id, courses.c.name, courses.c.capacity, courses.c.enrolled_count)
    .where(courses.c.course_id.in_(bindparam("ids", expanding=True)))
    .order_by(courses.c.course_id)  # one lock order everywhere: no deadlock between writers
    .with_for_update()
)
_HEAD = (
    select(waitlist)
    .where(waitlist.c.course_id == bindparam("course"))
    .order_by(waitlist.c.seq)
    .limit(bindparam("free"))
)
_PROMOTE = (
    update(decisions)
    .where(decisions.c.registration_id == bindparam("b_id"), decisions.c.outcome == Outcome.WAITLISTED.value)
    .values(outcome=Outcome.ENROLLED.value, promoted=True)
)
_TAKE = (
    update(courses)
    .where(courses.c.course_id == bindparam("b_course"),
           courses.c.enrolled_count + bindparam("b_taken") <= courses.c.capacity)
    .values(enrolled_count=courses.c.enrolled_count + bindparam("b_taken"))
)


def lock_courses(conn: Connection, course_ids: list[str]) -> dict[str, Any]:
    """The rows of these courses, locked until the transaction ends (in course id order)."""
    return {row.course_id: row for row in conn.execute(_LOCK_COURSES, {"ids": sorted(set(course_ids))})}


def waiting_lists(conn: Connection, course_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Per course with anyone waiting: (how many wait, the order key of the last place)."""
    query = (select(waitlist.c.course_id, func.count(), func.max(waitlist.c.seq))
             .where(waitlist.c.course_id.in_(course_ids)).group_by(waitlist.c.course_id))
    return {row[0]: (int(row[1]), int(row[2])) for row in conn.execute(query)}


def position_of(waiting: Any) -> Select[Any]:
    """The position (1 = next) of the waitlist row `waiting` (a table or alias with course_id, seq)."""
    ahead = waitlist.alias("ahead")
    return (select(func.count()).select_from(ahead)
            .where(ahead.c.course_id == waiting.c.course_id, ahead.c.seq <= waiting.c.seq))


def promote(conn: Connection, course: Any, now: dt.datetime) -> list[Event]:
    """Fills the free seats of a locked course (`lock_courses` row, as it stands now) from
    the head of its waiting list; returns the enrollments' events (promoted=True)."""
    free = course.capacity - course.enrolled_count
    if free <= 0:
        return []
    promoted = list(conn.execute(_HEAD, {"course": course.course_id, "free": free}))
    if not promoted:
        return []
    ids = [row.registration_id for row in promoted]
    conn.execute(delete(waitlist).where(waitlist.c.registration_id.in_(ids)))
    conn.execute(insert(enrollments), [
        {"course_id": row.course_id, "email": row.email, "registration_id": row.registration_id, "name": row.name,
         "birth_date": row.birth_date, "enroll_time": now, "contact_email": row.contact_email, "locale": row.locale}
        for row in promoted
    ])
    changed = conn.execute(_PROMOTE, [{"b_id": rid} for rid in ids]).rowcount
    if changed != len(ids):
        raise SeatsChanged([course.course_id])
    if conn.execute(_TAKE, {"b_course": course.course_id, "b_taken": len(ids)}).rowcount != 1:
        raise SeatsChanged([course.course_id])
    return [_promoted_event(row, course, timestamp(now)) for row in promoted]


def _promoted_event(row: Any, course: Any, when: timestamp_pb2.Timestamp) -> Event:
    accepted = timestamp(row.accept_time) if row.accept_time is not None else timestamp_pb2.Timestamp()
    envelope = new_envelope(
        row.registration_id,
        time=when,
        student_enrolled=events_pb2.StudentEnrolled(
            registration_id=row.registration_id,
            course_id=row.course_id,
            campus_id=course.campus_id,
            name=row.name,
            email=row.email,
            birth_date=date_message(row.birth_date),
            enroll_time=when,
            contact_email=row.contact_email,
            course_name=course.name,
            locale=row.locale,
            promoted=True,
            accept_time=accepted,
        ),
    )
    return Event(ENROLLMENT_EVENTS_STREAM, row.course_id, envelope)
