"""SQLite engine behaviour the services rely on."""

from __future__ import annotations

import threading

from sqlalchemy import Column, Integer, MetaData, Table, insert, select

from libs.db import make_engine, read_only

metadata = MetaData()
numbers = Table("numbers", metadata, Column("n", Integer, primary_key=True))


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


def test_a_database_from_an_older_version_is_refused_at_start_naming_what_is_missing(tmp_path):
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
    assert "older version" in result.stderr
