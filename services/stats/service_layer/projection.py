"""Applies enrollment events to the read model, inside the consumer's checkpoint transaction.

Effectively once: an event moves counts only if this transaction inserted its roster
row (registration id is the key), and the rows commit together with the shard's
checkpoint. A record delivered again, or an event the outbox published twice, finds
its row already there and changes nothing.

Each batch is applied with a handful of upserts, one per table, each sent with
executemany (which SQLAlchemy turns into multi-row statements), whatever the batch
size. Rows are written in key order so that two workers updating the same campus or
overall rows lock them in the same order. Removal (`remove_enrollments`) is the exact
inverse, ready for cancellations. Every aggregate is a function of the roster's live
rows alone, whatever order events arrive in, so `recount_from_roster` (and the
rebuild command built on it) ends exactly where the incremental projection does.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, delete, func, select, tuple_, update

from coursesignup.events.v1 import events_pb2
from libs.db import upsert_rows
from libs.envelope import MalformedRecord
from libs.kinesis import ENROLLMENT_EVENTS_STREAM
from libs.worker import Consume, Handle, Message
from services.stats.adapters.tables import (
    AGGREGATE_TABLES,
    BIRTH_MONTHS,
    age_buckets,
    age_totals,
    age_years,
    birthday_buckets,
    born_in_month,
    campus_students,
    course_summaries,
    roster,
    students,
)
from services.stats.domain.model import OVERALL_SCOPE, StudentEnrolled, campus_scope, course_scope

log = logging.getLogger(__name__)

# Registration ids per IN list: well under SQLite's and PostgreSQL's parameter limits.
IDS_PER_STATEMENT = 500

Key = tuple[str, ...]
BucketKey = tuple[str, date]
T = TypeVar("T")


def parse_enrolled(envelope: events_pb2.Envelope) -> StudentEnrolled:
    """The enrollment a student_enrolled event carries; MalformedRecord (to dead letters)
    when it lacks what the read model needs. Reasons never quote personal data."""
    event = envelope.student_enrolled
    missing = [
        name
        for name in ("registration_id", "course_id", "campus_id", "email")
        if not getattr(event, name)
    ]
    if missing:
        raise MalformedRecord(f"student_enrolled lacks {', '.join(missing)}")
    try:
        birth_date = date(event.birth_date.year, event.birth_date.month, event.birth_date.day)
    except ValueError:
        raise MalformedRecord("student_enrolled.birth_date is not a valid calendar date") from None
    seat_time = event.enroll_time if event.HasField("enroll_time") else envelope.time
    return StudentEnrolled(
        registration_id=event.registration_id,
        course_id=event.course_id,
        campus_id=event.campus_id,
        email=event.email,
        name=event.name,
        birth_date=birth_date,
        enroll_time=seat_time.ToDatetime(tzinfo=UTC),
    )


def project(conn: Connection, messages: list[Message[StudentEnrolled]]) -> None:
    """Applies a run of enrollments (the runtime decoded them and dead-lettered the rest)."""
    applied = add_enrollments(conn, [message.body for message in messages])
    log.debug("batch projected", extra={"enrollments": len(messages), "applied": applied})


@dataclass(frozen=True)
class SeatFreed:
    """An enrolled registration was cancelled: its enrollment leaves every scope."""

    registration_id: str
    course_id: str
    campus_id: str
    email: str
    birth_date: date | None
    cancel_time: datetime


def parse_cancelled(envelope: events_pb2.Envelope) -> SeatFreed | None:
    """The enrollment a registration_cancelled event removes (None: it held no seat, as a
    waitlisted one); MalformedRecord (to dead letters) when it lacks what the removal needs."""
    event = envelope.registration_cancelled
    if not event.seat_freed:
        return None
    if not event.registration_id:
        raise MalformedRecord("registration_cancelled lacks registration_id")
    birth_date = None
    if event.HasField("birth_date"):
        try:
            birth_date = date(event.birth_date.year, event.birth_date.month, event.birth_date.day)
        except ValueError:
            raise MalformedRecord("registration_cancelled.birth_date is not a valid calendar date") from None
    moment = event.cancel_time if event.HasField("cancel_time") else envelope.time
    return SeatFreed(event.registration_id, event.course_id, event.campus_id, event.email, birth_date,
                     moment.ToDatetime(tzinfo=UTC))


def unproject(conn: Connection, messages: list[Message[SeatFreed | None]]) -> None:
    """Removes a run of cancelled enrollments (the removal path, `remove_enrollments`).

    A cancellation that reaches the read model before its enrollment (a rebuild racing
    the stream) leaves a tombstone, so the enrollment arriving later changes nothing."""
    freed = [message.body for message in messages if message.body is not None]
    if not freed:
        return
    tombstones = [
        {"registration_id": f.registration_id, "course_id": f.course_id, "campus_id": f.campus_id,
         "email": f.email, "name": "", "birth_date": f.birth_date, "enroll_time": f.cancel_time,
         "removed_time": f.cancel_time}
        for f in sorted(freed, key=lambda f: f.registration_id)
        if f.birth_date is not None and f.course_id and f.campus_id and f.email
    ]
    if tombstones:
        upsert_rows(conn, roster, tombstones,
                    lambda insert: insert.on_conflict_do_nothing(index_elements=["registration_id"]))
    removed = remove_enrollments(conn, [f.registration_id for f in freed], freed[-1].cancel_time)
    log.debug("cancellations projected", extra={"cancellations": len(freed), "removed": removed})


# What the stats service consumes: enrollments (promotions included) move the counts up,
# cancelled enrollments down; a declined or waitlisted registration adds no student.
ENROLLMENT_EVENTS = Consume(
    ENROLLMENT_EVENTS_STREAM,
    {"student_enrolled": Handle(project, parse_enrolled),
     "registration_cancelled": Handle(unproject, parse_cancelled)},
    ignore=frozenset({"registration_declined", "registration_waitlisted"}),
)


def add_enrollments(conn: Connection, events: Iterable[StudentEnrolled]) -> int:
    """Adds the enrollments not yet in the roster to every scope; returns how many were new."""
    first_seen: dict[str, StudentEnrolled] = {}
    for event in events:
        first_seen.setdefault(event.registration_id, event)
    if not first_seen:
        return 0
    inserted = {
        row.registration_id
        for row in upsert_rows(
            conn,
            roster,
            [_roster_row(first_seen[rid]) for rid in sorted(first_seen)],
            lambda insert: insert.on_conflict_do_nothing(index_elements=["registration_id"]),
            returning=[roster.c.registration_id],
        )
    }
    fresh = [
        _Change(event.course_id, event.campus_id, event.email, event.birth_date, +1)
        for rid, event in first_seen.items()
        if rid in inserted
    ]
    _apply_changes(conn, fresh)
    return len(fresh)


def remove_enrollments(
    conn: Connection, registration_ids: Iterable[str], removed_time: datetime
) -> int:
    """Takes enrollments out of every scope; returns how many were counted until now.

    The roster rows stay, marked removed: a redelivered enrollment then still finds its
    row and changes nothing, and a redelivered removal finds it already removed.
    """
    removed: list[_Change] = []
    for chunk in _chunks(sorted(set(registration_ids))):
        removed.extend(
            _Change(row.course_id, row.campus_id, row.email, row.birth_date, -1)
            for row in conn.execute(
                update(roster)
                .where(roster.c.registration_id.in_(chunk), roster.c.removed_time.is_(None))
                .values(removed_time=removed_time)
                .returning(
                    roster.c.course_id, roster.c.campus_id, roster.c.email, roster.c.birth_date
                )
            )
        )
    _apply_changes(conn, removed)
    return len(removed)


def recount_from_roster(
    conn: Connection, chunk_size: int = 5000, progress: Callable[[int], None] | None = None
) -> int:
    """Empties every aggregate and counts the roster's live rows again; returns how many.

    The result is what the events would have produced in any order: the aggregates are
    a function of the live roster alone. Used by the rebuild command, and at start when
    the tables of an older version of the read model are found.
    """
    for table in reversed(AGGREGATE_TABLES):
        conn.execute(delete(table))
    counted = 0
    last_id = ""
    while True:
        rows = conn.execute(
            select(
                roster.c.registration_id,
                roster.c.course_id,
                roster.c.campus_id,
                roster.c.email,
                roster.c.birth_date,
            )
            .where(roster.c.removed_time.is_(None), roster.c.registration_id > last_id)
            .order_by(roster.c.registration_id)
            .limit(chunk_size)
        ).all()
        if not rows:
            return counted
        _apply_changes(
            conn, [_Change(r.course_id, r.campus_id, r.email, r.birth_date, +1) for r in rows]
        )
        counted += len(rows)
        last_id = rows[-1].registration_id
        if progress is not None:
            progress(counted)


# membership --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Change:
    """One enrollment entering (+1) or leaving (-1) the live roster."""

    course_id: str
    campus_id: str
    email: str
    birth_date: date
    sign: int


@dataclass(frozen=True)
class _Member:
    """A student's standing in a scope: live enrollments there, and the birth date counted."""

    enrollments: int
    birth_date: date


def _apply_changes(conn: Connection, changes: Sequence[_Change]) -> None:
    """Moves every aggregate by the enrollments that entered or left the live roster.

    Courses count enrollments. Campuses and overall count students: the members of
    the changed students are locked (in key order), then recounted from the roster's
    live rows, and each student whose counted birth date changed moves between age
    buckets. Locking before reading the roster matters on PostgreSQL: two workers
    changing one student's enrollments take turns, and the second one's roster read
    sees what the first committed.
    """
    if not changes:
        return
    deltas: Counter[BucketKey] = Counter()
    course_deltas: Counter[tuple[str, str, date]] = Counter()
    for change in changes:
        deltas[(course_scope(change.course_id), change.birth_date)] += change.sign
        course_deltas[(change.course_id, change.campus_id, change.birth_date)] += change.sign
    placeholders: dict[Key, date] = {}
    for change in changes:
        placeholders.setdefault((change.campus_id, change.email), change.birth_date)
        placeholders.setdefault((change.email,), change.birth_date)
    campus_keys = sorted(key for key in placeholders if len(key) == 2)
    student_keys = sorted(key for key in placeholders if len(key) == 1)
    campus_before = _lock_members(conn, campus_students, ("campus_id", "email"), campus_keys, placeholders)
    student_before = _lock_members(conn, students, ("email",), student_keys, placeholders)
    campus_after, student_after = _live_members(conn, [email for (email,) in student_keys])
    for (campus_id, _email), old, new in _settle_members(
        conn, campus_students, ("campus_id", "email"), campus_keys, campus_before, campus_after
    ):
        _move(deltas, campus_scope(campus_id), old, new)
    for _key, old, new in _settle_members(
        conn, students, ("email",), student_keys, student_before, student_after
    ):
        _move(deltas, OVERALL_SCOPE, old, new)
    _apply_age_deltas(conn, deltas)
    _apply_course_deltas(conn, course_deltas)


def _move(deltas: Counter[BucketKey], scope: str, old: date | None, new: date | None) -> None:
    if old is not None:
        deltas[(scope, old)] -= 1
    if new is not None:
        deltas[(scope, new)] += 1


def _lock_members(
    conn: Connection,
    table: Table,
    key_columns: Sequence[str],
    keys: Sequence[Key],
    placeholders: Mapping[Key, date],
) -> dict[Key, _Member]:
    """Locks the rows of these students (creating placeholder rows with 0 enrollments for
    non-members) and returns the members among them as they stand."""
    if not keys:
        return {}
    rows = [
        {**dict(zip(key_columns, key, strict=True)), "birth_date": placeholders[key], "enrollments": 0}
        for key in keys
    ]
    locked = upsert_rows(
        conn,
        table,
        rows,
        lambda insert: insert.on_conflict_do_update(
            index_elements=list(key_columns), set_={"enrollments": table.c.enrollments}
        ),
        returning=[*(table.c[name] for name in key_columns), table.c.birth_date, table.c.enrollments],
    )
    return {
        tuple(row[: len(key_columns)]): _Member(row.enrollments, row.birth_date)
        for row in locked
        if row.enrollments > 0
    }


def _live_members(
    conn: Connection, emails: Sequence[str]
) -> tuple[dict[Key, _Member], dict[Key, _Member]]:
    """These students' standing per campus and overall, from the roster's live rows.

    The birth date counted is the one of the student's earliest live enrollment in the
    scope (by enroll time, then registration id): students who gave two birth dates
    are counted the same whatever order their events arrived in.
    """
    earliest: dict[Key, tuple[Any, str, date]] = {}
    enrollments: Counter[Key] = Counter()
    for chunk in _chunks(emails):
        for row in conn.execute(
            select(
                roster.c.campus_id,
                roster.c.email,
                roster.c.birth_date,
                roster.c.enroll_time,
                roster.c.registration_id,
            ).where(roster.c.email.in_(chunk), roster.c.removed_time.is_(None))
        ):
            candidate = (row.enroll_time, row.registration_id, row.birth_date)
            keys: tuple[Key, Key] = ((row.campus_id, row.email), (row.email,))
            for key in keys:
                enrollments[key] += 1
                if key not in earliest or candidate < earliest[key]:
                    earliest[key] = candidate
    campus: dict[Key, _Member] = {}
    overall: dict[Key, _Member] = {}
    for key, (_time, _rid, birth_date) in earliest.items():
        (campus if len(key) == 2 else overall)[key] = _Member(enrollments[key], birth_date)
    return campus, overall


def _settle_members(
    conn: Connection,
    table: Table,
    key_columns: Sequence[str],
    keys: Sequence[Key],
    before: Mapping[Key, _Member],
    after: Mapping[Key, _Member],
) -> list[tuple[Key, date | None, date | None]]:
    """Writes each locked student's new standing (deleting non-members); returns the
    students whose counted birth date changed, with the old and the new one (None
    outside the scope)."""
    updates: list[dict[str, Any]] = []
    deletions: list[Key] = []
    moved = []
    for key in keys:
        old, new = before.get(key), after.get(key)
        if new is None:
            deletions.append(key)
        elif new != old:
            updates.append(
                {
                    **dict(zip(key_columns, key, strict=True)),
                    "birth_date": new.birth_date,
                    "enrollments": new.enrollments,
                }
            )
        old_birth = old.birth_date if old else None
        new_birth = new.birth_date if new else None
        if old_birth != new_birth:
            moved.append((key, old_birth, new_birth))
    # The rows exist (locked above): an upsert writes them all in one statement.
    upsert_rows(
        conn,
        table,
        updates,
        lambda insert: insert.on_conflict_do_update(
            index_elements=list(key_columns),
            set_={"birth_date": insert.excluded.birth_date, "enrollments": insert.excluded.enrollments},
        ),
    )
    _delete_keys(conn, table, key_columns, deletions)
    return moved


# age aggregates ----------------------------------------------------------------------


def _apply_age_deltas(conn: Connection, deltas: Mapping[BucketKey, int]) -> None:
    """Adds signed student counts per (scope, birth date) to the four age aggregates.

    Rows are upserted in key order (totals last, so the hottest rows are locked for the
    shortest time) and deleted when they reach zero.
    """
    changed = {key: n for key, n in deltas.items() if n}
    if not changed:
        return
    birthdays: Counter[tuple[str, int, int]] = Counter()
    years: Counter[tuple[str, int]] = Counter()
    totals: dict[str, tuple[int, int]] = {}
    for (scope, birth), n in changed.items():
        birthdays[(scope, birth.month, birth.day)] += n
        years[(scope, birth.year)] += n
        count, year_total = totals.get(scope, (0, 0))
        totals[scope] = (count + n, year_total + n * birth.year)
    updates = [
        (
            age_buckets,
            ("scope", "birth_date"),
            [
                {"scope": scope, "birth_date": birth, "students": n}
                for (scope, birth), n in changed.items()
            ],
        ),
        (
            birthday_buckets,
            ("scope", "birth_month", "birth_day"),
            [
                {"scope": scope, "birth_month": month, "birth_day": day, "students": n}
                for (scope, month, day), n in birthdays.items()
                if n
            ],
        ),
        (
            age_years,
            ("scope", "birth_year"),
            [
                {"scope": scope, "birth_year": year, "students": n}
                for (scope, year), n in years.items()
                if n
            ],
        ),
        (
            age_totals,
            ("scope",),
            [
                {"scope": scope, "students": n, "birth_year_total": year_total}
                for scope, (n, year_total) in totals.items()
                if n or year_total
            ],
        ),
    ]
    for table, key_columns, rows in updates:
        _add_to_rows(conn, table, key_columns, rows)
    if any(n < 0 for n in changed.values()):
        for table, key_columns, rows in updates:
            _delete_empty_rows(conn, table, key_columns, rows)


def _apply_course_deltas(conn: Connection, deltas: Mapping[tuple[str, str, date], int]) -> None:
    """Moves the summaries of the courses whose enrollments changed (after the age buckets,
    from which each summary's earliest and latest birth dates are read back)."""
    summaries: dict[str, dict[str, Any]] = {}
    for (course_id, campus_id, birth), n in sorted(deltas.items()):
        if not n:
            continue
        summary = summaries.setdefault(
            course_id,
            {
                "course_id": course_id,
                "campus_id": campus_id,
                "scope": course_scope(course_id),
                "students": 0,
                "birth_year_total": 0,
                "earliest_birth_date": birth,
                "latest_birth_date": birth,
                **{born_in_month(month): 0 for month in BIRTH_MONTHS},
            },
        )
        summary["students"] += n
        summary["birth_year_total"] += n * birth.year
        summary[born_in_month(birth.month)] += n
        summary["earliest_birth_date"] = min(summary["earliest_birth_date"], birth)
        summary["latest_birth_date"] = max(summary["latest_birth_date"], birth)
    if not summaries:
        return
    table = course_summaries
    summed = ["students", "birth_year_total", *(born_in_month(month) for month in BIRTH_MONTHS)]
    upsert_rows(
        conn,
        table,
        [summaries[course_id] for course_id in sorted(summaries)],
        lambda insert: insert.on_conflict_do_update(
            index_elements=["course_id"],
            set_={name: table.c[name] + insert.excluded[name] for name in summed},
        ),
    )
    buckets = age_buckets.c
    for chunk in _chunks(sorted(summaries)):
        this_course = table.c.course_id.in_(chunk)
        conn.execute(delete(table).where(this_course, table.c.students <= 0))
        conn.execute(
            update(table)
            .where(this_course)
            .values(
                earliest_birth_date=select(func.min(buckets.birth_date))
                .where(buckets.scope == table.c.scope)
                .scalar_subquery(),
                latest_birth_date=select(func.max(buckets.birth_date))
                .where(buckets.scope == table.c.scope)
                .scalar_subquery(),
            )
        )


def _add_to_rows(
    conn: Connection, table: Table, key_columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """Adds each row's counts to the stored row with its key, creating the row if missing."""
    if not rows:
        return
    summed = [column.name for column in table.c if column.name not in key_columns]
    upsert_rows(
        conn,
        table,
        sorted(rows, key=lambda row: tuple(row[name] for name in key_columns)),
        lambda insert: insert.on_conflict_do_update(
            index_elements=list(key_columns),
            set_={name: table.c[name] + insert.excluded[name] for name in summed},
        ),
    )


def _delete_empty_rows(
    conn: Connection, table: Table, key_columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    keys = [tuple(row[name] for name in key_columns) for row in rows]
    _delete_keys(conn, table, key_columns, keys, table.c.students <= 0)


def _delete_keys(
    conn: Connection, table: Table, key_columns: Sequence[str], keys: Sequence[Key], *condition: Any
) -> None:
    """Deletes the rows with these keys (and the condition), a few hundred keys a statement."""
    columns = [table.c[name] for name in key_columns]
    for chunk in _chunks(sorted(keys)):
        match = columns[0].in_([key[0] for key in chunk]) if len(columns) == 1 else tuple_(*columns).in_(chunk)
        conn.execute(delete(table).where(match, *condition))


def _roster_row(event: StudentEnrolled) -> dict[str, Any]:
    return {
        "registration_id": event.registration_id,
        "course_id": event.course_id,
        "campus_id": event.campus_id,
        "email": event.email,
        "name": event.name,
        "birth_date": event.birth_date,
        "enroll_time": event.enroll_time,
    }


def _chunks(items: Sequence[T]) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), IDS_PER_STATEMENT):
        yield items[start : start + IDS_PER_STATEMENT]
