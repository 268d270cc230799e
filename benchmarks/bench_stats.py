"""Stats read latency: the read model's metric queries next to the naive SQL aggregate
over the roster, at 10 thousand and 1 million enrollments, on PostgreSQL.

In a fresh schema of TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test),
dropped afterwards:

1. the roster is bulk-loaded with one INSERT ... SELECT over generate_series per step
   (2,000 courses on 20 campuses, students taking 2.5 courses on average, birth dates
   over 58 years), and the aggregates are counted from it by the rebuild's recount
   (the projection's own code, in chunks: its rate is printed too), followed like the
   rebuild by VACUUM ANALYZE;
2. each query runs many times with random courses and dates; p50 and p99 are printed
   for the read model (GetCourseStats / GetOverallStats as the service computes them,
   BASIC and FULL view, QueryCourseStats, a ListEnrollments page) and for the naive
   aggregate over the roster (what a read would cost without the aggregates), with
   the ratio of the two.

Latencies are measured at the service layer (database round trips and Python), not
through gRPC, whose own cost does not change with the data.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import date, timedelta

from sqlalchemy import Engine, create_engine, text

from libs.db import make_engine
from services.stats.adapters.tables import create_schema
from services.stats.domain.model import OVERALL_SCOPE, course_scope
from services.stats.service_layer import queries, views
from services.stats.service_layer.projection import recount_from_roster
from services.stats.service_layer.rebuild import CHUNK_SIZE as REBUILD_CHUNK_SIZE
from services.stats.service_layer.rebuild import vacuum_analyze

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
COURSES = 2000
CAMPUSES = 20
STUDENTS_PER_ENROLLMENT = 0.4  # 1M enrollments come from 400k students
BIRTH_DAYS = 21_000  # 1950-01-01 + up to 57.5 years
LOAD_STEP = 250_000

_LOAD = text(
    """
    INSERT INTO roster (registration_id, course_id, campus_id, email, name, birth_date, enroll_time)
    SELECT 'reg-' || lpad(g::text, 8, '0'),
           'course-' || (g % :courses),
           'campus-' || ((g % :courses) % :campuses),
           'student' || ((g::bigint * 104729) % :students) || '@example.org',
           'Student ' || ((g::bigint * 104729) % :students),
           date '1950-01-01' + (((g::bigint * 104729) % :students) * 7919 % :birth_days)::int,
           timestamptz '2025-01-01 00:00:00+00' + g * interval '1 second'
    FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS g
    """
)

# What a read costs without aggregates: ages computed from every roster row of the scope.
_AGE = """(extract(year from age(CAST(:as_of AS date), birth_date)))"""
_NAIVE_COURSE = text(
    f"""
    SELECT count(*), min({_AGE}), max({_AGE}), avg({_AGE})
    FROM roster WHERE course_id = :course_id AND removed_time IS NULL
    """
)
_NAIVE_OVERALL = text(
    f"""
    SELECT count(*), min({_AGE}), max({_AGE}), avg({_AGE})
    FROM (SELECT DISTINCT ON (email) email, birth_date FROM roster
          WHERE removed_time IS NULL ORDER BY email, enroll_time, registration_id) AS students
    """
)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks stats", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000", help="enrollment counts (default %(default)s)")
    parser.add_argument("--queries", type=int, default=2000, help="timed calls per read-model query")
    parser.add_argument("--naive-seconds", type=float, default=20.0, help="time budget per naive query")
    args = parser.parse_args(argv)
    sizes = sorted(int(size) for size in args.sizes.split(","))
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_URL).replace("postgresql://", "postgresql+psycopg://", 1)
    schema = f"bench_stats_{uuid.uuid4().hex[:8]}"
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    except Exception as error:  # noqa: BLE001 - reported, not raised
        print(f"PostgreSQL not reachable at {url} ({error.__class__.__name__}); set TEST_DATABASE_URL")
        return 1
    separator = "&" if "?" in url else "?"
    engine = make_engine(f"{url}{separator}options=-csearch_path%3D{schema}")
    try:
        create_schema(engine)
        loaded = 0
        results = []
        for size in sizes:
            loaded = _load(engine, loaded, size)
            results.append((size, _measure(engine, size, args.queries, args.naive_seconds)))
        _summary(results)
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()
        print(f"dropped schema {schema}", flush=True)
    return 0


def _load(engine: Engine, loaded: int, size: int) -> int:
    students = max(1, int(size * STUDENTS_PER_ENROLLMENT))
    started = time.monotonic()
    for first in range(loaded, size, LOAD_STEP):
        last = min(first + LOAD_STEP, size) - 1
        with engine.begin() as conn:
            conn.execute(
                _LOAD,
                {"first": first, "last": last, "courses": COURSES, "campuses": CAMPUSES, "students": students,
                 "birth_days": BIRTH_DAYS},
            )
        print(f"  roster rows: {last + 1:,}/{size:,}", flush=True)
    print(f"loaded {size - loaded:,} roster rows in {time.monotonic() - started:.1f} s", flush=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE roster")
    started = time.monotonic()
    step = max(size // 10, 1)
    shown = [0]

    def progress(done: int) -> None:
        if done - shown[0] >= step or done == size:
            shown[0] = done
            print(f"  counted {done:,}/{size:,}", flush=True)

    with engine.begin() as conn:
        recount_from_roster(conn, chunk_size=REBUILD_CHUNK_SIZE, progress=progress)
    seconds = time.monotonic() - started
    print(f"counted the aggregates of {size:,} enrollments in {seconds:.1f} s ({size / seconds:,.0f}/s: the rebuild's "
          "rate)", flush=True)
    # What the rebuild command does after it commits (autovacuum would, later).
    vacuum_analyze(engine)
    return size


def _timed(call: Callable[[], object], count: int, budget: float) -> list[float]:
    for _ in range(min(20, count)):
        call()  # warm caches and SQLAlchemy's statement cache
    samples: list[float] = []
    deadline = time.monotonic() + budget
    while len(samples) < count and (time.monotonic() < deadline or len(samples) < 5):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def _percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _measure(engine: Engine, size: int, count: int, naive_budget: float) -> dict[str, tuple[float, float, int]]:
    rng = random.Random(size)

    def a_course() -> str:
        return f"course-{rng.randrange(COURSES)}"

    def a_day() -> date:
        return date(2020, 1, 1) + timedelta(days=rng.randrange(3000))

    key = b"bench"
    cases: list[tuple[str, Callable[[], object], int, float]] = [
        ("course stats (read model)", lambda: views.age_stats(engine, course_scope(a_course()), a_day()), count, 1e9),
        ("overall stats (read model)", lambda: views.age_stats(engine, OVERALL_SCOPE, a_day()), count, 1e9),
        ("course stats FULL (+histogram)",
         lambda: views.age_stats(engine, course_scope(a_course()), a_day(), with_histogram=True), count, 1e9),
        ("overall stats FULL (+histogram)",
         lambda: views.age_stats(engine, OVERALL_SCOPE, a_day(), with_histogram=True), count // 4, 1e9),
        ("QueryCourseStats, 50 of 2000 courses",
         lambda: queries.query_course_stats(
             engine,
             queries.ListingRequest('campus_id = "campus-7" OR student_count >= 3', "average_age desc", 50, "",
                                    a_day()),
             key,
         ), count // 10, 1e9),
        ("ListEnrollments page of 50",
         lambda: queries.list_enrollments(
             engine, a_course(), queries.ListingRequest("age >= 30", "name", 50, "", a_day()), key
         ), count // 4, 1e9),
        ("course stats (naive SQL over roster)",
         lambda: _naive(engine, _NAIVE_COURSE, {"course_id": a_course(), "as_of": a_day()}), count, naive_budget),
        ("overall stats (naive SQL over roster)",
         lambda: _naive(engine, _NAIVE_OVERALL, {"as_of": a_day()}), count, naive_budget),
    ]
    figures = {}
    print(f"\nat {size:,} enrollments:", flush=True)
    for name, call, calls, budget in cases:
        samples = _timed(call, calls, budget)
        p50, p99 = _percentiles(samples)
        figures[name] = (p50, p99, len(samples))
        print(f"  {name:40s} p50 {p50:9.3f} ms   p99 {p99:9.3f} ms   ({len(samples)} calls)", flush=True)
    return figures


def _naive(engine: Engine, statement: object, params: dict[str, object]) -> object:
    with engine.connect() as conn:
        return conn.execute(statement, params).one()  # type: ignore[call-overload]


def _summary(results: list[tuple[int, dict[str, tuple[float, float, int]]]]) -> None:
    print("\nsummary (p50 / p99 in ms; ratio = naive / read model):", flush=True)
    for size, figures in results:
        for scope in ("course", "overall"):
            fast = figures[f"{scope} stats (read model)"]
            slow = figures[f"{scope} stats (naive SQL over roster)"]
            print(
                f"  {size:>9,} enrollments, {scope:7s}: read model {fast[0]:.3f} / {fast[1]:.3f}, "
                f"naive {slow[0]:.3f} / {slow[1]:.3f}, ratio p50 {slow[0] / fast[0]:,.1f}x, "
                f"p99 {slow[1] / fast[1]:,.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
