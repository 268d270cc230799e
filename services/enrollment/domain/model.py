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


@dataclass
class CourseSeats:
    """A course's seats as the decider sees them during one batch."""

    course_id: str
    campus_id: str
    name: str
    capacity: int
    enrolled: int
    enrolled_emails: set[str]

    def decide(self, email: str) -> Outcome:
        """Decides one registration and updates the seats; FIFO order is the caller's."""
        if email in self.enrolled_emails:
            return Outcome.DECLINED_DUPLICATE
        if self.enrolled >= self.capacity:
            return Outcome.DECLINED_FULL
        self.enrolled += 1
        self.enrolled_emails.add(email)
        return Outcome.ENROLLED


def normalize_email(email: str) -> str:
    """The identity of a student: trimmed and lowercased (the same address, any casing)."""
    return email.strip().lower()
