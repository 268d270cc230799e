"""Rebuilding the read model from the enrollment service (its ExportEnrollments stream,
served by a real enrollment server) ends where the incremental projection ends, on both
databases, also when the stream is reset mid-way (by a real TCP proxy) and resumed,
refuses to race running workers, and changes nothing when the export fails."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from sqlalchemy import delete, insert, select

from libs import consumer as consumer_lib
from libs.backoff import Backoff
from libs.db import make_engine
from services.enrollment.adapters import tables as enrollment_tables
from services.stats import rebuild as rebuild_command
from services.stats.adapters import enrollment_export
from services.stats.adapters.enrollment_export import RESUME_MESSAGE, EnrollmentExport
from services.stats.adapters.tables import age_years, course_summaries, create_schema, metadata
from services.stats.domain.model import StudentEnrolled
from services.stats.service_layer import queries, views
from services.stats.service_layer.projection import add_enrollments, remove_enrollments
from services.stats.service_layer.rebuild import (
    WorkersStillRunning,
    complete_older_read_model,
    rebuild_from_enrollments,
)
from tests import helpers
from tests.helpers import postgres_schema

ADMIN_TOKEN = helpers.ADMIN_TOKEN  # one of ADMIN_TOKENS (tests/conftest.py)
COURSES = {"cs101": "north", "cs102": "north", "ma201": "north", "bio1": "south", "art9": "south"}
CREATED = datetime(2024, 12, 1, tzinfo=UTC)
# Resumes in tests wait milliseconds, not the command's seconds.
FAST = Backoff(base_seconds=0.01, cap_seconds=0.05)


@pytest.fixture
def enrollment_url(database_url, tmp_path):
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'enrollment.db'}"
    else:
        with postgres_schema() as url:
            yield url


@pytest.fixture
def enrollment_target(kinesis_env, enrollment_url):
    """A real enrollment server on the enrollment database; its address."""
    with helpers.serve_enrollment(enrollment_url) as target:
        yield target


@pytest.fixture
def engines(database_url, enrollment_url, enrollment_target):
    """The stats database, and the enrollment database (written directly by the tests
    only: the rebuild reads it through the enrollment server)."""
    stats, enrollment = make_engine(database_url), make_engine(enrollment_url)
    create_schema(stats)
    consumer_lib.metadata.create_all(stats)
    enrollment_tables.metadata.create_all(enrollment)
    yield stats, enrollment
    stats.dispose()
    enrollment.dispose()


@pytest.fixture
def export(enrollment_target) -> EnrollmentExport:
    return EnrollmentExport(enrollment_target, ADMIN_TOKEN, page_size=37)


def _history(rng: random.Random) -> tuple[list[StudentEnrolled], list[StudentEnrolled]]:
    """Enrollments that stand, and enrollments cancelled later. Some students gave two
    birth dates in two courses; enroll times do not follow registration order."""
    kept, cancelled = [], []
    taken: set[tuple[str, str]] = set()
    for number in range(360):
        email = f"student{rng.randrange(120)}@example.org"
        course_id = rng.choice(sorted(COURSES))
        if (course_id, email) in taken:
            continue  # the enrollment service's (course, email) key
        taken.add((course_id, email))
        born = date(2000, 2, 29) if number % 13 == 0 else date(1955, 1, 1) + timedelta(days=rng.randrange(20000))
        event = StudentEnrolled(
            registration_id=f"reg-{rng.randrange(10**9):09d}-{number}",
            course_id=course_id,
            campus_id=COURSES[course_id],
            email=email,
            name=f"Student {number}",
            birth_date=born,
            enroll_time=datetime(2025, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(600)),
        )
        (cancelled if number % 8 == 0 else kept).append(event)
    return kept, cancelled


def _write_enrollment_database(engine, enrolled: list[StudentEnrolled]) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(enrollment_tables.campuses),
            [{"campus_id": c, "name": c.title(), "create_time": CREATED} for c in sorted(set(COURSES.values()))],
        )
        conn.execute(
            insert(enrollment_tables.courses),
            [
                {"course_id": c, "campus_id": campus, "name": c, "capacity": 1000, "enrolled_count": 0,
                 "create_time": CREATED, "update_time": CREATED}
                for c, campus in COURSES.items()
            ],
        )
        conn.execute(
            insert(enrollment_tables.enrollments),
            [
                {"course_id": e.course_id, "email": e.email, "registration_id": e.registration_id, "name": e.name,
                 "birth_date": e.birth_date, "enroll_time": e.enroll_time}
                for e in enrolled
            ],
        )


def _project_incrementally(engine, kept, cancelled, rng: random.Random) -> None:
    """Events in shard-like disorder, in batches, some delivered twice; then cancellations."""
    events = kept + cancelled
    rng.shuffle(events)
    position = 0
    while position < len(events):
        size = rng.randint(1, 40)
        batch = events[position : position + size] + rng.sample(events, 3)
        with engine.begin() as conn:
            add_enrollments(conn, batch)
        position += size
    with engine.begin() as conn:
        remove_enrollments(conn, [e.registration_id for e in cancelled], datetime(2025, 2, 1, tzinfo=UTC))


def _contents(engine, skip=()) -> dict[str, list[tuple]]:
    """Every read-model table, rows sorted; dates and times normalized across drivers."""
    with engine.connect() as conn:
        return {
            table.name: sorted(
                (tuple(_normal(value) for value in row) for row in conn.execute(select(table))), key=repr
            )
            for table in metadata.sorted_tables
            if table.name not in skip
        }


def _normal(value):
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value


def _figures(engine) -> list:
    as_of = date(2025, 2, 28)
    scopes = [f"course:{c}" for c in COURSES] + ["campus:north", "campus:south", "overall"]
    stats = [views.age_stats(engine, scope, as_of, with_histogram=True) for scope in scopes]
    courses = queries.query_course_stats(engine, queries.ListingRequest("", "", 1000, "", as_of), b"key").items
    return [stats, courses]


def test_a_rebuild_from_the_enrollment_service_ends_identical_to_the_incremental_projection(
    engines, export, database_url, tmp_path
):
    stats, enrollment = engines
    rng = random.Random(5)
    kept, cancelled = _history(rng)
    assert len({e.birth_date for e in kept if e.email == kept[0].email}) >= 1
    _write_enrollment_database(enrollment, kept)
    _project_incrementally(stats, kept, cancelled, rng)
    incremental, figures = _contents(stats), _figures(stats)
    assert len(incremental["roster"]) == len(kept) + len(cancelled)

    progress: list[tuple[str, int, int]] = []
    summary = rebuild_from_enrollments(stats, export, lambda *step: progress.append(step), chunk_size=50)

    assert _contents(stats) == incremental
    assert _figures(stats) == figures
    assert (summary.enrollments, summary.tombstones_kept) == (len(kept), len(cancelled))
    assert progress[0] == ("copy enrollments", 0, len(kept))
    assert ("copy enrollments", 37, len(kept)) in progress, "one step per exported page"
    assert ("copy enrollments", len(kept), len(kept)) in progress
    assert progress[-1] == ("count aggregates", len(kept), len(kept))

    # The restarted consumer reads again records the rebuild already counted: no change.
    with stats.begin() as conn:
        assert add_enrollments(conn, kept + cancelled) == 0
    assert _contents(stats) == incremental


def test_a_rebuild_into_an_empty_database_gives_the_same_figures(engines, export, database_url, tmp_path):
    stats, enrollment = engines
    rng = random.Random(6)
    kept, cancelled = _history(rng)
    _write_enrollment_database(enrollment, kept)
    _project_incrementally(stats, kept, cancelled, rng)
    fresh = make_engine(f"sqlite:///{tmp_path / 'fresh-stats.db'}")
    try:
        rebuild_from_enrollments(fresh, export)
        skip = {"roster"}  # the fresh one has no tombstones of the cancelled enrollments
        assert _contents(fresh, skip) == _contents(stats, skip)
        assert _figures(fresh) == _figures(stats)
    finally:
        fresh.dispose()


def test_a_rebuild_refuses_to_run_while_a_stats_worker_holds_a_lease(engines, export):
    stats, enrollment = engines
    rng = random.Random(7)
    kept, cancelled = _history(rng)
    _write_enrollment_database(enrollment, kept)
    _project_incrementally(stats, kept[:50], [], rng)
    before = _contents(stats)
    with stats.begin() as conn:
        conn.execute(
            insert(consumer_lib.shard_leases).values(
                stream_name="enrollment-events", shard_id="shardId-000", parent_shard_ids="",
                owner="worker-a", lease_counter=3, expires_at=time.time() + 60, checkpoint="42", finished=False,
            )
        )
    with pytest.raises(WorkersStillRunning, match="worker-a"):
        rebuild_from_enrollments(stats, export)
    assert _contents(stats) == before

    summary = rebuild_from_enrollments(stats, export, force=True)
    assert summary.enrollments == len(kept)
    with stats.connect() as conn:
        lease = conn.execute(select(consumer_lib.shard_leases)).one()
    assert (lease.checkpoint, lease.lease_counter) == ("42", 3), "checkpoints are left alone"


def test_the_rebuild_command_prints_progress_and_refuses_running_workers(
    engines, database_url, enrollment_target, monkeypatch, capsys
):
    stats, enrollment = engines
    kept, _ = _history(random.Random(8))
    _write_enrollment_database(enrollment, kept)
    monkeypatch.setenv("STATS_DATABASE_URL", database_url)
    monkeypatch.setenv("ENROLLMENT_TARGET", enrollment_target)
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)

    assert rebuild_command.main(["--chunk-size", "100"]) == 0
    output = capsys.readouterr().err
    assert f"copy enrollments: {len(kept)}/{len(kept)} (100%)" in output
    assert f"rebuilt the stats read model from {len(kept)} enrollments" in output
    assert views.age_stats(stats, "overall", date(2025, 1, 1)).metrics.student_count == len({e.email for e in kept})

    with stats.begin() as conn:
        conn.execute(
            insert(consumer_lib.shard_leases).values(
                stream_name="enrollment-events", shard_id="shardId-001", parent_shard_ids="", owner="worker-b",
                lease_counter=1, expires_at=time.time() + 60, finished=False,
            )
        )
    assert rebuild_command.main([]) == 2
    assert "stop the stats service first" in capsys.readouterr().err


def test_a_refused_or_unreachable_export_changes_nothing(
    engines, database_url, enrollment_target, monkeypatch, capsys
):
    stats, enrollment = engines
    rng = random.Random(10)
    kept, cancelled = _history(rng)
    _write_enrollment_database(enrollment, kept)
    _project_incrementally(stats, kept[:100], cancelled[:5], rng)
    before = _contents(stats)
    monkeypatch.setenv("STATS_DATABASE_URL", database_url)
    monkeypatch.setenv("ENROLLMENT_TARGET", enrollment_target)

    monkeypatch.setenv("ADMIN_TOKEN", "not-the-admin-token-at-all")
    assert rebuild_command.main([]) == 3
    assert "answered UNAUTHENTICATED" in capsys.readouterr().err
    assert _contents(stats) == before

    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("ENROLLMENT_TARGET", f"127.0.0.1:{helpers.free_port()}")
    assert rebuild_command.main([]) == 3
    assert "answered UNAVAILABLE" in capsys.readouterr().err
    assert _contents(stats) == before


def test_the_aggregates_an_older_read_model_lacks_are_counted_at_start(engines):
    stats, _ = engines
    rng = random.Random(9)
    kept, cancelled = _history(rng)
    _project_incrementally(stats, kept, cancelled, rng)
    complete = _contents(stats)
    assert complete_older_read_model(stats) is False, "nothing to do on a complete read model"
    with stats.begin() as conn:
        conn.execute(delete(age_years))
        conn.execute(delete(course_summaries))
    assert complete_older_read_model(stats) is True
    assert _contents(stats) == complete


class ResettingProxy:
    """A real TCP proxy on loopback in front of a server. Its n-th connection is reset
    (RST) once the n-th of `budgets` bytes of the server's side went through to the
    client, or on accept for a budget of 0 (a server restarting); connections past the
    budgets pass whole. Bytes past a budget never reach the client, so a stream reset
    before its end can only be completed by a new one."""

    def __init__(self, target: str, budgets: Iterable[int]) -> None:
        host, port = target.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._budgets = iter(budgets)
        self._open: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.resets = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def __enter__(self) -> ResettingProxy:
        return self

    def __exit__(self, *_exc) -> None:
        async def stop() -> None:
            self._server.close()
            for writer in list(self._open):
                writer.transport.abort()
            await self._server.wait_closed()
            while self._open:
                await asyncio.sleep(0.01)

        self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _reset(self, writer: asyncio.StreamWriter) -> None:
        self.resets += 1
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
        writer.transport.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        budget = next(self._budgets, None)
        if budget == 0:
            self._reset(writer)
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(*self._upstream)
        self._open |= {writer, upstream_writer}

        async def to_server() -> None:
            try:
                while data := await reader.read(65536):
                    upstream_writer.write(data)
                    await upstream_writer.drain()
            except OSError:
                pass
            finally:
                upstream_writer.transport.abort()

        async def to_client() -> None:
            sent = 0
            try:
                while data := await upstream_reader.read(65536):
                    if budget is not None and sent + len(data) > budget:
                        writer.write(data[: budget - sent])
                        await writer.drain()
                        await asyncio.sleep(0.05)  # lets those bytes leave before the reset
                        self._reset(writer)
                        return
                    sent += len(data)
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.transport.abort()
                upstream_writer.transport.abort()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)
        self._open -= {writer, upstream_writer}


def _resume_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == RESUME_MESSAGE]


def test_an_export_reset_mid_way_resumes_after_the_last_page_received_and_rebuilds_the_same(
    engines, enrollment_target, caplog
):
    stats, enrollment = engines
    rng = random.Random(11)
    kept, cancelled = _history(rng)
    _write_enrollment_database(enrollment, kept)
    _project_incrementally(stats, kept, cancelled, rng)
    incremental, figures = _contents(stats), _figures(stats)

    # Reset after a few pages; the first reconnection is refused (enrollment restarting),
    # the next one reset again a few pages on; then the stream runs to its end.
    with ResettingProxy(enrollment_target, [12_000, 0, 9_000]) as proxy:
        export = EnrollmentExport(proxy.target, ADMIN_TOKEN, page_size=37, backoff=FAST, resume_attempts=4)
        progress: list[tuple[str, int, int]] = []
        with caplog.at_level(logging.WARNING, logger=enrollment_export.__name__):
            summary = rebuild_from_enrollments(stats, export, lambda *step: progress.append(step), chunk_size=50)

    assert (proxy.resets, proxy.connections, export.resumes) == (3, 4, 3)
    assert _contents(stats) == incremental, "nothing copied twice or skipped"
    assert _figures(stats) == figures
    assert (summary.enrollments, summary.tombstones_kept) == (len(kept), len(cancelled))
    copied = [done for stage, done, _total in progress if stage == "copy enrollments"]
    assert copied == sorted(set(copied)) and copied[-1] == len(kept)

    resumes = _resume_lines(caplog)
    assert [r.attempt for r in resumes] == [1, 2, 1], "a line per resume attempt"
    assert all("UNAVAILABLE" in r.error for r in resumes)
    received = [r.enrollments_received for r in resumes]
    assert 0 < received[0] == received[1] < received[2] < len(kept)
    assert all(count % 37 == 0 for count in received), "resumed after whole pages"


def test_an_export_that_cannot_be_resumed_fails_after_its_attempts_and_changes_nothing(
    engines, enrollment_target, caplog
):
    stats, enrollment = engines
    rng = random.Random(12)
    kept, cancelled = _history(rng)
    _write_enrollment_database(enrollment, kept)
    _project_incrementally(stats, kept[:100], cancelled[:5], rng)
    before = _contents(stats)

    with ResettingProxy(enrollment_target, itertools.chain([12_000], itertools.repeat(0))) as proxy:
        export = EnrollmentExport(proxy.target, ADMIN_TOKEN, page_size=37, backoff=FAST, resume_attempts=3)
        with caplog.at_level(logging.WARNING, logger=enrollment_export.__name__), pytest.raises(grpc.RpcError) as error:
            rebuild_from_enrollments(stats, export)

    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (proxy.connections, export.resumes) == (4, 3), "the first stream, then 3 attempts"
    assert [r.attempt for r in _resume_lines(caplog)] == [1, 2, 3], "a line per resume attempt"
    assert _contents(stats) == before


def test_the_rebuild_command_resumes_a_reset_export_with_a_line_per_resume(
    engines, database_url, enrollment_target, monkeypatch, capsys
):
    stats, enrollment = engines
    kept, _ = _history(random.Random(13))
    _write_enrollment_database(enrollment, kept)
    monkeypatch.setenv("STATS_DATABASE_URL", database_url)
    monkeypatch.setenv("ADMIN_TOKEN", ADMIN_TOKEN)

    with ResettingProxy(enrollment_target, [12_000]) as proxy:
        monkeypatch.setenv("ENROLLMENT_TARGET", proxy.target)
        assert rebuild_command.main(["--chunk-size", "100", "--page-size", "37"]) == 0

    output = capsys.readouterr().err
    (line,) = [json.loads(line) for line in output.splitlines() if RESUME_MESSAGE in line]
    assert (line["attempt"], line["target"]) == (1, proxy.target)
    assert "UNAVAILABLE" in line["error"]
    assert f"rebuilt the stats read model from {len(kept)} enrollments" in output
    assert "export stream reopened 1 time(s) after drops" in output
    assert views.age_stats(stats, "overall", date(2025, 1, 1)).metrics.student_count == len({e.email for e in kept})
