"""Catalogue use cases: campuses and courses, and decision look-ups.

Each function runs in its own short transaction (a unit of work per request). Errors
are domain errors from libs.errors, turned into gRPC statuses by the server bootstrap.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from libs import outbox
from libs.db import read_only
from libs.errors import AlreadyExists, FailedPrecondition, NotFound, Validator
from libs.ids import check_resource_id
from libs.pagination import decode_token, encode_token, page_size
from libs.text import check_display_name
from services.enrollment.adapters.tables import campuses, courses, decisions, waitlist
from services.enrollment.domain.model import MAX_CAPACITY
from services.enrollment.service_layer.waitlist import lock_courses, position_of, promote

# A course as the API shows it: its row and how many wait for a seat (one statement, one snapshot).
_WAITLIST_COUNT = (select(func.count()).select_from(waitlist).where(waitlist.c.course_id == courses.c.course_id)
                   .scalar_subquery().label("waitlist_count"))
_COURSE = select(courses, _WAITLIST_COUNT)
# A decision with the position of its waiting place, if it has one.
_DECISION = (select(decisions, position_of(waitlist).scalar_subquery().label("waitlist_position"))
             .select_from(decisions.outerjoin(waitlist, waitlist.c.registration_id == decisions.c.registration_id)))


@dataclass(frozen=True)
class Page:
    rows: list[Any]
    next_page_token: str


def _check_capacity(validator: Validator, field: str, value: int) -> None:
    if value < 0 or value > MAX_CAPACITY:
        validator.add(field, f"must be between 0 and {MAX_CAPACITY}")


def _campus_not_found(campus_id: str) -> NotFound:
    return NotFound(f"campus {campus_id!r} not found", reason="CAMPUS_NOT_FOUND", metadata={"campus_id": campus_id})


def _course_not_found(course_id: str) -> NotFound:
    return NotFound(f"course {course_id!r} not found", reason="COURSE_NOT_FOUND", metadata={"course_id": course_id})


def create_campus(engine: Engine, campus_id: str, name: str) -> Any:
    validator = Validator()
    check_resource_id(validator, "campus.campus_id", campus_id)
    name = check_display_name(validator, "campus.name", name)
    validator.check()
    row = {"campus_id": campus_id, "name": name, "create_time": dt.datetime.now(dt.UTC)}
    try:
        with engine.begin() as conn:
            conn.execute(insert(campuses).values(**row))
    except IntegrityError as error:
        raise AlreadyExists(f"campus {campus_id!r} already exists", reason="CAMPUS_ALREADY_EXISTS",
                            metadata={"campus_id": campus_id}) from error
    return get_campus(engine, campus_id)


def get_campus(engine: Engine, campus_id: str) -> Any:
    validator = Validator()
    check_resource_id(validator, "campus_id", campus_id)
    validator.check()
    with read_only(engine).connect() as conn:
        row = conn.execute(select(campuses).where(campuses.c.campus_id == campus_id)).first()
    if row is None:
        raise _campus_not_found(campus_id)
    return row


def list_campuses(engine: Engine, requested_size: int, token: str, token_key: bytes) -> Page:
    size = page_size(requested_size)
    after = decode_token(token, {"method": "ListCampuses"}, token_key)
    query = select(campuses).order_by(campuses.c.campus_id).limit(size + 1)
    if after is not None:
        query = query.where(campuses.c.campus_id > after)
    with read_only(engine).connect() as conn:
        rows = conn.execute(query).all()
    next_token = (encode_token(rows[size - 1].campus_id, {"method": "ListCampuses"}, token_key)
                  if len(rows) > size else "")
    return Page(list(rows[:size]), next_token)


def create_course(engine: Engine, course_id: str, campus_id: str, name: str, capacity: int) -> Any:
    validator = Validator()
    check_resource_id(validator, "course.course_id", course_id)
    check_resource_id(validator, "course.campus_id", campus_id)
    name = check_display_name(validator, "course.name", name)
    _check_capacity(validator, "course.capacity", capacity)
    validator.check()
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        if conn.execute(select(campuses.c.campus_id).where(campuses.c.campus_id == campus_id)).first() is None:
            raise _campus_not_found(campus_id)
        if conn.execute(select(courses.c.course_id).where(courses.c.course_id == course_id)).first() is not None:
            raise AlreadyExists(f"course {course_id!r} already exists", reason="COURSE_ALREADY_EXISTS",
                                metadata={"course_id": course_id})
        conn.execute(
            insert(courses).values(
                course_id=course_id, campus_id=campus_id, name=name, capacity=capacity,
                enrolled_count=0, create_time=now, update_time=now,
            )
        )
    return get_course(engine, course_id)


def get_course(engine: Engine, course_id: str) -> Any:
    validator = Validator()
    check_resource_id(validator, "course_id", course_id)
    validator.check()
    with read_only(engine).connect() as conn:
        row = conn.execute(_COURSE.where(courses.c.course_id == course_id)).first()
    if row is None:
        raise _course_not_found(course_id)
    return row


def list_courses(engine: Engine, campus_id: str, requested_size: int, token: str, token_key: bytes) -> Page:
    if campus_id:
        validator = Validator()
        check_resource_id(validator, "campus_id", campus_id)
        validator.check()
    size = page_size(requested_size)
    query_key = {"method": "ListCourses", "campus_id": campus_id}
    after = decode_token(token, query_key, token_key)
    query = _COURSE.order_by(courses.c.course_id).limit(size + 1)
    if campus_id:
        query = query.where(courses.c.campus_id == campus_id)
    if after is not None:
        query = query.where(courses.c.course_id > after)
    with read_only(engine).connect() as conn:
        rows = conn.execute(query).all()
    next_token = encode_token(rows[size - 1].course_id, query_key, token_key) if len(rows) > size else ""
    return Page(list(rows[:size]), next_token)


def update_course(engine: Engine, course_id: str, name: str, capacity: int, mask: list[str], *,
                  stream_name: Callable[[str], str] = str, committed: Callable[[], None] | None = None) -> Any:
    """Changes a course; a capacity rise promotes waitlisted registrations into the new seats.

    The course row is locked first, as the decider locks it (service_layer.waitlist), so
    the new capacity and the promotions it allows commit together, with their events in
    the outbox (`stream_name` gives a stream's full name), and a batch deciding the same
    course waits for them or goes first: never two promotions of one registration, never
    more seats than the capacity. `committed` runs after the commit (wakes the relay)."""
    fields = set(mask) or {"name", "capacity"}
    validator = Validator()
    check_resource_id(validator, "course.course_id", course_id)
    unknown = fields - {"name", "capacity"}
    if unknown:
        validator.add("update_mask", f"unknown or immutable fields: {', '.join(sorted(unknown))}")
    if "name" in fields:
        name = check_display_name(validator, "course.name", name)
    if "capacity" in fields:
        _check_capacity(validator, "course.capacity", capacity)
    validator.check()
    values: dict[str, Any] = {"update_time": dt.datetime.now(dt.UTC)}
    if "name" in fields:
        values["name"] = name
    condition = [courses.c.course_id == course_id]
    if "capacity" in fields:
        values["capacity"] = capacity
        # Conditional on the seats taken at the moment of the write: never below enrolled.
        condition.append(courses.c.enrolled_count <= capacity)
    with engine.begin() as conn:
        locked = lock_courses(conn, [course_id]).get(course_id)
        if locked is None:
            raise _course_not_found(course_id)
        changed = conn.execute(update(courses).where(*condition).values(**values)).rowcount
        if changed == 1 and "capacity" in fields and capacity > locked.enrolled_count:
            events = promote(conn, lock_courses(conn, [course_id])[course_id], values["update_time"])
            outbox.enqueue(conn, [(stream_name(e.stream), e.partition_key, e.envelope.SerializeToString())
                                  for e in events])
        if changed != 1:
            row = conn.execute(select(courses.c.enrolled_count).where(courses.c.course_id == course_id)).first()
            if row is None:
                raise _course_not_found(course_id)
            raise FailedPrecondition(
                f"course {course_id!r} has {row.enrolled_count} students enrolled; capacity cannot go below that",
                reason="CAPACITY_BELOW_ENROLLED",
                metadata={"course_id": course_id, "enrolled_count": str(row.enrolled_count),
                          "requested_capacity": str(capacity)},
            )
    if committed is not None:
        committed()
    return get_course(engine, course_id)


def get_decision(engine: Engine, registration_id: str) -> Any:
    validator = Validator()
    if not registration_id:
        validator.add("registration_id", "is required")
    elif len(registration_id) > 64:
        validator.add("registration_id", "is too long")
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in registration_id):
        # PostgreSQL text cannot hold NUL, and no id issued holds a control character.
        validator.add("registration_id", "must not contain control characters")
    validator.check()
    with read_only(engine).connect() as conn:
        row = conn.execute(_DECISION.where(decisions.c.registration_id == registration_id)).first()
    if row is None:
        raise NotFound(f"no decision recorded for registration {registration_id!r}", reason="DECISION_NOT_FOUND",
                       metadata={"registration_id": registration_id})
    return row


def catalogue_is_empty(engine: Engine) -> bool:
    with read_only(engine).connect() as conn:
        return conn.execute(select(func.count()).select_from(campuses)).scalar_one() == 0


DEMO_CAMPUSES = [("sp", "São Paulo"), ("rj", "Rio de Janeiro")]
DEMO_COURSES = [
    ("cs101", "sp", "Introduction to Computer Science", 30),
    ("math201", "sp", "Linear Algebra", 50),
    ("art110", "sp", "Drawing Studio", 3),
    ("bio150", "rj", "Cell Biology", 25),
    ("hist120", "rj", "History of Brazil", 40),
]


def seed_demo_catalogue(engine: Engine) -> bool:
    """Loads the demo catalogue into an empty catalogue; returns whether it did."""
    if not catalogue_is_empty(engine):
        return False
    try:
        for campus_id, name in DEMO_CAMPUSES:
            create_campus(engine, campus_id, name)
        for course_id, campus_id, name, capacity in DEMO_COURSES:
            create_course(engine, course_id, campus_id, name, capacity)
    except AlreadyExists:
        return False  # another worker seeded it at the same time
    return True
