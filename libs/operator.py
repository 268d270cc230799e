"""Operator command for the services' databases: leases, lag, dead letters, replay, migrations.

    python -m libs.operator leases --service enrollment
    python -m libs.operator dead-letters --service stats
    python -m libs.operator replay --service enrollment 12 13
    python -m libs.operator migrate upgrade --service notifier   # also: current, history
    python -m libs.operator migrate revision --service stats -m "what changed"  # developers

It reads the same configuration as the service (database URL, stream prefix, Kinesis
endpoint). Services register themselves: each names a `ServiceDescription` under the
`course_signup.services` entry-point group (pyproject.toml), so this module knows
none of them. Lag is the age of the oldest record a shard has not committed yet, read
from Kinesis after the shard's checkpoint. Replay puts a dead letter's original bytes
back on its stream with its partition key (after the consumer was fixed), and marks
it replayed; the consumer then processes it like any new record. Migrate runs the
service's migration history (libs.migrations) by hand, as the service does at start:
upgrade to head, the current revision, the history with what is applied.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Engine, select, update

from libs.config import CommonSettings, load_settings
from libs.consumer import dead_letters, metadata, shard_leases
from libs.db import make_engine
from libs.kinesis import OutgoingRecord, kinesis_client, put_records
from libs.migrations import (
    Migrations,
    SchemaMismatch,
    created_before_migrations,
    current_revision,
    new_revision,
    upgrade_to_head,
)
from libs.service_registry import ENTRY_POINT_GROUP, ServiceDescription, registered_services


@dataclass
class LeaseReport:
    stream: str
    shard_id: str
    parents: str
    owner: str | None
    lease_counter: int
    expires_in_seconds: float | None
    checkpoint: str | None
    finished: bool
    lag_seconds: float | None


def _target(description: ServiceDescription) -> tuple[CommonSettings, Engine, list[str]]:
    settings = load_settings(description.settings_class)
    engine = make_engine(getattr(settings, description.database_url_setting))
    metadata.create_all(engine)
    return settings, engine, [settings.stream_name(base) for base in description.consumed_streams]


def shard_lag_seconds(client: Any, stream: str, shard_id: str, checkpoint: str | None) -> float:
    """Age of the oldest record after the checkpoint; 0 when the shard is caught up."""
    if checkpoint:
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard_id,
                                             ShardIteratorType="AFTER_SEQUENCE_NUMBER",
                                             StartingSequenceNumber=checkpoint)["ShardIterator"]
    else:
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard_id,
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    records = client.get_records(ShardIterator=iterator, Limit=1).get("Records", [])
    if not records:
        return 0.0
    return max(0.0, time.time() - records[0]["ApproximateArrivalTimestamp"].timestamp())


def lease_report(engine: Engine, client: Any, stream: str) -> list[LeaseReport]:
    now = time.time()
    with engine.connect() as conn:
        rows = conn.execute(
            select(shard_leases).where(shard_leases.c.stream_name == stream).order_by(shard_leases.c.shard_id)
        ).all()
    reports = []
    for row in rows:
        live = row.owner is not None and row.expires_at > now
        reports.append(LeaseReport(
            stream=stream,
            shard_id=row.shard_id,
            parents=row.parent_shard_ids,
            owner=row.owner if live else None,
            lease_counter=row.lease_counter,
            expires_in_seconds=round(row.expires_at - now, 1) if live else None,
            checkpoint=row.checkpoint,
            finished=row.finished,
            lag_seconds=None if row.finished else round(shard_lag_seconds(client, stream, row.shard_id,
                                                                           row.checkpoint), 3),
        ))
    return reports


def list_dead_letters(engine: Engine, include_replayed: bool) -> list[dict[str, Any]]:
    query = select(
        dead_letters.c.id, dead_letters.c.stream_name, dead_letters.c.shard_id, dead_letters.c.sequence_number,
        dead_letters.c.reason, dead_letters.c.created_at, dead_letters.c.replayed_at,
    ).order_by(dead_letters.c.id)
    if not include_replayed:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(query)]


def replay(engine: Engine, client: Any, ids: list[int]) -> list[tuple[int, str]]:
    """Puts dead letters back on their streams; returns (id, new sequence number)."""
    with engine.connect() as conn:
        rows = conn.execute(select(dead_letters).where(dead_letters.c.id.in_(ids))).all()
    missing = set(ids) - {row.id for row in rows}
    if missing:
        raise SystemExit(f"no dead letter with id {', '.join(map(str, sorted(missing)))}")
    replayed = []
    for row in rows:
        (sequence_number,) = put_records(client, row.stream_name, [OutgoingRecord(row.partition_key, row.data)])
        if sequence_number is None:
            raise SystemExit(f"Kinesis did not accept dead letter {row.id}; nothing marked")
        with engine.begin() as conn:
            conn.execute(update(dead_letters).where(dead_letters.c.id == row.id)
                         .values(replayed_at=dt.datetime.now(dt.UTC)))
        replayed.append((row.id, sequence_number))
    return replayed


def migrate(engine: Engine, migrations: Migrations, action: str) -> list[dict[str, Any]]:
    """`upgrade` to head (adopting a database made before migrations), the `current`
    revision with its state, or the `history` (newest first) with what is applied."""
    heads = migrations.script().get_heads()
    with engine.connect() as conn:
        revision = current_revision(conn, migrations)
        adoptable = created_before_migrations(conn, migrations)
    if action == "upgrade":
        return [{"service": migrations.service, "from_revision": revision,
                 "revision": upgrade_to_head(engine, migrations)}]
    if action == "current":
        if revision in heads:
            state = "at head"
        elif adoptable:
            state = "created before migrations: upgrade adopts it"
        else:
            state = "empty: upgrade creates the tables" if revision is None else "behind: run upgrade"
        return [{"service": migrations.service, "revision": revision, "head": ", ".join(heads), "state": state}]
    rows = []
    applied = False
    for script in migrations.script().walk_revisions():
        applied = applied or script.revision == revision
        rows.append({"revision": script.revision, "down_revision": script.down_revision,
                     "applied": applied, "message": (script.doc or "").split("\n")[0]})
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("(none)")
        return
    columns = list(rows[0])
    cells = [[("" if row[c] is None else str(row[c]))[:60] for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def main(argv: list[str] | None = None) -> int:
    services = registered_services()
    if not services:
        print(f"no service is registered under the {ENTRY_POINT_GROUP!r} entry points: "
              "install the project (make install, or pip install -e .)", file=sys.stderr)
        return 2
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--service", choices=sorted(services), required=True,
                        help=f"a service registered under the {ENTRY_POINT_GROUP!r} entry points")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    parser = argparse.ArgumentParser(prog="python -m libs.operator", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("leases", parents=[common], help="owner, lease counter, checkpoint and lag per shard")
    dead = commands.add_parser("dead-letters", parents=[common], help="records that could not be handled")
    dead.add_argument("--all", action="store_true", help="include replayed ones")
    replay_parser = commands.add_parser("replay", parents=[common], help="put dead letters back on their stream")
    replay_parser.add_argument("ids", nargs="*", type=int, help="dead letter ids")
    migrate_parser = commands.add_parser("migrate", parents=[common], help="the database's schema migrations")
    migrate_parser.add_argument("action", choices=["upgrade", "current", "history", "revision"],
                                help="revision (developers): write the next migration, autogenerated "
                                     "against the service's database (a scratch one) brought to head")
    migrate_parser.add_argument("-m", "--message", help="revision: what the schema change is")
    args = parser.parse_args(argv)
    description = services[args.service]
    if args.command == "migrate":
        if description.migrations is None:
            parser.error(f"the {args.service} service declares no migrations")
        settings = load_settings(description.settings_class)
        engine = make_engine(getattr(settings, description.database_url_setting))
        try:
            if args.action == "revision":
                if not args.message:
                    migrate_parser.error("revision needs -m/--message")
                path = new_revision(engine, description.migrations, args.message)
                rows: list[dict[str, Any]] = [{"service": args.service, "written": str(path)}]
            else:
                rows = migrate(engine, description.migrations, args.action)
        except SchemaMismatch as refused:
            print(refused, file=sys.stderr)
            return 1
        finally:
            engine.dispose()
        _output(rows, args.json)
        return 0
    settings, engine, streams = _target(description)
    client = kinesis_client(settings.aws_region)
    try:
        if args.command == "leases":
            rows = [asdict(r) for stream in streams for r in lease_report(engine, client, stream)]
        elif args.command == "dead-letters":
            rows = list_dead_letters(engine, args.all)
        else:
            if not args.ids:
                replay_parser.error("replay needs at least one dead letter id")
            rows = [{"id": i, "sequence_number": seq} for i, seq in replay(engine, client, args.ids)]
    finally:
        engine.dispose()
    _output(rows, args.json)
    return 0


def _output(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows, default=str, indent=2))
    else:
        _print_table(rows)


if __name__ == "__main__":
    sys.exit(main())
