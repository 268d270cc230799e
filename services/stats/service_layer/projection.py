"""Applies enrollment events to the read model, inside the consumer's checkpoint transaction.

Effectively once: an event moves counts only if this transaction inserted its roster
row (registration id is the key), and the rows commit together with the shard's
checkpoint. A record delivered again, or an event the outbox published twice, finds
its row already there and changes nothing.

Each batch is applied with a handful of upserts, one per table, each sent with
executemany (which SQLAlchemy turns into multi-row statements), whatever the batch
size. Rows are written in key order so that two workers updating the same campus or
overall rows lock them in the same order. Removal (`remove_enrollments`) is the exact
inverse, ready for cancellations.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, bindparam, delete, update
from sqlalchemy.dialects import postgresql, sqlite

from coursesignup.events.v1 import events_pb2
from libs.consumer import StreamRecord, decode_or_dead_letter
from libs.envelope import MalformedRecord, decode_envelope
from services.stats.adapters.tables import (
    age_buckets,
    age_totals,
    birthday_buckets,
    campus_students,
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


def decode_event(data: bytes) -> StudentEnrolled | None:
    """The enrollment an enrollment-events record carries; None for events without stats impact.

    Raises MalformedRecord (a ValueError, so the record goes to dead letters) for bytes
    that are not an envelope, messages that do not belong on this stream, and
    enrollments missing what the read model needs. Reasons never quote personal data.
    """
    envelope = decode_envelope(data)
    kind = envelope.WhichOneof("body")
    if kind == "registration_declined":
        return None  # a declined registration adds no student
    if kind != "student_enrolled":
        raise MalformedRecord(f"a {kind} message does not belong on the enrollment-events stream")
    return _student_enrolled(envelope)


def _student_enrolled(envelope: events_pb2.Envelope) -> StudentEnrolled:
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


def project_batch(conn: Connection, records: list[StreamRecord]) -> None:
    """The consumer's batch handler: decode, dead-letter what cannot be read, apply the rest."""
    enrollments = [
        event
        for _, event in decode_or_dead_letter(conn, records, decode_event)
        if event is not None
    ]
    applied = add_enrollments(conn, enrollments)
    log.debug(
        "batch projected",
        extra={"records": len(records), "enrollments": len(enrollments), "applied": applied},
    )


def add_enrollments(conn: Connection, events: Iterable[StudentEnrolled]) -> int:
    """Adds the enrollments not yet in the roster to every scope; returns how many were new."""
    first_seen: dict[str, StudentEnrolled] = {}
    for event in events:
        first_seen.setdefault(event.registration_id, event)
    if not first_seen:
        return 0
    statement = _insert(conn, roster).on_conflict_do_nothing(index_elements=["registration_id"])
    inserted = set(
        conn.execute(
            statement.returning(roster.c.registration_id),
            [_roster_row(first_seen[rid]) for rid in sorted(first_seen)],
        ).scalars()
    )
    fresh = [event for rid, event in first_seen.items() if rid in inserted]
    if not fresh:
        return 0

    deltas: Counter[BucketKey] = Counter()
    campus_additions: dict[Key, tuple[date, int]] = {}
    overall_additions: dict[Key, tuple[date, int]] = {}
    for event in fresh:
        deltas[(course_scope(event.course_id), event.birth_date)] += 1
        _count(campus_additions, (event.campus_id, event.email), event.birth_date)
        _count(overall_additions, (event.email,), event.birth_date)
    for (campus_id, _email), birth_date in _join(
        conn, campus_students, ("campus_id", "email"), campus_additions
    ):
        deltas[(campus_scope(campus_id), birth_date)] += 1
    for _key, birth_date in _join(conn, students, ("email",), overall_additions):
        deltas[(OVERALL_SCOPE, birth_date)] += 1
    _apply_age_deltas(conn, deltas)
    return len(fresh)


def remove_enrollments(
    conn: Connection, registration_ids: Iterable[str], removed_time: datetime
) -> int:
    """Takes enrollments out of every scope; returns how many were counted until now.

    The roster rows stay, marked removed: a redelivered enrollment then still finds its
    row and changes nothing, and a redelivered removal finds it already removed.
    """
    removed: list[Any] = []
    for chunk in _chunks(sorted(set(registration_ids))):
        removed.extend(
            conn.execute(
                update(roster)
                .where(roster.c.registration_id.in_(chunk), roster.c.removed_time.is_(None))
                .values(removed_time=removed_time)
                .returning(
                    roster.c.course_id, roster.c.campus_id, roster.c.email, roster.c.birth_date
                )
            ).all()
        )
    deltas: Counter[BucketKey] = Counter()
    for row in removed:
        deltas[(course_scope(row.course_id), row.birth_date)] -= 1
    campus_losses: Counter[Key] = Counter((row.campus_id, row.email) for row in removed)
    for (campus_id, _email), birth_date in _leave(
        conn, campus_students, ("campus_id", "email"), campus_losses
    ):
        deltas[(campus_scope(campus_id), birth_date)] -= 1
    overall_losses: Counter[Key] = Counter((row.email,) for row in removed)
    for _key, birth_date in _leave(conn, students, ("email",), overall_losses):
        deltas[(OVERALL_SCOPE, birth_date)] -= 1
    _apply_age_deltas(conn, deltas)
    return len(removed)


# membership --------------------------------------------------------------------------


def _count(additions: dict[Key, tuple[date, int]], key: Key, birth_date: date) -> None:
    first_birth_date, enrollments = additions.get(key, (birth_date, 0))
    additions[key] = (first_birth_date, enrollments + 1)


def _join(
    conn: Connection,
    table: Table,
    key_columns: Sequence[str],
    additions: Mapping[Key, tuple[date, int]],
) -> list[tuple[Key, date]]:
    """Adds enrollments to the members of a scope; returns the students who were not members."""
    if not additions:
        return []
    statement = _insert(conn, table)
    statement = statement.on_conflict_do_update(
        index_elements=list(key_columns),
        set_={"enrollments": table.c.enrollments + statement.excluded.enrollments},
    ).returning(*(table.c[name] for name in key_columns), table.c.birth_date, table.c.enrollments)
    rows = [
        {
            **dict(zip(key_columns, key, strict=True)),
            "birth_date": additions[key][0],
            "enrollments": additions[key][1],
        }
        for key in sorted(additions)
    ]
    joined = []
    for row in conn.execute(statement, rows):
        key = tuple(row[: len(key_columns)])
        # Members are deleted at zero, so a count equal to what this batch added is a new member.
        if row.enrollments == additions[key][1]:
            joined.append((key, row.birth_date))
    return joined


def _leave(
    conn: Connection, table: Table, key_columns: Sequence[str], losses: Mapping[Key, int]
) -> list[tuple[Key, date]]:
    """Takes enrollments from the members of a scope; returns the students who left it."""
    left = []
    for key in sorted(losses):
        match = [table.c[name] == value for name, value in zip(key_columns, key, strict=True)]
        row = conn.execute(
            update(table)
            .where(*match)
            .values(enrollments=table.c.enrollments - losses[key])
            .returning(table.c.birth_date, table.c.enrollments)
        ).one_or_none()
        if row is not None and row.enrollments <= 0:
            conn.execute(delete(table).where(*match))
            left.append((key, row.birth_date))
    return left


# age aggregates ----------------------------------------------------------------------


def _apply_age_deltas(conn: Connection, deltas: Mapping[BucketKey, int]) -> None:
    """Adds signed student counts per (scope, birth date) to the three age aggregates.

    Rows are upserted in key order (totals last, so the hottest rows are locked for the
    shortest time) and deleted when they reach zero.
    """
    changed = {key: n for key, n in deltas.items() if n}
    if not changed:
        return
    birthdays: Counter[tuple[str, int, int]] = Counter()
    totals: dict[str, tuple[int, int]] = {}
    for (scope, birth), n in changed.items():
        birthdays[(scope, birth.month, birth.day)] += n
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


def _add_to_rows(
    conn: Connection, table: Table, key_columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """Adds each row's counts to the stored row with its key, creating the row if missing."""
    if not rows:
        return
    summed = [column.name for column in table.c if column.name not in key_columns]
    statement = _insert(conn, table)
    statement = statement.on_conflict_do_update(
        index_elements=list(key_columns),
        set_={name: table.c[name] + statement.excluded[name] for name in summed},
    )
    conn.execute(statement, sorted(rows, key=lambda row: tuple(row[name] for name in key_columns)))


def _delete_empty_rows(
    conn: Connection, table: Table, key_columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    if not rows:
        return
    match = [table.c[name] == bindparam(f"k_{name}") for name in key_columns]
    conn.execute(
        delete(table).where(*match, table.c.students <= 0),
        [{f"k_{name}": row[name] for name in key_columns} for row in rows],
    )


# helpers -----------------------------------------------------------------------------


def _insert(conn: Connection, table: Table) -> Any:
    """INSERT with ON CONFLICT for the two databases the service runs on."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"the stats read model does not support {conn.dialect.name}")


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
