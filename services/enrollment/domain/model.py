"""Pure enrollment rules: identifiers, and the capacity decision. No I/O here."""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_CAPACITY = 1_000_000


class Outcome(enum.Enum):
    ENROLLED = "ENROLLED"
    DECLINED_FULL = "DECLINED_FULL"
    DECLINED_DUPLICATE = "DECLINED_DUPLICATE"
    DECLINED_UNKNOWN_COURSE = "DECLINED_UNKNOWN_COURSE"
    WAITLISTED = "WAITLISTED"
    CANCELLED = "CANCELLED"


# Where a registration can still move from: a cancellation applies to these only.
ACTIVE = frozenset({Outcome.ENROLLED, Outcome.WAITLISTED})


@dataclass
class CourseSeats:
    """A course's seats as the decider sees them during one batch."""

    course_id: str
    campus_id: str
    name: str
    capacity: int
    enrolled: int
    # The students holding a seat or a place on the waiting list (among those looked up).
    enrolled_emails: set[str]
    # The waiting list: its length, and the order key of its last place (0: never used).
    waiting: int = 0
    last_seq: int = 0

    def decide(self, email: str, join_waitlist: bool = False) -> Outcome:
        """Decides one registration and updates the seats; FIFO order is the caller's.

        A free seat exists only while nobody waits (a freed seat is given to the waiting
        list in the transaction that frees it), so taking it never jumps the line."""
        if email in self.enrolled_emails:
            return Outcome.DECLINED_DUPLICATE
        if self.enrolled >= self.capacity or self.waiting:
            if not join_waitlist:
                return Outcome.DECLINED_FULL
            self.waiting += 1
            self.last_seq += 1
            self.enrolled_emails.add(email)
            return Outcome.WAITLISTED
        self.enrolled += 1
        self.enrolled_emails.add(email)
        return Outcome.ENROLLED


def normalize_email(email: str) -> str:
    """The identity of a student: trimmed and lowercased (the same address, any casing)."""
    return email.strip().lower()
