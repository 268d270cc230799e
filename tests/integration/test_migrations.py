"""Schema migrations (libs.migrations, services/*/migrations) on SQLite and PostgreSQL:
a database made before migrations is adopted keeping every row, the migration head
agrees with the models, concurrent starts are safe, and the operator runs them by hand."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from typing import Any

import grpc
import pytest
from alembic import command
from sqlalchemy import Column, Engine, MetaData, Table, func, insert, inspect, select

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from libs.config import load_settings
from libs.db import as_utc, ensure_schema, make_engine
from libs.migrations import (
    Migrations,
    SchemaMismatch,
    current_revision,
    new_revision,
    schema_differences,
    upgrade_to_head,
)
from libs.worker import Service
from services.enrollment import bootstrap as enrollment_bootstrap
from services.enrollment.settings import EnrollmentSettings
from services.notifier import bootstrap as notifier_bootstrap
from services.notifier.settings import NotifierSettings
from services.stats import bootstrap as stats_bootstrap
from services.stats.settings import StatsSettings
from tests import helpers

SERVICES = ["enrollment", "stats", "notifier"]


def declared(name: str) -> Service[Any]:
    """The service as its bootstrap declares it to the runtime (nothing started)."""
    if name == "enrollment":
        return enrollment_bootstrap.service(load_settings(EnrollmentSettings))
    if name == "stats":
        return stats_bootstrap.service(load_settings(StatsSettings))
    return notifier_bootstrap.service(load_settings(NotifierSettings))


def migrations_of(name: str) -> Migrations:
    migrations = declared(name).migrations
    assert migrations is not None
    return migrations


def head_of(migrations: Migrations) -> str:
    (head,) = migrations.script().get_heads()
    return head


def create_as_before_migrations(engine: Engine, migrations: Migrations) -> MetaData:
    """The schema as the version before migrations made it at start (ensure_schema over
    its tables, frozen in the baseline migration); returns that schema."""
    _, baseline = migrations.baseline()
    ensure_schema(engine, baseline)
    return baseline


def sample_value(column: Column[Any], i: int) -> Any:
    """A value of the column's type; the same per column name, so foreign keys match
    (courses.campus_id = campuses.campus_id) and checks hold (enrolled_count <= capacity)."""
    kind = column.type.python_type
    if kind is str:
        return f"{column.name}-{i}"
    if kind is bool:
        return i % 2 == 0
    if kind is int:
        return i + 1
    if kind is float:
        return i + 0.5
    if kind is dt.datetime:
        return dt.datetime(2026, 1, 2 + i, 3, 4, 5, tzinfo=dt.UTC)
    if kind is dt.date:
        return dt.date(2000 + i, 2, 3)
    if kind is bytes:
        return bytes([i, 255, 0])
    raise AssertionError(f"no sample for {column.table.name}.{column.name} ({column.type})")


def normalised(row: Any) -> tuple[Any, ...]:
    return tuple(as_utc(value) if isinstance(value, dt.datetime) else value for value in row)


def rows_of(engine: Engine, metadata: MetaData) -> dict[str, set[tuple[Any, ...]]]:
    with engine.connect() as conn:
        return {table.name: {normalised(row) for row in conn.execute(select(table))}
                for table in metadata.sorted_tables}


@pytest.mark.parametrize("name", SERVICES)
def test_a_database_made_before_migrations_is_adopted_and_upgraded_keeping_every_row(name, database_url):
    migrations = migrations_of(name)
    engine = make_engine(database_url)
    try:
        baseline = create_as_before_migrations(engine, migrations)
        with engine.begin() as conn:
            for table in baseline.sorted_tables:  # parents first
                conn.execute(insert(table), [{c.name: sample_value(c, i) for c in table.columns} for i in (0, 1)])
        before = rows_of(engine, baseline)
        assert all(len(rows) == 2 for rows in before.values()), before
        with engine.connect() as conn:
            assert current_revision(conn, migrations) is None

        assert upgrade_to_head(engine, migrations) == head_of(migrations)

        assert rows_of(engine, baseline) == before, "every campus, course, decision, aggregate, notification kept"
        with engine.connect() as conn:
            assert current_revision(conn, migrations) == head_of(migrations)
            assert schema_differences(conn, declared(name).tables()) == []
            for metadata in declared(name).tables():  # today's models read the upgraded tables
                for table in metadata.sorted_tables:
                    rows = 2 if table.name in baseline.tables else 0  # tables added since start empty
                    assert conn.execute(select(func.count()).select_from(table)).scalar_one() == rows, table.name
        assert upgrade_to_head(engine, migrations) == head_of(migrations), "a second start changes nothing"
        assert rows_of(engine, baseline) == before
    finally:
        engine.dispose()


def test_the_enrollment_service_started_on_a_database_made_before_migrations_serves_its_catalogue(
        kinesis_env, database_url):
    migrations = migrations_of("enrollment")
    engine = make_engine(database_url)
    try:
        baseline = create_as_before_migrations(engine, migrations)
        with engine.begin() as conn:
            for table in baseline.sorted_tables:
                conn.execute(insert(table), [{c.name: sample_value(c, i) for c in table.columns} for i in (0, 1)])
        before = rows_of(engine, baseline)
        with helpers.serve_enrollment(database_url) as address, grpc.insecure_channel(address) as channel:
            courses = enrollment_pb2_grpc.EnrollmentServiceStub(channel).ListCourses(
                enrollment_pb2.ListCoursesRequest(page_size=10), timeout=10).courses
        assert sorted((c.course_id, c.campus_id, c.capacity, c.enrolled_count) for c in courses) == [
            ("course_id-0", "campus_id-0", 1, 1), ("course_id-1", "campus_id-1", 2, 2)]
        with engine.connect() as conn:
            assert current_revision(conn, migrations) == head_of(migrations)
        after = rows_of(engine, baseline)
        # The running service works on two tables: it adds leases of its own, and its relay
        # tries the outbox rows (their streams do not exist, so they stay).
        changing = ("shard_leases", "outbox")
        assert {name: rows for name, rows in after.items() if name not in changing} == {
            name: rows for name, rows in before.items() if name not in changing}
        assert before["shard_leases"] <= after["shard_leases"], "old leases kept"
        assert {row[:5] for row in after["outbox"]} == {row[:5] for row in before["outbox"]}
    finally:
        engine.dispose()


@pytest.mark.parametrize("name", SERVICES)
def test_the_migration_head_agrees_with_the_models(name, database_url):
    """Alembic's autogenerate comparison of a database upgraded from nothing to head with
    the models finds no difference: a schema change without its migration fails here."""
    service = declared(name)
    assert service.migrations is not None
    engine = make_engine(database_url)
    try:
        upgrade_to_head(engine, service.migrations)
        with engine.connect() as conn:
            assert schema_differences(conn, service.tables()) == []
            # The same through the history's own env.py and its target metadata.
            command.check(service.migrations.config(conn))
            tables = set(inspect(conn).get_table_names())
        assert tables == {t for metadata in service.tables() for t in metadata.tables} | {
            service.migrations.version_table}
    finally:
        engine.dispose()


def test_the_comparison_names_a_column_the_models_lack(database_url):
    """The test of the test above: a model change without a migration is seen."""
    migrations = migrations_of("enrollment")
    engine = make_engine(database_url)
    try:
        upgrade_to_head(engine, migrations)
        models = MetaData()
        for metadata in declared("enrollment").tables():
            for table in metadata.tables.values():
                table.to_metadata(models)
        Table("campuses", models, Column("timezone", models.tables["campuses"].c.name.type), extend_existing=True)
        with engine.connect() as conn:
            assert schema_differences(conn, [models]) == ["column campuses.timezone is missing from the database"]
    finally:
        engine.dispose()


def test_a_database_made_before_migrations_that_differs_is_refused_naming_the_difference_and_left_alone(
        database_url):
    migrations = migrations_of("enrollment")
    engine = make_engine(database_url)
    try:
        create_as_before_migrations(engine, migrations)
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE campuses ADD COLUMN nickname VARCHAR(20)")
            conn.exec_driver_sql("DROP TABLE outbox")
            conn.exec_driver_sql("DROP INDEX ix_decisions_course_id")
        with pytest.raises(SchemaMismatch) as refused:
            upgrade_to_head(engine, migrations)
        assert "column campuses.nickname is in the database but not expected" in str(refused.value)
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            indexes = {index["name"] for index in inspect(conn).get_indexes("decisions")}
        assert "outbox" not in tables and migrations.version_table not in tables, "nothing was changed"
        assert "ix_decisions_course_id" not in indexes
    finally:
        engine.dispose()


def test_a_partial_database_made_before_migrations_is_completed_like_before_then_adopted(database_url):
    """The operator command of that version created the lease tables alone; the tables
    and indexes that version created at start are created, then the database is stamped."""
    migrations = migrations_of("notifier")
    _, baseline = migrations.baseline()
    engine = make_engine(database_url)
    try:
        baseline.tables["shard_leases"].create(engine)
        with engine.begin() as conn:
            conn.execute(insert(baseline.tables["shard_leases"]).values(
                stream_name="registrations", shard_id="shard-0", parent_shard_ids="", owner=None, lease_counter=3,
                expires_at=0.0, checkpoint="49590338271490256608559692538361571095921575989136588898",
                finished=False))
        assert upgrade_to_head(engine, migrations) == head_of(migrations)
        with engine.connect() as conn:
            assert schema_differences(conn, declared("notifier").tables()) == []
            (lease,) = conn.execute(select(baseline.tables["shard_leases"])).all()
        assert lease.lease_counter == 3 and lease.checkpoint.startswith("4959")
    finally:
        engine.dispose()


def test_tables_made_from_todays_models_without_migrations_are_stamped_at_head(database_url):
    """As a development run of a later schema (or a test's create_all) leaves them."""
    service = declared("notifier")
    assert service.migrations is not None
    assert head_of(service.migrations) != service.migrations.baseline()[0], "the notifier's head is past its baseline"
    engine = make_engine(database_url)
    try:
        ensure_schema(engine, *service.tables())
        assert upgrade_to_head(engine, service.migrations) == head_of(service.migrations)
        with engine.connect() as conn:
            assert schema_differences(conn, service.tables()) == []
    finally:
        engine.dispose()


def test_two_processes_starting_at_once_on_a_fresh_database_both_serve(kinesis_env, database_url, tmp_path):
    """Two enrollment workers started together: one migrates under the lock, the other
    finds the database at head; both turn SERVING."""
    ports = [helpers.free_port(), helpers.free_port()]
    processes = []
    logs = [tmp_path / f"enrollment-{i}.log" for i in range(2)]
    try:
        for port, log_path in zip(ports, logs):
            env = {**os.environ, "ENROLLMENT_DATABASE_URL": database_url, "ENROLLMENT_PORT": str(port),
                   "KINESIS_SHARD_COUNT": "1", "LEASE_SECONDS": "3"}
            with open(log_path, "wb") as log:
                processes.append(subprocess.Popen([sys.executable, "-m", "services.enrollment"], cwd=helpers.ROOT,
                                                  env=env, stdout=log, stderr=subprocess.STDOUT))
        for process, port, log_path in zip(processes, ports, logs):
            def check_alive(process: subprocess.Popen[bytes] = process, log_path: Any = log_path) -> None:
                if process.poll() is not None:
                    raise AssertionError(f"enrollment exited with {process.returncode}: "
                                         f"{log_path.read_text(errors='replace')[-3000:]}")

            helpers.wait_serving(port, timeout=60, check_alive=check_alive)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    migrations = migrations_of("enrollment")
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert current_revision(conn, migrations) == head_of(migrations)
            assert schema_differences(conn, declared("enrollment").tables()) == []
        migrated = [line for log_path in logs for line in log_path.read_text(errors="replace").splitlines()
                    if '"database migrated"' in line]
        assert len(migrated) == 1, f"exactly one of the two migrated: {migrated}"
    finally:
        engine.dispose()


def operator(*args: str, env: dict[str, str], ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "libs.operator", "migrate", *args, "--service", "stats", "--json"],
                            cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert (result.returncode == 0) == ok, result.stderr
    return result


def test_the_operator_command_shows_and_runs_the_migrations(database_url):
    env = {**os.environ, "STATS_DATABASE_URL": database_url}
    migrations = migrations_of("stats")
    head = head_of(migrations)
    engine = make_engine(database_url)
    try:
        create_as_before_migrations(engine, migrations)
        (current,) = json.loads(operator("current", env=env).stdout)
        assert current == {"service": "stats", "revision": None, "head": head,
                           "state": "created before migrations: upgrade adopts it"}
        history = json.loads(operator("history", env=env).stdout)
        assert [entry["revision"] for entry in history][0] == head and history[-1]["down_revision"] is None
        assert not any(entry["applied"] for entry in history)

        (upgraded,) = json.loads(operator("upgrade", env=env).stdout)
        assert upgraded == {"service": "stats", "from_revision": None, "revision": head}
        with engine.connect() as conn:
            assert current_revision(conn, migrations) == head
        (current,) = json.loads(operator("current", env=env).stdout)
        assert current["revision"] == head and current["state"] == "at head"

        with engine.begin() as conn:  # a database that no migration explains is refused, plainly
            conn.execute(migrations.baseline()[1].tables["students"].delete())
            conn.exec_driver_sql(f"DELETE FROM {migrations.version_table}")
            conn.exec_driver_sql("ALTER TABLE students ADD COLUMN nickname VARCHAR(20)")
        refused = operator("upgrade", env=env, ok=False)
        assert "column students.nickname is in the database but not expected" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        engine.dispose()


def test_a_new_revision_is_numbered_after_the_head_and_then_migrates(database_url, tmp_path):
    """What a developer runs with a schema change (`migrate revision -m ...`), on a copy of
    the history: the models equal the head here, so the revision it writes changes nothing."""
    history = tmp_path / "migrations"
    shutil.copytree(migrations_of("stats").directory, history, ignore=shutil.ignore_patterns("__pycache__"))
    migrations = Migrations("stats", history)
    engine = make_engine(database_url)
    try:
        written = new_revision(engine, migrations, "nothing changed")
        assert written.parent == history / "versions" and written.name == "0002_nothing_changed.py"
        source = written.read_text()
        assert "revision = '0002'" in source and "down_revision = '0001'" in source
        assert "op." not in source, "no difference, no operation"
        assert upgrade_to_head(engine, migrations) == "0002"
    finally:
        engine.dispose()
