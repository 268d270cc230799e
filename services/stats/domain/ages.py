"""Age arithmetic: a student's age on a date, and exact age metrics from birth-date counts.

A scope (a course, a campus, everyone) is kept as a count of students per birth date.
Its metrics on any date follow from a few sums over those counts, so a query never
looks at individual enrollments:

    age_on(b, t) = t.year - b.year - (1 if (b.month, b.day) > (t.month, t.day) else 0)

    sum of ages  = N * t.year - sum(students * b.year) - (students whose birthday is
                   still ahead of (t.month, t.day) in the year)

The youngest student is the one with the latest birth date and the oldest the one with
the earliest, because age never increases with the birth date. For the same reason the
median student is the middle one in birth-date order: counts per birth year say which
year holds the middle rank, and that year's birth dates (at most 366) say which date.
A date before a student's birth gives a negative age; the same arithmetic holds, so
figures stay exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date
from typing import TypeVar

K = TypeVar("K")


def birthday_not_reached(birth_date: date, as_of: date) -> bool:
    """True while the birthday is still ahead in as_of's year.

    Comparing (month, day) pairs makes a Feb 29 birthday "reached" on Mar 1 of a common
    year (Feb 29 > Feb 28, but not > Mar 1), and on Feb 29 itself in a leap year.
    """
    return (birth_date.month, birth_date.day) > (as_of.month, as_of.day)


def age_on(birth_date: date, as_of: date) -> int:
    """Age in whole years on as_of."""
    return as_of.year - birth_date.year - (1 if birthday_not_reached(birth_date, as_of) else 0)


@dataclass(frozen=True)
class BirthDateTally:
    """The sums over a scope's per-birth-date counts that determine its metrics on as_of."""

    students: int
    # sum(students * birth year)
    birth_year_total: int
    # Students whose birthday is still ahead in as_of's year.
    birthday_ahead: int
    earliest_birth_date: date | None
    latest_birth_date: date | None


@dataclass(frozen=True)
class AgeMetrics:
    student_count: int
    min_age: int
    max_age: int
    average_age: float


NO_STUDENTS = AgeMetrics(student_count=0, min_age=0, max_age=0, average_age=0.0)


def tally(counts: Mapping[date, int], as_of: date) -> BirthDateTally:
    """The tally of students per birth date, as the read model's query computes it in SQL."""
    present = {birth: n for birth, n in counts.items() if n > 0}
    return BirthDateTally(
        students=sum(present.values()),
        birth_year_total=sum(n * birth.year for birth, n in present.items()),
        birthday_ahead=sum(n for birth, n in present.items() if birthday_not_reached(birth, as_of)),
        earliest_birth_date=min(present, default=None),
        latest_birth_date=max(present, default=None),
    )


def metrics_on(sums: BirthDateTally, as_of: date) -> AgeMetrics:
    """Student count, youngest and oldest age and mean age on as_of, exactly."""
    if sums.students <= 0 or sums.earliest_birth_date is None or sums.latest_birth_date is None:
        return NO_STUDENTS
    total_age = sums.students * as_of.year - sums.birth_year_total - sums.birthday_ahead
    return AgeMetrics(
        student_count=sums.students,
        min_age=age_on(sums.latest_birth_date, as_of),
        max_age=age_on(sums.earliest_birth_date, as_of),
        average_age=total_age / sums.students,
    )


def median_ranks(students: int) -> tuple[int, int]:
    """The 0-based ranks of the middle student(s): one rank twice when the count is odd."""
    return (students - 1) // 2, students // 2


def locate(counts: Iterable[tuple[K, int]], rank: int) -> tuple[K, int]:
    """Walking (key, students) pairs in order: the key holding the rank-th student (0-based)
    and that student's rank within the key."""
    seen = 0
    for key, students in counts:
        if rank < seen + students:
            return key, rank - seen
        seen += students
    raise ValueError(f"rank {rank} is beyond the {seen} students counted")
