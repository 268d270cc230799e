"""Engine behaviour the services rely on, and the shared upsert and UTC read-back."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, insert, inspect, select
from sqlalchemy.exc import OperationalError

from libs.db import as_utc, make_engine, read_only, upsert_count, upsert_rows, wait_for_database

metadata = MetaData()
numbers = Table("numbers", metadata, Column("n", Integer, primary_key=True))
tallies = Table(
    "tallies", metadata,
    Column("name", String(32), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("seen", DateTime(timezone=True), nullable=False),
)


def test_sqlite_reads_do_not_wait_for_an_open_write_transaction(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(numbers).values(n=1))
    read_done = threading.Event()
    seen: list[int] = []

    def reader() -> None:
        with read_only(engine).connect() as conn:
            seen.extend(conn.execute(select(numbers.c.n)).scalars())
        read_done.set()

    with engine.begin() as writer:  # BEGIN IMMEDIATE: holds the write lock
        writer.execute(insert(numbers).values(n=2))
        thread = threading.Thread(target=reader)
        thread.start()
        finished_while_writing = read_done.wait(5)
    thread.join()
    assert finished_while_writing
    assert seen == [1]  # the uncommitted row is invisible
    engine.dispose()


def test_a_database_from_an_older_version_is_refused_at_start_naming_what_is_missing_and_left_alone(tmp_path):
    import os
    import subprocess
    import sys

    from tests import helpers

    url = f"sqlite:///{tmp_path / 'enrollment.db'}"
    engine = make_engine(url)
    with engine.begin() as conn:  # the decisions table as the first version made it
        conn.exec_driver_sql(
            "CREATE TABLE decisions (registration_id VARCHAR(64) PRIMARY KEY, course_id VARCHAR(63) NOT NULL, "
            "email VARCHAR(320) NOT NULL, outcome VARCHAR(32) NOT NULL, decide_time DATETIME NOT NULL, "
            "shard_id VARCHAR(128) NOT NULL, sequence_number VARCHAR(128) NOT NULL)"
        )
    engine.dispose()
    env = {**os.environ, "ENROLLMENT_DATABASE_URL": url, "ENROLLMENT_PORT": str(helpers.free_port()),
           "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{helpers.free_port()}"}
    result = subprocess.run([sys.executable, "-m", "services.enrollment"], cwd=helpers.ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "decisions.worker_id" in result.stderr and "decisions.lease_counter" in result.stderr
    assert "differ from the schema the version before migrations created" in result.stderr
    assert inspect(make_engine(url)).get_table_names() == ["decisions"], "nothing was changed"


def test_upserts_write_a_batch_and_report_what_they_wrote(database_url):
    engine = make_engine(database_url)
    metadata.create_all(engine)
    seen = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    with engine.begin() as conn:
        rows = [{"name": name, "count": 1, "seen": seen} for name in ("a", "b")]
        assert upsert_count(conn, tallies, rows, lambda insert: insert.on_conflict_do_nothing()) == 2
        again = [{"name": name, "count": 1, "seen": seen} for name in ("b", "c", "d")]
        assert upsert_count(conn, tallies, again, lambda insert: insert.on_conflict_do_nothing()) == 2
        added = upsert_rows(
            conn, tallies, [{"name": "a", "count": 5, "seen": seen}, {"name": "e", "count": 1, "seen": seen}],
            lambda insert: insert.on_conflict_do_update(
                index_elements=["name"], set_={"count": tallies.c.count + insert.excluded.count}),
            returning=(tallies.c.name, tallies.c.count),
        )
        assert sorted(tuple(row) for row in added) == [("a", 6), ("e", 1)]
        assert upsert_count(conn, tallies, [], lambda insert: insert.on_conflict_do_nothing()) == 0
    with engine.connect() as conn:
        stored = conn.execute(select(tallies.c.name, tallies.c.count, tallies.c.seen).order_by(tallies.c.name)).all()
    assert [(name, count) for name, count, _ in stored] == [("a", 6), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]
    assert {as_utc(moment) for _, _, moment in stored} == {seen}
    engine.dispose()


def test_stored_times_read_back_as_aware_utc():
    assert as_utc(datetime(2026, 3, 1, 12, 30)) == datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    assert as_utc(datetime(2026, 3, 1, 12, 30)).tzinfo is UTC
    lisbon_summer = timezone(timedelta(hours=1))
    converted = as_utc(datetime(2026, 7, 1, 13, 30, tzinfo=lisbon_summer))
    assert converted.tzinfo is UTC and converted.hour == 12
    assert as_utc(None) is None


def test_waiting_for_a_database_that_never_answers_retries_with_logs_then_gives_up(caplog):
    engine = make_engine("postgresql://postgres@127.0.0.1:1/nothing", connect_args={"connect_timeout": 1})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="libs.db"), pytest.raises(OperationalError):
        wait_for_database(engine, timeout=1.0)
    elapsed = time.monotonic() - started
    retries = [r for r in caplog.records if r.getMessage() == "database not reachable; retrying"]
    assert len(retries) >= 3
    assert all(0 < r.__dict__["retry_in_seconds"] <= 5.0 for r in retries)
    assert "OperationalError" in retries[0].__dict__["error"]
    # Gives up at the first failure past the deadline: at most one delay (<= 0.8 s by then) late.
    assert 1.0 <= elapsed < 3.0
    engine.dispose()
