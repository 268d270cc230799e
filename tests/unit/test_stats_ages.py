"""Age arithmetic of the stats service, and its aggregate metrics against brute force."""

from __future__ import annotations

import random
from collections import Counter
from datetime import date, timedelta

import pytest

from services.stats.domain.ages import NO_STUDENTS, age_on, metrics_on, tally


@pytest.mark.parametrize(
    ("birth_date", "as_of", "age"),
    [
        (date(2000, 6, 15), date(2020, 6, 14), 19),  # the day before the birthday
        (date(2000, 6, 15), date(2020, 6, 15), 20),  # the birthday
        (date(2000, 6, 15), date(2020, 12, 31), 20),
        (date(2000, 6, 15), date(2021, 1, 1), 20),
        (date(2000, 6, 15), date(2000, 6, 15), 0),  # the day of birth
        (date(2000, 2, 29), date(2021, 2, 28), 20),  # common year: not yet on Feb 28
        (date(2000, 2, 29), date(2021, 3, 1), 21),  # ... a year older on Mar 1
        (date(2000, 2, 29), date(2024, 2, 28), 23),  # leap year: not yet on Feb 28
        (date(2000, 2, 29), date(2024, 2, 29), 24),  # ... a year older on Feb 29
        (date(2000, 2, 29), date(2024, 3, 1), 24),
        (date(2001, 2, 28), date(2024, 2, 28), 23),  # Feb 28 birthdays are unaffected by leap years
        (date(2001, 3, 1), date(2024, 2, 29), 22),
        (date(1999, 12, 31), date(2000, 1, 1), 0),
    ],
)
def test_age_is_whole_years_with_feb_29_birthdays_turning_on_mar_1_in_common_years(
    birth_date, as_of, age
):
    assert age_on(birth_date, as_of) == age


def test_age_matches_counting_birthdays_day_by_day():
    birth = date(2004, 2, 29)
    day, age = birth, 0
    while day < date(2013, 3, 2):
        assert age_on(birth, day) == age, day
        day += timedelta(days=1)
        leap_birthday = (day.month, day.day) == (2, 29)
        common_year_substitute = (day.month, day.day) == (3, 1) and not _is_leap(day.year)
        if leap_birthday or common_year_substitute:
            age += 1


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def _random_birth_date(rng: random.Random) -> date:
    # Birth dates cluster on few days so that buckets hold several students, with
    # Feb 29 and the days around any as_of over-represented.
    if rng.random() < 0.15:
        return date(rng.choice([1996, 2000, 2004, 2008]), 2, 29)
    return date(1940, 1, 1) + timedelta(
        days=rng.randrange(0, 70 * 365, 7 if rng.random() < 0.5 else 1)
    )


def test_aggregate_metrics_equal_brute_force_over_every_student():
    rng = random.Random(20240229)
    interesting_days = [
        date(2023, 2, 28),
        date(2023, 3, 1),
        date(2024, 2, 28),
        date(2024, 2, 29),
        date(2024, 3, 1),
        date(2024, 12, 31),
        date(2025, 1, 1),
    ]
    for trial in range(300):
        birth_dates = [_random_birth_date(rng) for _ in range(rng.randint(1, 60))]
        as_of = (
            rng.choice(interesting_days)
            if trial % 2
            else date(2010, 1, 1) + timedelta(days=rng.randrange(6000))
        )
        ages = [age_on(b, as_of) for b in birth_dates]

        metrics = metrics_on(tally(Counter(birth_dates), as_of), as_of)

        assert metrics.student_count == len(ages)
        assert metrics.min_age == min(ages)
        assert metrics.max_age == max(ages)
        assert metrics.average_age == pytest.approx(sum(ages) / len(ages), abs=1e-12)


def test_empty_buckets_and_buckets_at_zero_give_zeros():
    as_of = date(2024, 5, 1)
    assert metrics_on(tally({}, as_of), as_of) == NO_STUDENTS
    assert metrics_on(tally({date(2000, 1, 1): 0}, as_of), as_of) == NO_STUDENTS


def test_a_bucket_removed_to_zero_no_longer_decides_the_oldest_age():
    as_of = date(2024, 5, 1)
    counts = Counter({date(1950, 1, 1): 1, date(2000, 1, 1): 2})
    counts[date(1950, 1, 1)] -= 1
    metrics = metrics_on(tally(counts, as_of), as_of)
    assert (metrics.student_count, metrics.min_age, metrics.max_age, metrics.average_age) == (
        2,
        24,
        24,
        24.0,
    )
