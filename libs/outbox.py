"""Transactional outbox: records written with a decision, published to Kinesis after commit.

`enqueue` runs inside the caller's transaction, so an event or notification command
exists if and only if the decision that caused it committed.

`OutboxRelay` never holds a transaction across a network call (on SQLite that would
hold the only write lock while Kinesis answers). Each pass:
1. claims a batch of rows in id order in one short transaction: rows nobody claimed or
   whose claim lapsed get `claimed_until` = now + `claim_seconds` (on PostgreSQL the
   candidates are read FOR UPDATE SKIP LOCKED, so concurrent claims do not wait on each
   other), so several workers' relays share the work instead of publishing the same
   rows over and over;
2. publishes them to Kinesis outside any transaction;
3. deletes the rows Kinesis acknowledged and releases the claim of the rest, in a
   second short transaction.
A relay that crashes after claiming leaves its rows to the others once the claim
lapses; one that crashes between publish and delete (or whose claim lapsed during a
slow publish) gets its rows published again. Delivery is at least once: consumers are
idempotent (deterministic message ids, libs/envelope.py), so a re-publish is harmless.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    delete,
    insert,
    or_,
    select,
    update,
)

from libs.backoff import Backoff
from libs.db import ensure_schema
from libs.kinesis import OutgoingRecord, put_records
from libs.metrics import OUTBOX_PUBLISH_SECONDS, OUTBOX_PUBLISHED

log = logging.getLogger(__name__)

# A relay pass that failed (database or Kinesis down) is tried again after this.
RELAY_FAILURE_BACKOFF = Backoff(base_seconds=1.0, cap_seconds=10.0)

metadata = MetaData()

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("stream_name", String(128), nullable=False),
    Column("partition_key", String(256), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    # Epoch seconds until which a relay holds the row for publishing; NULL: free.
    Column("claimed_until", Float, nullable=True),
)


def enqueue(conn: Connection, rows: list[tuple[str, str, bytes]]) -> None:
    """Adds (stream, partition key, data) rows in the caller's transaction."""
    if rows:
        now = time.time()
        conn.execute(
            insert(outbox),
            [{"stream_name": s, "partition_key": k, "data": d, "created_at": now} for s, k, d in rows],
        )


class OutboxRelay:
    """Publishes committed outbox rows from a background thread (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        kinesis: Any,
        batch_size: int = 500,
        poll_seconds: float = 1.0,
        claim_seconds: float = 60.0,
    ) -> None:
        self.engine = engine
        self.kinesis = kinesis
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        # Longer than a publish takes (3 PutRecords attempts per stream, each bounded by
        # the client's timeouts), so a live relay's rows are rarely published twice.
        self.claim_seconds = claim_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self.published = 0

    def start(self) -> None:
        ensure_schema(self.engine, metadata)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Publishes what is pending (within the timeout), then stops."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        failures = 0
        while True:
            try:
                moved = self.publish_once()
                failures = 0
            except Exception as error:  # noqa: BLE001 - retried after a pause
                failures += 1
                moved = 0
                log.warning("outbox relay failed", extra={"error": str(error)[:300]})
            if moved:
                continue
            if self._stop.is_set():
                return
            self._wake.wait(RELAY_FAILURE_BACKOFF.delay(failures) if failures else self.poll_seconds)
            self._wake.clear()

    def publish_once(self) -> int:
        """One pass: claim, publish, then delete what Kinesis acknowledged. Returns that count."""
        rows = self._claim()
        if not rows:
            return 0
        done: list[int] = []
        try:
            by_stream: dict[str, list[Any]] = defaultdict(list)
            for row in rows:
                by_stream[row.stream_name].append(row)
            for stream, stream_rows in by_stream.items():
                results = put_records(
                    self.kinesis, stream, [OutgoingRecord(r.partition_key, r.data) for r in stream_rows], attempts=3
                )
                done.extend(r.id for r, seq in zip(stream_rows, results) if seq is not None)
        finally:
            # Also when publishing raised: what was acknowledged is deleted, the rest freed.
            self._settle(done, [row.id for row in rows])
        self.published += len(done)
        OUTBOX_PUBLISHED.inc(len(done))
        published_at = time.time()
        acknowledged = set(done)
        for row in rows:
            if row.id in acknowledged:
                OUTBOX_PUBLISH_SECONDS.observe(max(0.0, published_at - row.created_at))
        return len(done)

    def _claim(self) -> list[Any]:
        now = time.time()
        with self.engine.begin() as conn:
            query = (
                select(outbox.c.id, outbox.c.stream_name, outbox.c.partition_key, outbox.c.data,
                       outbox.c.created_at)
                .where(or_(outbox.c.claimed_until.is_(None), outbox.c.claimed_until <= now))
                .order_by(outbox.c.id)
                .limit(self.batch_size)
            )
            if self.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if rows:
                conn.execute(
                    update(outbox)
                    .where(outbox.c.id.in_([row.id for row in rows]))
                    .values(claimed_until=now + self.claim_seconds)
                )
        return list(rows)

    def _settle(self, published: list[int], claimed: list[int]) -> None:
        unpublished = sorted(set(claimed) - set(published))
        with self.engine.begin() as conn:
            for chunk in _chunks(published):
                conn.execute(delete(outbox).where(outbox.c.id.in_(chunk)))
            for chunk in _chunks(unpublished):
                conn.execute(update(outbox).where(outbox.c.id.in_(chunk)).values(claimed_until=None))


def _chunks(ids: list[int], size: int = 500) -> list[list[int]]:
    return [ids[start:start + size] for start in range(0, len(ids), size)]
