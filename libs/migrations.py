"""Schema migrations (Alembic): one history per service, run at start and by the operator.

Each service with a database keeps its history beside its code, in
`services/<name>/migrations/` (`env.py`, which names the models, and `versions/`), and
declares it to the runtime (`Service(migrations=...)`) and to the operator command
(`ServiceDescription(migrations=...)`) as one `Migrations`. The same history serves
SQLite and PostgreSQL. Its version lives in the service's own table,
`alembic_version_<name>`, so two services could even share one database or schema.

`upgrade_to_head` is what a service runs at start (and `python -m libs.operator migrate
upgrade` by hand): in one transaction that first takes a lock — a PostgreSQL advisory
lock, SQLite's write lock (the engines of libs.db begin with BEGIN IMMEDIATE) — so when
several processes of a service start at once one migrates and the others find it done.

A database created by the version before migrations (tables present, no version row)
is adopted: the first migration of every history is its *baseline*, whose module keeps
a frozen copy of that schema as `metadata`. What that version did at start is done
once more (missing tables and indexes created), then the database is compared with the
baseline by Alembic's autogenerate comparison; if they agree it is stamped with the
baseline revision and upgraded like any other, otherwise it is refused with the
differences named (`SchemaMismatch`), changing nothing. Tables made from today's models
without migrations (a development run in between, a test's create_all) that agree with
the models exactly are stamped with the head instead.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    inspect,
    text,
)

log = logging.getLogger(__name__)
# Alembic narrates every step at INFO; the "database migrated" line here says what happened.
logging.getLogger("alembic").setLevel(logging.WARNING)

VERSION_TABLE_PREFIX = "alembic_version_"


class SchemaMismatch(RuntimeError):
    """A database without a migration version whose tables are not the baseline schema."""


@dataclass(frozen=True)
class Migrations:
    """A service's migration history: `directory` holds its env.py and versions/."""

    service: str
    directory: pathlib.Path

    @classmethod
    def beside(cls, service: str, module_file: str) -> Migrations:
        """The history in the directory of `module_file` (a migrations package's __init__)."""
        return cls(service, pathlib.Path(module_file).resolve().parent)

    @property
    def version_table(self) -> str:
        return VERSION_TABLE_PREFIX + self.service

    @property
    def lock_key(self) -> int:
        """The PostgreSQL advisory lock of this service's migrations (a signed 64-bit key)."""
        digest = hashlib.blake2b(f"course-signup migrations {self.version_table}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

    def script(self) -> ScriptDirectory:
        return ScriptDirectory.from_config(self.config())

    def config(self, connection: Connection | None = None) -> Config:
        """An Alembic configuration for this history; env.py migrates `connection`."""
        config = Config()
        config.set_main_option("script_location", str(self.directory).replace("%", "%%"))
        config.set_main_option("version_table", self.version_table)
        config.attributes["connection"] = connection
        return config

    def baseline(self) -> tuple[str, MetaData]:
        """The first revision and its frozen schema (the version before migrations)."""
        script = self.script()
        base_id = script.get_base()
        base = script.get_revision(base_id) if base_id is not None else None
        assert base is not None, f"{self.directory} has no revisions"
        metadata = getattr(base.module, "metadata", None)
        if not isinstance(metadata, MetaData):
            raise TypeError(f"the baseline migration {base.path} must define `metadata`, the schema it creates")
        return base.revision, metadata


def upgrade_to_head(engine: Engine, migrations: Migrations) -> str:
    """Brings the database to the head revision (see the module docstring); returns it."""
    with engine.begin() as conn:
        _lock(conn, migrations)
        before = current_revision(conn, migrations)
        if before is None:
            _adopt_if_created_before_migrations(conn, migrations)
        command.upgrade(migrations.config(conn), "head")
        after = current_revision(conn, migrations)
    assert after is not None
    if after != before:
        log.info("database migrated", extra={"service": migrations.service, "from_revision": before or "none",
                                             "to_revision": after})
    return after


def new_revision(engine: Engine, migrations: Migrations, message: str) -> pathlib.Path:
    """Writes the next migration of the history (numbered: 0002, 0003, ...), autogenerated
    from the difference between the models and the database brought to head first (a
    scratch database: `migrate revision` of the operator command). Review it, then commit it
    with the model change."""
    with engine.begin() as conn:
        _lock(conn, migrations)
        _adopt_if_created_before_migrations(conn, migrations)
        config = migrations.config(conn)
        command.upgrade(config, "head")
        number = sum(1 for _ in migrations.script().walk_revisions()) + 1
        script = command.revision(config, message=message, autogenerate=True, rev_id=f"{number:04d}")
    assert script is not None and not isinstance(script, list)
    return pathlib.Path(script.path)


def current_revision(conn: Connection, migrations: Migrations) -> str | None:
    """The revision the database is at; None before its first migration."""
    context = MigrationContext.configure(conn, opts={"version_table": migrations.version_table})
    return context.get_current_revision()


def created_before_migrations(conn: Connection, migrations: Migrations) -> bool:
    """Whether the database has tables of the baseline but no version: made by the
    version before migrations, to be adopted by the next upgrade."""
    if current_revision(conn, migrations) is not None:
        return False
    _, baseline = migrations.baseline()
    return bool(set(baseline.tables) & set(inspect(conn).get_table_names()))


def schema_differences(conn: Connection, metadatas: Sequence[MetaData], *,
                       only_their_tables: bool = False) -> list[str]:
    """Alembic's autogenerate comparison of the database with the models in `metadatas`,
    described: empty when they agree. Version tables are never compared; with
    `only_their_tables`, neither is any table the models do not name."""
    names = {name for metadata in metadatas for name in metadata.tables}

    def included(name: str | None, type_: str, parent_names: Any) -> bool:
        if only_their_tables and type_ == "table" and name not in names:
            return False
        return include_name(name, type_, parent_names)

    context = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": included})
    # compare_metadata takes a sequence of MetaData as target_metadata does.
    differences = compare_metadata(context, list(metadatas))  # type: ignore[arg-type]
    return [describe_difference(difference) for difference in differences]


def include_name(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Autogenerate leaves the version tables alone (each history keeps its own)."""
    return not (type_ == "table" and name is not None and name.startswith(VERSION_TABLE_PREFIX))


def describe_difference(difference: Any) -> str:
    """One of compare_metadata's diffs, in words: what the database has against the models."""
    if isinstance(difference, list):  # column modifications come grouped
        return "; ".join(describe_difference(one) for one in difference)
    operation, *rest = difference
    if operation in ("modify_type", "modify_nullable", "modify_default", "modify_comment"):
        _schema, table, column, _info, existing, wanted = rest
        what = operation.removeprefix("modify_")
        return f"column {table}.{column}: {what} is {existing!r} in the database, {wanted!r} expected"
    subject = rest[-1]
    if isinstance(subject, Table):
        name = f"table {subject.name}"
    elif isinstance(subject, Column):
        name = f"column {rest[-2]}.{subject.name}"
    else:
        table = getattr(getattr(subject, "table", None), "name", "?")
        name = f"{type(subject).__name__} {subject.name or '(unnamed)'} on {table}"
    if operation.startswith("add_"):
        return f"{name} is missing from the database"
    if operation.startswith("remove_"):
        return f"{name} is in the database but not expected"
    return f"{operation} {name}"


def _lock(conn: Connection, migrations: Migrations) -> None:
    # SQLite: the transaction began with BEGIN IMMEDIATE (libs.db), so it holds the
    # database's write lock already; another process waits for it (busy timeout).
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": migrations.lock_key})


def _adopt_if_created_before_migrations(conn: Connection, migrations: Migrations) -> None:
    if not created_before_migrations(conn, migrations):
        return
    config = migrations.config(conn)
    head = migrations.script().get_current_head()
    assert head is not None
    # Tables made from today's models without migrations (a development run, a test's
    # create_all) are a head database.
    if head != migrations.baseline()[0] and not schema_differences(conn, head_models(migrations, conn),
                                                                   only_their_tables=True):
        command.stamp(config, head)
        log.info("database made from the models adopted at head", extra={"service": migrations.service,
                                                                         "revision": head})
        return
    revision, baseline = migrations.baseline()
    # What the version before migrations did at every start: create what was missing.
    baseline.create_all(conn)
    for table in baseline.sorted_tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    differences = schema_differences(conn, [baseline], only_their_tables=True)
    if differences:
        raise SchemaMismatch(
            f"the {migrations.service} database has tables but no migration version ({migrations.version_table}), "
            f"and they differ from the schema the version before migrations created: {'; '.join(differences)}. "
            "Nothing was changed: fix these by hand (or restore the database), then start again."
        )
    command.stamp(config, revision)
    log.info("database created before migrations adopted",
             extra={"service": migrations.service, "revision": revision})


def head_models(migrations: Migrations, conn: Connection) -> list[MetaData]:
    """The models the history's env.py names (its target metadata), read by running it
    with nothing to migrate."""
    config = migrations.config(conn)
    script = ScriptDirectory.from_config(config)
    models: list[MetaData] = []

    def capture(_revision: Any, context: MigrationContext) -> list[Any]:
        target = context.opts["target_metadata"]
        models.extend([target] if isinstance(target, MetaData) else target)
        return []

    with EnvironmentContext(config, script, fn=capture):
        script.run_env()
    return models


def run_env(target_metadata: Iterable[MetaData]) -> None:
    """The body of every service's migrations/env.py: migrates the connection that
    libs.migrations handed over, with the service's version table."""
    from alembic import context

    config = context.config
    connection = config.attributes.get("connection")
    if connection is None or context.is_offline_mode():
        raise RuntimeError("run migrations through libs.migrations (the service start, or "
                           "`python -m libs.operator migrate upgrade --service <name>`)")
    context.configure(
        connection=connection,
        target_metadata=list(target_metadata),
        version_table=config.get_main_option("version_table"),
        include_name=include_name,
        compare_type=True,
        # New revisions alter tables in batch mode: SQLite needs it (it alters a table by
        # copying it), PostgreSQL runs the same operations as plain ALTERs.
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def add_runtime_tables_as_of_baseline(metadata: MetaData, *, consumes: bool = True, publishes: bool = False) -> None:
    """Adds to a baseline the runtime's own tables (libs.consumer's leases and dead
    letters, libs.outbox's outbox) as the version before migrations created them:
    frozen here, since the live ones may change (each change with a migration in every
    service that has them)."""
    if consumes:
        Table(
            "shard_leases",
            metadata,
            Column("stream_name", String(128), primary_key=True),
            Column("shard_id", String(128), primary_key=True),
            Column("parent_shard_ids", String(512), nullable=False),
            Column("owner", String(128), nullable=True),
            Column("lease_counter", Integer, nullable=False),
            Column("expires_at", Float, nullable=False),
            Column("checkpoint", String(128), nullable=True),
            Column("finished", Boolean, nullable=False),
        )
        Table(
            "dead_letters",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("stream_name", String(128), nullable=False),
            Column("shard_id", String(128), nullable=False),
            Column("sequence_number", String(128), nullable=False),
            Column("partition_key", String(256), nullable=False),
            Column("reason", Text, nullable=False),
            Column("data", LargeBinary, nullable=False),
            Column("created_at", DateTime(timezone=True), nullable=False),
            Column("replayed_at", DateTime(timezone=True), nullable=True),
        )
    if publishes:
        Table(
            "outbox",
            metadata,
            Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
            Column("stream_name", String(128), nullable=False),
            Column("partition_key", String(256), nullable=False),
            Column("data", LargeBinary, nullable=False),
            Column("created_at", Float, nullable=False),
            Column("claimed_until", Float, nullable=True),
        )
