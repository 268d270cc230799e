"""Transactional outbox: records written with a decision, published to Kinesis after commit.

`enqueue` runs inside the caller's transaction, so an event or notification command
exists if and only if the decision that caused it committed. `OutboxRelay` publishes
rows in id order and deletes them once Kinesis acknowledged them; a crash between the
two publishes a row again, which consumers absorb because they are idempotent. On
PostgreSQL rows are claimed with FOR UPDATE SKIP LOCKED, so several workers' relays
share the work without publishing the same row concurrently.
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
    select,
)

from libs.backoff import Backoff
from libs.kinesis import OutgoingRecord, put_records

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
    def __init__(self, engine: Engine, kinesis: Any, batch_size: int = 500, poll_seconds: float = 1.0) -> None:
        self.engine = engine
        self.kinesis = kinesis
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
        self.published = 0

    def start(self) -> None:
        metadata.create_all(self.engine)
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
        with self.engine.begin() as conn:
            query = select(outbox).order_by(outbox.c.id).limit(self.batch_size)
            if self.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if not rows:
                return 0
            by_stream: dict[str, list[Any]] = defaultdict(list)
            for row in rows:
                by_stream[row.stream_name].append(row)
            done: list[int] = []
            for stream, stream_rows in by_stream.items():
                results = put_records(
                    self.kinesis, stream, [OutgoingRecord(r.partition_key, r.data) for r in stream_rows], attempts=3
                )
                done.extend(r.id for r, seq in zip(stream_rows, results) if seq is not None)
            if done:
                conn.execute(delete(outbox).where(outbox.c.id.in_(done)))
        self.published += len(done)
        return len(done)
