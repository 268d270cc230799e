"""The notification record, its kinds and delivery states, and the retry policy.

A `Notification` is one email the notifier owes a student: at most one per
registration and kind. Delivery ends SENT or FAILED; transient failures are retried
with exponential backoff and jitter, a bounded number of times.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from libs.backoff import Backoff


class NotificationKind(enum.StrEnum):
    """Which email: mirrors coursesignup.events.v1.NotificationKind without its prefix."""

    RECEIVED = "RECEIVED"
    ENROLLED = "ENROLLED"
    DECLINED_FULL = "DECLINED_FULL"
    DECLINED_DUPLICATE = "DECLINED_DUPLICATE"
    CANCELLED = "CANCELLED"
    WAITLISTED = "WAITLISTED"
    PROMOTED = "PROMOTED"


class DeliveryStatus(enum.StrEnum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Notification:
    """One email owed to a student, as the SendNotification command described it."""

    registration_id: str
    kind: NotificationKind
    recipient: str
    locale: str
    name: str
    course_id: str
    course_name: str
    # When the fact that calls for this email happened (Register's acceptance, the
    # decision), epoch seconds: where the email lag starts. None: not known (older rows).
    event_time: float | None = None
    # W3C traceparent of the span that recorded it: the sender's span continues its trace.
    trace_parent: str = ""
    # WAITLISTED: the place in line when the registration joined the waiting list (1 = next).
    waitlist_position: int = 0


@dataclass(frozen=True)
class ClaimedNotification:
    """A pending notification a sender took for one attempt.

    `attempt` is the attempts counter after the claim incremented it; it doubles as a
    fencing token: the outcome is recorded only if nobody re-claimed the row since.
    `claimed_until` (epoch seconds) is when the claim lapses and another sender may
    take the row: a send must not start so late that it could still run by then.
    """

    id: int
    attempt: int
    notification: Notification
    claimed_until: float = float("inf")


@dataclass(frozen=True)
class NotificationView:
    """What ListNotifications shows of one notification."""

    registration_id: str
    kind: NotificationKind
    recipient: str
    status: DeliveryStatus
    attempts: int
    last_error: str | None
    create_time: datetime
    send_time: datetime | None


@dataclass(frozen=True)
class QueueStats:
    """The notifications table as an operator watches it."""

    # Neither sent nor failed yet: the queue depth.
    pending: int
    # Pending and due now: not claimed by a sender, not waiting out a retry backoff.
    due: int
    # Pending after at least one failed attempt.
    retrying: int
    # Ended FAILED.
    failed: int
    # How long the oldest pending notification has waited.
    oldest_pending_seconds: float


class DeliveryError(Exception):
    """Sending one email failed; `permanent` says whether trying again can help."""

    permanent: bool = False

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TransientDeliveryError(DeliveryError):
    """Connection trouble, timeouts, 4xx replies: another attempt may succeed."""


class PermanentDeliveryError(DeliveryError):
    """5xx replies, invalid addresses: another attempt would fail the same way."""

    permanent = True


# Outcomes of one attempt, recorded by the sender in batches.


@dataclass(frozen=True)
class Delivered:
    claim_id: int
    attempt: int
    send_time: datetime


@dataclass(frozen=True)
class RetryLater:
    claim_id: int
    attempt: int
    error: str
    next_attempt_at: float


@dataclass(frozen=True)
class GaveUp:
    claim_id: int
    attempt: int
    error: str


@dataclass(frozen=True)
class NotAttempted:
    """The claim ran too short to start the send in time: due again, the attempt not counted."""

    claim_id: int
    attempt: int


Outcome = Delivered | RetryLater | GaveUp | NotAttempted


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for transient failures, up to `max_attempts`."""

    max_attempts: int = 5
    base_delay_seconds: float = 1.0
    max_delay_seconds: float = 300.0

    @cached_property
    def backoff(self) -> Backoff:
        return Backoff(base_seconds=self.base_delay_seconds, cap_seconds=self.max_delay_seconds)

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): the mesh's one backoff."""
        return self.backoff.delay(attempt)

    def after_failure(self, claim: ClaimedNotification, error: DeliveryError, now: float) -> Outcome:
        if error.permanent or claim.attempt >= self.max_attempts:
            return GaveUp(claim.id, claim.attempt, error.reason)
        return RetryLater(claim.id, claim.attempt, error.reason, now + self.delay(claim.attempt))
