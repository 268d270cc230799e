"""Rebuilding the read model from the enrollment service's records (an operator's tool).

`rebuild_from_enrollments` replaces the live roster with the enrollments the enrollment
service exports (its ExportEnrollments stream, each with its course's campus; never its
database) and recounts every aggregate from it, in one transaction of the stats
database: queries keep seeing the old figures until it commits, and a failure changes
nothing. Tombstones of removed enrollments are kept, so
a late redelivery of a cancelled enrollment still cannot bring it back.

The consumer's shard checkpoints are left alone. The operator stops the stats service
first (the rebuild refuses to run while a worker holds a live lease, and locks the
lease rows so none commits a batch meanwhile), rebuilds, and starts it again. The
export reads page by page, each page committed data (a stream that drops is resumed
after the last page received whole, so no enrollment is copied twice or skipped); an
enrollment taken or cancelled while it runs may be missed or still be exported, but
its event is still ahead of the
stopped consumer's checkpoints (the enrollment service publishes events only after
committing), so the restarted consumer applies it. Records
the restarted consumer reads that the rebuild already counted find their roster row by
registration id and change nothing.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, exists, func, select

from libs import consumer as consumer_lib
from libs.db import upsert_rows
from libs.migrations import upgrade_to_head
from services.stats.adapters.enrollment_export import EnrollmentPage
from services.stats.adapters.tables import AGGREGATE_TABLES, age_years, roster
from services.stats.migrations import MIGRATIONS
from services.stats.service_layer.projection import recount_from_roster

# Rows per step: larger steps rewrite each aggregate row fewer times in the transaction.
CHUNK_SIZE = 20000

Progress = Callable[[str, int, int], None]


class EnrollmentSource(Protocol):
    def pages(self) -> Iterator[EnrollmentPage]:
        """Every enrollment, in pages (at least one), each page telling the total."""
        ...


class WorkersStillRunning(Exception):
    """A stats worker holds a live lease: stop the stats service before rebuilding."""


@dataclass(frozen=True)
class RebuildSummary:
    enrollments: int
    tombstones_kept: int
    seconds: float


def rebuild_from_enrollments(
    stats_engine: Engine,
    source: EnrollmentSource,
    progress: Progress | None = None,
    force: bool = False,
    chunk_size: int = CHUNK_SIZE,
) -> RebuildSummary:
    """Rewrites the stats read model from the enrollment service's export, in one transaction."""
    started = time.monotonic()
    report = progress or (lambda _stage, _done, _total: None)
    upgrade_to_head(stats_engine, MIGRATIONS)  # as the service does at start

    def replace_tombstone(insert: Any) -> Any:
        # The enrollment service is the truth: a tombstone for an enrollment it still
        # holds (which the services never produce) gives way to the live row.
        return insert.on_conflict_do_update(
            index_elements=["registration_id"],
            set_={c.name: insert.excluded[c.name] for c in roster.c if c.name != "registration_id"},
        )

    with stats_engine.begin() as stats:
        _fence_workers(stats, force)
        stats.execute(roster.delete().where(roster.c.removed_time.is_(None)))
        copied = 0
        for number, page in enumerate(source.pages()):
            if number == 0:
                report("copy enrollments", 0, page.total)
            if page.enrollments:
                rows = [{**dataclasses.asdict(e), "removed_time": None} for e in page.enrollments]
                upsert_rows(stats, roster, rows, replace_tombstone)
                copied += len(rows)
                report("copy enrollments", copied, max(page.total, copied))
        tombstones = stats.execute(
            select(func.count()).select_from(roster).where(roster.c.removed_time.is_not(None))
        ).scalar_one()
        report("count aggregates", 0, copied)
        recount_from_roster(stats, chunk_size, lambda done: report("count aggregates", done, copied))
    vacuum_analyze(stats_engine)
    return RebuildSummary(copied, tombstones, time.monotonic() - started)


def vacuum_analyze(engine: Engine) -> None:
    """On PostgreSQL, reclaims the row versions a rebuild leaves behind (every aggregate
    row is rewritten many times in its one transaction) and refreshes the planner's
    statistics, so reads are as fast right after a rebuild as in the steady state."""
    if engine.dialect.name != "postgresql":
        return
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in (roster, *AGGREGATE_TABLES):
            conn.exec_driver_sql(f'VACUUM ANALYZE "{table.name}"')


def _fence_workers(stats: Connection, force: bool) -> None:
    """Refuses to go on while a worker holds a live lease; locks the lease rows so that no
    worker commits a batch (each batch first updates its lease row) until this commits."""
    leases = consumer_lib.shard_leases
    query = select(leases.c.shard_id, leases.c.owner, leases.c.expires_at)
    if stats.dialect.name == "postgresql":
        query = query.with_for_update()
    now = time.time()
    live = [row for row in stats.execute(query) if row.owner and row.expires_at > now]
    if live and not force:
        owners = sorted({row.owner for row in live})
        raise WorkersStillRunning(
            f"{len(live)} shard(s) leased by running stats worker(s) {', '.join(owners)}: "
            "stop the stats service first (or pass --force to fence them out)"
        )


def complete_older_read_model(engine: Engine) -> bool:
    """Counts the aggregates this version added (birth years, course summaries) when the
    database was made by an older version: the roster has live rows but they are missing.
    Returns whether it did."""
    with engine.begin() as conn:
        live = conn.execute(select(exists().where(roster.c.removed_time.is_(None)))).scalar()
        counted = conn.execute(select(exists().where(age_years.c.students > 0))).scalar()
        if not live or counted:
            return False
        recount_from_roster(conn)
        return True
