"""What the read model is made of: the enrollment event it applies and the scopes it counts.

A scope is one set of students whose ages are aggregated: one course's enrollments,
one campus's distinct students (by email), or all distinct students.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

OVERALL_SCOPE = "overall"


def course_scope(course_id: str) -> str:
    return f"course:{course_id}"


def campus_scope(campus_id: str) -> str:
    return f"campus:{campus_id}"


@dataclass(frozen=True)
class StudentEnrolled:
    """A student got a seat: one roster entry, identified by its registration id."""

    registration_id: str
    course_id: str
    campus_id: str
    # Normalized (lowercase) by the enrollment service: one email is one student.
    email: str
    name: str
    birth_date: date
    enroll_time: datetime
