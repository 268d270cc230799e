"""The operator command: leases with lag, dead letters, and replaying one after a fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from sqlalchemy import Column, Connection, MetaData, String, Table, func, insert, select

from libs import consumer as consumer_lib
from libs.db import make_engine
from libs.kinesis import REGISTRATIONS_STREAM, OutgoingRecord, ensure_stream, kinesis_client, put_records
from services.enrollment.settings import EnrollmentSettings
from tests import helpers
from tests.helpers import wait_until

applied_metadata = MetaData()
applied = Table("applied", applied_metadata, Column("data", String(64), primary_key=True))


def operator(*args: str, env: dict[str, str]) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "libs.operator", *args, "--service", "enrollment", "--json"],
                            cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def consumer_accepting(engine, stream: str, client, accept_v2: bool) -> consumer_lib.StreamConsumer:
    def handle(conn: Connection, records: list[consumer_lib.StreamRecord]) -> None:
        for record in records:
            if record.data.startswith(b"v2:") and not accept_v2:
                consumer_lib.record_dead_letter(conn, record, "unknown format v2")
            else:
                conn.execute(insert(applied).values(data=record.data.decode()))

    worker = consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream, handler=handle,
                                         worker_id="operator-test", lease_seconds=3)
    worker.start()
    return worker


def test_operator_shows_leases_and_dead_letters_and_replays_one_after_a_fix(kinesis_env, database_url, monkeypatch):
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", database_url)
    env = {**os.environ}
    settings = EnrollmentSettings()
    client = kinesis_client(settings.aws_region)
    stream = settings.stream_name(REGISTRATIONS_STREAM)
    ensure_stream(client, stream, 2)
    engine = make_engine(database_url)
    applied_metadata.create_all(engine)

    def count() -> int:
        with engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(applied)).scalar_one()

    first = consumer_accepting(engine, stream, client, accept_v2=False)
    try:
        records = [OutgoingRecord(f"k{i}", f"v1:{i}".encode()) for i in range(3)]
        records += [OutgoingRecord(f"k{i}", f"v2:{i}".encode()) for i in range(2)]
        assert all(put_records(client, stream, records))
        wait_until(lambda: count() == 3 and len(operator("dead-letters", env=env)) == 2)
        leases = operator("leases", env=env)
        assert {lease["owner"] for lease in leases} == {"operator-test"}
        assert all(lease["checkpoint"] for lease in leases if lease["shard_id"] in {
            r["shard_id"] for r in operator("dead-letters", env=env)})
        assert all(lease["lag_seconds"] == 0 for lease in leases)
    finally:
        first.stop()

    # Records arrive while no worker runs: the operator sees the lag grow.
    assert all(put_records(client, stream, [OutgoingRecord(f"k{i}", f"v1:late{i}".encode()) for i in range(4)]))
    time.sleep(1.1)
    lagging = [lease for lease in operator("leases", env=env) if lease["lag_seconds"] >= 1.0]
    assert lagging and all(lease["owner"] is None for lease in lagging)

    letters = operator("dead-letters", env=env)
    fixed = consumer_accepting(engine, stream, client, accept_v2=True)
    try:
        replayed = operator("replay", *[str(letter["id"]) for letter in letters], env=env)
        assert [r["id"] for r in replayed] == [letter["id"] for letter in letters]
        wait_until(lambda: count() == 3 + 4 + 2)
        assert operator("dead-letters", env=env) == []
        assert all(letter["replayed_at"] for letter in operator("dead-letters", "--all", env=env))
    finally:
        fixed.stop()
        engine.dispose()
