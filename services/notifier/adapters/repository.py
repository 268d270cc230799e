"""The notifications table: the log of emails, and the queue the sender works from.

One row per (registration_id, kind), enforced by a unique constraint; recording a
command twice inserts nothing (INSERT ... ON CONFLICT DO NOTHING, `libs.db.upsert_count`). The sender claims
due PENDING rows by incrementing `attempts` and pushing `next_attempt_at` past a claim
lease, in one transaction (FOR UPDATE SKIP LOCKED on PostgreSQL; SQLite serializes
writers with BEGIN IMMEDIATE), so two senders never hold the same row. Outcomes are
written only if `attempts` still equals the claimed attempt: a sender whose claim
expired and was re-claimed by another cannot overwrite the newer attempt.

`delivery_stats` counts the queue for operators from the two partial indexes (pending
rows, failed rows), so it stays cheap however many emails were sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    case,
    func,
    select,
    update,
)

from libs import consumer as consumer_lib
from libs.db import as_utc, ensure_schema, upsert_count
from services.notifier.domain.model import (
    ClaimedNotification,
    Delivered,
    DeliveryStatus,
    GaveUp,
    NotAttempted,
    Notification,
    NotificationKind,
    NotificationView,
    Outcome,
    QueueStats,
    RetryLater,
)

metadata = MetaData()

notifications = Table(
    "notifications",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("registration_id", String(256), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("recipient", String(320), nullable=False),
    Column("locale", String(16), nullable=False),
    Column("name", Text, nullable=False),
    Column("course_id", String(128), nullable=False),
    Column("course_name", Text, nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("create_time", DateTime(timezone=True), nullable=False),
    Column("send_time", DateTime(timezone=True), nullable=True),
    # Epoch seconds; NULL once SENT or FAILED. While claimed: the claim's expiry.
    Column("next_attempt_at", Float, nullable=True),
    # Epoch seconds of the fact that called for the email (acceptance, decision): the
    # start of the email lag metric. NULL in rows recorded before it was kept.
    Column("event_time", Float, nullable=True),
    # W3C traceparent of the consumer span that recorded the row (tracing on), so the
    # send continues the registration's trace; NULL when tracing was off.
    Column("trace_parent", String(64), nullable=True),
    # WAITLISTED emails: the place in line when the registration joined it.
    Column("waitlist_position", Integer, nullable=True),
    UniqueConstraint("registration_id", "kind", name="uq_notifications_registration_kind"),
)

# Only pending rows are ever scanned for work, so the index holds only them.
Index(
    "ix_notifications_due",
    notifications.c.next_attempt_at,
    postgresql_where=notifications.c.status == DeliveryStatus.PENDING.value,
    sqlite_where=notifications.c.status == DeliveryStatus.PENDING.value,
)
# Failed rows are few; this lets operators count them without scanning every email sent.
Index(
    "ix_notifications_failed",
    notifications.c.id,
    postgresql_where=notifications.c.status == DeliveryStatus.FAILED.value,
    sqlite_where=notifications.c.status == DeliveryStatus.FAILED.value,
)

_MAX_ERROR_CHARS = 2000


def create_tables(engine: Engine) -> None:
    """Creates missing tables and indexes; refuses a database from an older version."""
    ensure_schema(engine, metadata, consumer_lib.metadata)


def add_notifications(conn: Connection, batch: Sequence[Notification], now: datetime) -> int:
    """Records new notifications as PENDING, due now; ones already recorded are left alone.

    Runs in the caller's transaction (the consumer's checkpoint transaction).
    Returns how many rows were new.
    """
    unique: dict[tuple[str, NotificationKind], Notification] = {}
    for notification in batch:
        unique.setdefault((notification.registration_id, notification.kind), notification)
    if not unique:
        return 0
    now = now.astimezone(UTC)
    constants = {"status": DeliveryStatus.PENDING.value, "attempts": 0, "create_time": now,
                 "next_attempt_at": now.timestamp()}
    rows = [
        {"registration_id": n.registration_id, "kind": n.kind.value, "recipient": n.recipient, "locale": n.locale,
         "name": n.name, "course_id": n.course_id, "course_name": n.course_name, "event_time": n.event_time,
         "trace_parent": n.trace_parent or None, "waitlist_position": n.waitlist_position or None, **constants}
        for n in unique.values()
    ]
    return upsert_count(
        conn, notifications, rows,
        lambda insert: insert.on_conflict_do_nothing(index_elements=["registration_id", "kind"]),
    )


def _notification(row: Any) -> Notification:
    return Notification(
        registration_id=row.registration_id,
        kind=NotificationKind(row.kind),
        recipient=row.recipient,
        locale=row.locale,
        name=row.name,
        course_id=row.course_id,
        course_name=row.course_name,
        event_time=row.event_time,
        trace_parent=row.trace_parent or "",
        waitlist_position=row.waitlist_position or 0,
    )


class NotificationStore:
    """Blocking database access for the sender and the gRPC API (call via asyncio.to_thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def claim_due(self, *, now: float, limit: int, lease_seconds: float) -> list[ClaimedNotification]:
        """Takes up to `limit` due PENDING rows for one attempt each, oldest due first."""
        t = notifications
        with self.engine.begin() as conn:
            rows = conn.execute(
                # Only what sending needs: converting the timestamps is most of a row's cost.
                select(t.c.id, t.c.attempts, t.c.registration_id, t.c.kind, t.c.recipient, t.c.locale, t.c.name,
                       t.c.course_id, t.c.course_name, t.c.event_time, t.c.trace_parent,
                       t.c.waitlist_position)
                .where(t.c.status == DeliveryStatus.PENDING.value, t.c.next_attempt_at <= now)
                .order_by(t.c.next_attempt_at, t.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True)
            ).all()
            if not rows:
                return []
            conn.execute(
                update(t)
                .where(t.c.id.in_([row.id for row in rows]))
                .values(attempts=t.c.attempts + 1, next_attempt_at=now + lease_seconds)
            )
        return [ClaimedNotification(row.id, row.attempts + 1, _notification(row), now + lease_seconds)
                for row in rows]

    def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Writes attempt outcomes in one transaction; stale claims change nothing."""
        t = notifications
        still_mine = (
            t.c.id == bindparam("b_id"),
            t.c.attempts == bindparam("b_attempt"),
            t.c.status == DeliveryStatus.PENDING.value,
        )
        sent = [{"b_id": o.claim_id, "b_attempt": o.attempt, "b_send_time": o.send_time.astimezone(UTC)}
                for o in outcomes if isinstance(o, Delivered)]
        retried = [{"b_id": o.claim_id, "b_attempt": o.attempt, "b_error": o.error[:_MAX_ERROR_CHARS],
                    "b_due": o.next_attempt_at}
                   for o in outcomes if isinstance(o, RetryLater)]
        failed = [{"b_id": o.claim_id, "b_attempt": o.attempt, "b_error": o.error[:_MAX_ERROR_CHARS]}
                  for o in outcomes if isinstance(o, GaveUp)]
        # Handed back unsent: due again now, and the claim's attempt does not count.
        unattempted = [{"b_id": o.claim_id, "b_attempt": o.attempt, "b_due": time.time()}
                       for o in outcomes if isinstance(o, NotAttempted)]
        with self.engine.begin() as conn:
            if sent:
                conn.execute(
                    update(t).where(*still_mine).values(
                        status=DeliveryStatus.SENT.value, send_time=bindparam("b_send_time"), next_attempt_at=None
                    ),
                    sent,
                )
            if retried:
                conn.execute(
                    update(t).where(*still_mine).values(
                        last_error=bindparam("b_error"), next_attempt_at=bindparam("b_due")
                    ),
                    retried,
                )
            if failed:
                conn.execute(
                    update(t).where(*still_mine).values(
                        status=DeliveryStatus.FAILED.value, last_error=bindparam("b_error"), next_attempt_at=None
                    ),
                    failed,
                )
            if unattempted:
                conn.execute(
                    update(t).where(*still_mine).values(attempts=t.c.attempts - 1, next_attempt_at=bindparam("b_due")),
                    unattempted,
                )

    def release(self, claims: Sequence[ClaimedNotification], now: float) -> None:
        """Makes interrupted claims due again at once (shutdown), instead of after the lease."""
        if not claims:
            return
        t = notifications
        with self.engine.begin() as conn:
            conn.execute(
                update(t)
                .where(t.c.id == bindparam("b_id"), t.c.attempts == bindparam("b_attempt"),
                       t.c.status == DeliveryStatus.PENDING.value)
                .values(next_attempt_at=now),
                [{"b_id": c.id, "b_attempt": c.attempt} for c in claims],
            )

    def list_for_registration(self, registration_id: str) -> list[NotificationView]:
        t = notifications
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(t).where(t.c.registration_id == registration_id).order_by(t.c.create_time, t.c.id)
            ).all()
        return [
            NotificationView(
                registration_id=row.registration_id,
                kind=NotificationKind(row.kind),
                recipient=row.recipient,
                status=DeliveryStatus(row.status),
                attempts=row.attempts,
                last_error=row.last_error,
                create_time=as_utc(row.create_time),
                send_time=as_utc(row.send_time),
            )
            for row in rows
        ]

    def delivery_stats(self, now: float) -> QueueStats:
        """The queue as an operator sees it, over every notifier process sharing the database."""
        t = notifications
        pending = t.c.status == DeliveryStatus.PENDING.value
        with self.engine.connect() as conn:
            row = conn.execute(
                select(
                    func.count(),
                    func.coalesce(func.sum(case((t.c.next_attempt_at <= now, 1), else_=0)), 0),
                    func.coalesce(func.sum(case((t.c.last_error.is_not(None), 1), else_=0)), 0),
                    func.min(t.c.create_time),
                ).where(pending)
            ).one()
            failed = conn.execute(
                select(func.count()).select_from(t).where(t.c.status == DeliveryStatus.FAILED.value)
            ).scalar_one()
        oldest = as_utc(row[3])
        return QueueStats(
            pending=int(row[0]),
            due=int(row[1]),
            retrying=int(row[2]),
            failed=int(failed),
            oldest_pending_seconds=max(0.0, now - oldest.timestamp()) if oldest is not None else 0.0,
        )

