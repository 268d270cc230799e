"""SQLAlchemy engines for PostgreSQL and SQLite, configured for concurrent writers.

SQLite gets WAL, a busy timeout and BEGIN IMMEDIATE so that a transaction takes the
write lock up front instead of failing half-way when two threads write. PostgreSQL
URLs without a driver use psycopg 3. Also the two things every service's tables need
on both databases: a batched INSERT ... ON CONFLICT (`upsert_rows`, `upsert_count`) and
reading back stored UTC times (`as_utc`).
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import (
    Connection,
    CursorResult,
    Engine,
    MetaData,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from tenacity import retry_if_exception_type

from libs.backoff import DEPENDENCY_WAIT_BACKOFF, DEPENDENCY_WAIT_SECONDS

log = logging.getLogger(__name__)


def make_engine(url: str, idle_in_transaction_seconds: float | None = None, **kwargs: Any) -> Engine:
    """An engine for `url`; on PostgreSQL, `idle_in_transaction_seconds` makes the server end
    a transaction whose client stopped answering (a paused or partitioned worker), so the
    locks it holds cannot stall the workers that take over its shards."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed, **kwargs)
    engine = create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5, **kwargs)
    if idle_in_transaction_seconds:
        timeout_ms = int(idle_in_transaction_seconds * 1000)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
            dbapi_connection.commit()

    return engine


def _sqlite_engine(url: Any, **kwargs: Any) -> Engine:
    if url.database and url.database != ":memory:":
        pathlib.Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control from pysqlite so BEGIN IMMEDIATE can be emitted.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Writers take the write lock up front; readers (see read_only) don't wait for it.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


_READ_ONLY = "course_signup_read_only"


def read_only(engine: Engine) -> Engine:
    """The same engine for queries: on SQLite its transactions don't take the write lock."""
    return engine.execution_options(**{_READ_ONLY: True})


def wait_for_database(engine: Engine, timeout: float = DEPENDENCY_WAIT_SECONDS) -> None:
    """Waits (with backoff) until the database answers: a service started while its
    database is down stays NOT_SERVING instead of exiting (as for Kinesis, see
    libs.kinesis.wait_for_kinesis)."""

    def select_one() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    DEPENDENCY_WAIT_BACKOFF.retrying(
        retry=retry_if_exception_type(OperationalError), deadline_seconds=timeout,
        log=log, message="database not reachable; retrying",
    )(select_one)


class SchemaOutOfDate(RuntimeError):
    """The database lacks columns these models need (see ensure_schema)."""


def ensure_schema(engine: Engine, *metadatas: MetaData) -> None:
    """Creates missing tables and indexes, then checks existing tables have every column.

    For tests, benchmarks and scratch databases: the services' databases are created and
    changed by their migrations (libs.migrations), after which this finds nothing to do.
    """
    for metadata in metadatas:
        metadata.create_all(engine)
        for table in metadata.sorted_tables:
            for index in table.indexes:
                index.create(engine, checkfirst=True)
    inspector = inspect(engine)
    missing = [
        f"{table.name}.{column.name}"
        for metadata in metadatas
        for table in metadata.sorted_tables
        for column in table.columns
        if column.name not in {c["name"] for c in inspector.get_columns(table.name)}
    ]
    if missing:
        raise SchemaOutOfDate(
            f"the database lacks columns these models need: {', '.join(missing)}. A service's database is "
            "brought up to date by its migrations (python -m libs.operator migrate upgrade --service <name>)."
        )


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Calls `callback` once the transaction `conn` is in commits; never if it rolls back
    (so counters of committed work count a retried batch once)."""
    event.listen(conn, "commit", lambda _conn: callback(), once=True)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@overload
def as_utc(moment: datetime) -> datetime: ...
@overload
def as_utc(moment: None) -> None: ...
def as_utc(moment: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime: every database here stores UTC, and SQLite
    hands datetimes back without their zone."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def upsert_rows(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    on_conflict: Callable[[Any], Any],
    returning: Sequence[Any] = (),
) -> list[Any]:
    """INSERT ... ON CONFLICT of many rows (all with the same columns); returns the
    `returning` columns of the rows written, in their order.

    `on_conflict` gets the dialect's insert and adds its ON CONFLICT clause (the same
    method names on PostgreSQL and SQLite). On PostgreSQL the rows travel as one array
    per column, unnested into one statement: its text never changes, so it is parsed and
    planned once per connection, and one round trip writes a whole batch. (Multi-row
    VALUES would be re-parsed by the driver at every batch; one execution per row costs a
    round trip each.) SQLite runs in-process, where executemany is as good.
    """
    if not rows:
        return []
    if not returning:
        _upsert(conn, table, rows, on_conflict, ())
        return []
    return list(_upsert(conn, table, rows, on_conflict, returning))


def upsert_count(
    conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], on_conflict: Callable[[Any], Any]
) -> int:
    """`upsert_rows` without RETURNING: how many rows were written (a row left alone by
    ON CONFLICT DO NOTHING counts none)."""
    if not rows:
        return 0
    return int(_upsert(conn, table, rows, on_conflict, ()).rowcount)


def _upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    on_conflict: Callable[[Any], Any],
    returning: Sequence[Any],
) -> CursorResult[Any]:
    # SQLAlchemy drops an INSERT's row count unless asked to keep it; on SQLite the
    # driver sums it over executemany.
    options = {"preserve_rowcount": True}
    names = list(rows[0])
    if conn.dialect.name == "postgresql":
        columns = [
            func.unnest(
                bindparam(f"rows_{name}", [row[name] for row in rows], type_=postgresql.ARRAY(table.c[name].type))
            ).label(name)
            for name in names
        ]
        statement = on_conflict(postgresql.insert(table).from_select(names, select(*columns)))
        if returning:
            statement = statement.returning(*returning)
        return conn.execute(statement, execution_options=options)
    if conn.dialect.name != "sqlite":
        raise NotImplementedError(f"upserts support PostgreSQL and SQLite, not {conn.dialect.name}")
    statement = on_conflict(sqlite.insert(table))
    if returning:
        statement = statement.returning(*returning)
    return conn.execute(statement, list(rows), execution_options=options)
