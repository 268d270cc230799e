"""The one Kinesis consumer used by enrollment, stats and notifier.

Each shard is read by one worker at a time, holding a lease row in the service's own
database (owner, lease counter, expiry, checkpoint). A batch's effects and the
checkpoint commit in one transaction that ends by updating the lease row on the
condition that this worker still holds the lease with the same counter: the counter
is a fencing token, so a worker that was paused or partitioned past its expiry and
lost the shard cannot commit. The lease row is locked only for that last statement,
so the heartbeat keeps renewing the lease while a long batch runs. Leases are renewed by a heartbeat thread, taken over
after expiry, and balanced: a worker holding less than its fair share takes free
shards, then one shard from the busiest worker. Parent shards are finished before
their children (found by ParentShardId in ListShards). Each held shard has its own
reader thread, so a slow read or commit on one shard does not hold up the others.
Records that cannot be decoded go to the dead_letters table with the reason, in the
same transaction.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy import (
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
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from libs.backoff import Backoff
from libs.db import after_commit
from libs.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

# A shard whose poll or commit failed is read again from its checkpoint after this.
SHARD_FAILURE_BACKOFF = Backoff(base_seconds=0.4, cap_seconds=10.0)
# A shard whose GetRecords was throttled waits this long before the next read.
THROTTLED_BACKOFF = Backoff(base_seconds=0.5, cap_seconds=5.0)

metadata = MetaData()

shard_leases = Table(
    "shard_leases",
    metadata,
    Column("stream_name", String(128), primary_key=True),
    Column("shard_id", String(128), primary_key=True),
    Column("parent_shard_ids", String(512), nullable=False, default=""),
    Column("owner", String(128), nullable=True),
    Column("lease_counter", Integer, nullable=False, default=0),
    Column("expires_at", Float, nullable=False, default=0.0),
    Column("checkpoint", String(128), nullable=True),
    Column("finished", Boolean, nullable=False, default=False),
)

dead_letters = Table(
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
    # Set when an operator put the record back on its stream (libs.operator replay).
    Column("replayed_at", DateTime(timezone=True), nullable=True),
)


@dataclass(frozen=True)
class StreamRecord:
    stream_name: str
    shard_id: str
    sequence_number: str
    partition_key: str
    data: bytes
    arrival: datetime
    # Who read it, under which lease: lets handlers record an audit trail of the fencing token.
    worker_id: str = ""
    lease_counter: int = 0


class LeaseLost(Exception):
    """This worker no longer holds the shard: its batch was rolled back."""


BatchHandler = Callable[[Connection, list[StreamRecord]], None]
T = TypeVar("T")


def record_dead_letter(conn: Connection, record: StreamRecord, reason: str) -> None:
    conn.execute(
        insert(dead_letters).values(
            stream_name=record.stream_name,
            shard_id=record.shard_id,
            sequence_number=record.sequence_number,
            partition_key=record.partition_key,
            reason=reason[:2000],
            data=record.data,
            created_at=datetime.now(UTC),
        )
    )
    after_commit(conn, DEAD_LETTERS.labels(record.stream_name).inc)
    log.warning(
        "record sent to dead letters",
        extra={"stream": record.stream_name, "shard": record.shard_id, "sequence": record.sequence_number,
               "reason": reason[:200]},
    )


def decode_or_dead_letter(
    conn: Connection, records: Iterable[StreamRecord], decode: Callable[[bytes], T]
) -> list[tuple[StreamRecord, T]]:
    """Decodes each record; those that fail go to dead letters and are skipped."""
    decoded = []
    for record in records:
        try:
            decoded.append((record, decode(record.data)))
        except ValueError as error:
            record_dead_letter(conn, record, str(error))
    return decoded


def _batch_tag(worker_id: str) -> str:
    """The tag a worker's batch connections carry: a digest of the whole worker id, so
    worker ids that share a long prefix never match each other's batches (and the tag
    fits in application_name's 63 bytes, ahead of the connection's own name)."""
    return f"batch:{hashlib.blake2b(worker_id.encode(), digest_size=8).hexdigest()} "


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{random.randrange(16**4):04x}"


@dataclass
class _ShardState:
    lease_counter: int
    checkpoint: str | None
    iterator: str | None = None
    not_before: float = 0.0
    failures: int = 0
    lag_seconds: float = 0.0


@dataclass
class LeaseView:
    """What an operator sees of one shard."""

    shard_id: str
    owner: str | None
    lease_counter: int
    expires_at: float
    checkpoint: str | None
    finished: bool
    parent_shard_ids: list[str] = field(default_factory=list)


class StreamConsumer:
    """Consumes one stream with leases; `handler` runs inside the checkpoint transaction."""

    def __init__(
        self,
        *,
        engine: Engine,
        kinesis: Any,
        stream_name: str,
        handler: BatchHandler,
        worker_id: str | None = None,
        lease_seconds: float = 10.0,
        batch_size: int = 1000,
        idle_sleep_seconds: float = 0.2,
        shard_refresh_seconds: float = 10.0,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.kinesis = kinesis
        self.stream_name = stream_name
        self.handler = handler
        self.worker_id = worker_id or default_worker_id()
        self.lease_seconds = lease_seconds
        self.batch_size = batch_size
        self.idle_sleep = idle_sleep_seconds
        self.shard_refresh_seconds = shard_refresh_seconds
        self.on_commit = on_commit
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._states: dict[str, _ShardState] = {}
        self._threads: list[threading.Thread] = []
        # One reader per held shard (as KCL's ShardConsumer): a slow GetRecords or commit on
        # one shard does not stall the others, and their network waits overlap.
        self._shard_threads: dict[str, threading.Thread] = {}
        self._last_shard_refresh = 0.0

    # lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        metadata.create_all(self.engine)
        thread = threading.Thread(target=self._keep_leases, name=f"{self.stream_name}-leases", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Finishes the batches in progress, then hands the leases back for others to take."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        with self._lock:
            readers = list(self._shard_threads.values())
        for thread in [*self._threads, *readers]:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            held = dict(self._held)
            self._held.clear()
        for shard_id, counter in held.items():
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        self._mine(shard_id, counter).values(owner=None, expires_at=0.0)
                    )
            except Exception:  # noqa: BLE001 - the lease simply expires instead
                log.exception("could not release lease", extra={"shard": shard_id})

    def held_shards(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def lag_seconds(self) -> dict[str, float]:
        return {shard: state.lag_seconds for shard, state in list(self._states.items())}

    def leases(self) -> list[LeaseView]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(shard_leases).where(shard_leases.c.stream_name == self.stream_name)
                .order_by(shard_leases.c.shard_id)
            ).all()
        return [
            LeaseView(r.shard_id, r.owner, r.lease_counter, r.expires_at, r.checkpoint, r.finished,
                      [p for p in r.parent_shard_ids.split(",") if p])
            for r in rows
        ]

    # leases ----------------------------------------------------------------------

    def _mine(self, shard_id: str, counter: int) -> Any:
        return update(shard_leases).where(
            shard_leases.c.stream_name == self.stream_name,
            shard_leases.c.shard_id == shard_id,
            shard_leases.c.owner == self.worker_id,
            shard_leases.c.lease_counter == counter,
        )

    def _keep_leases(self) -> None:
        interval = self.lease_seconds / 3
        while not self._stop.is_set():
            try:
                self._sync_leases()
                self.ready.set()
            except (OperationalError, BotoCoreError, ClientError) as error:
                log.warning("lease sync failed", extra={"stream": self.stream_name, "error": str(error)[:300]})
            except Exception:
                log.exception("lease sync failed", extra={"stream": self.stream_name})
            self._stop.wait(interval)

    def _refresh_shards(self) -> None:
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream_name}
        while True:
            page = self.kinesis.list_shards(**kwargs)
            shards.extend(page["Shards"])
            if not page.get("NextToken"):
                break
            kwargs = {"NextToken": page["NextToken"]}
        with self.engine.begin() as conn:
            known = set(
                conn.execute(
                    select(shard_leases.c.shard_id).where(shard_leases.c.stream_name == self.stream_name)
                ).scalars()
            )
        for shard in shards:
            if shard["ShardId"] in known:
                continue
            parents = [p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p]
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(shard_leases).values(
                            stream_name=self.stream_name,
                            shard_id=shard["ShardId"],
                            parent_shard_ids=",".join(parents),
                            owner=None,
                            lease_counter=0,
                            expires_at=0.0,
                            checkpoint=None,
                            finished=False,
                        )
                    )
            except IntegrityError:
                pass  # another worker registered it first
        self._last_shard_refresh = time.monotonic()

    def _sync_leases(self) -> None:
        if time.monotonic() - self._last_shard_refresh > self.shard_refresh_seconds:
            self._refresh_shards()
        now = time.time()
        for shard_id, counter in self.held_shards().items():
            with self.engine.begin() as conn:
                renewed = conn.execute(self._mine(shard_id, counter).values(expires_at=now + self.lease_seconds))
            if renewed.rowcount != 1:
                log.info("lease lost", extra={"stream": self.stream_name, "shard": shard_id})
                self._forget(shard_id)
        with self.engine.connect() as conn:
            rows = conn.execute(select(shard_leases).where(shard_leases.c.stream_name == self.stream_name)).all()
        known = {r.shard_id for r in rows}
        finished = {r.shard_id for r in rows if r.finished}

        def parents_done(row: Any) -> bool:
            return all(p in finished or p not in known for p in row.parent_shard_ids.split(",") if p)

        eligible = [r for r in rows if not r.finished and parents_done(r)]
        if not eligible:
            return
        live = [r for r in eligible if r.owner and r.expires_at > now]
        owners = {r.owner for r in live} | {self.worker_id}
        target = math.ceil(len(eligible) / len(owners))
        held = self.held_shards()
        free = [r for r in eligible if r.shard_id not in held and (not r.owner or r.expires_at <= now)]
        random.shuffle(free)
        for row in free:
            if len(held) >= target:
                break
            if self._take(row, now):
                held[row.shard_id] = row.lease_counter + 1
        if len(held) < target:
            load: dict[str, list[Any]] = {}
            for row in live:
                if row.owner != self.worker_id:
                    load.setdefault(row.owner, []).append(row)
            busiest = max(load.values(), key=len, default=[])
            if len(busiest) > target:
                victim = random.choice(busiest)
                if self._take(victim, now):
                    log.info("took a shard to balance", extra={"stream": self.stream_name, "shard": victim.shard_id})

    def _take(self, row: Any, now: float) -> bool:
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                # A worker mid-batch holds its lease row; don't wait behind it (and miss
                # renewing our own leases meanwhile).
                locked = conn.execute(
                    select(shard_leases.c.shard_id)
                    .where(
                        shard_leases.c.stream_name == self.stream_name,
                        shard_leases.c.shard_id == row.shard_id,
                        shard_leases.c.lease_counter == row.lease_counter,
                    )
                    .with_for_update(skip_locked=True)
                ).first()
                if locked is None:
                    if row.owner and row.owner != self.worker_id and row.expires_at <= now:
                        self._end_stuck_batches(conn, row.owner)
                    return False
            taken = conn.execute(
                update(shard_leases)
                .where(
                    shard_leases.c.stream_name == self.stream_name,
                    shard_leases.c.shard_id == row.shard_id,
                    shard_leases.c.lease_counter == row.lease_counter,
                )
                .values(owner=self.worker_id, lease_counter=row.lease_counter + 1, expires_at=now + self.lease_seconds)
            )
        if taken.rowcount != 1:
            return False
        if self.engine.dialect.name == "postgresql" and row.owner and row.owner != self.worker_id \
                and row.expires_at <= now:
            # Its owner renewed nothing for a whole lease: paused, partitioned or hung, maybe
            # inside a batch whose row locks would stall ours. Its commit would be refused
            # (the counter moved on); ending its batch now releases those locks.
            with self.engine.begin() as conn:
                self._end_stuck_batches(conn, row.owner)
        counter = row.lease_counter + 1
        reader = threading.Thread(target=self._consume_shard, args=(row.shard_id, counter),
                                  name=f"{self.stream_name}-{row.shard_id}", daemon=True)
        with self._lock:
            self._held[row.shard_id] = counter
            self._states[row.shard_id] = _ShardState(lease_counter=counter, checkpoint=row.checkpoint)
            self._shard_threads[row.shard_id] = reader
        reader.start()
        log.info("lease taken", extra={"stream": self.stream_name, "shard": row.shard_id,
                                       "lease_counter": row.lease_counter + 1})
        return True

    def _end_stuck_batches(self, conn: Connection, owner: str) -> None:
        """Ends the batch transactions of a worker whose lease expired.

        It renewed nothing for a whole lease (its heartbeat is not held up by its own
        batches), so it is paused, partitioned or hung, perhaps inside a batch;
        PostgreSQL cannot tell (a client stopped in the middle of a pipeline
        looks "active", so idle_in_transaction_session_timeout never fires) and the
        row and seat locks it holds would stall this shard for as long as it is stuck.
        Its batch connections are tagged (see _batch_tag); terminating them rolls the
        batch back, and when the worker resumes, its fencing token is stale.
        """
        tag = _batch_tag(owner)
        ended = conn.execute(
            text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                 "WHERE left(application_name, :length) = :tag AND pid <> pg_backend_pid()"),
            {"tag": tag, "length": len(tag)},
        ).scalar_one()
        if ended:
            log.warning("ended the batch of a worker stuck past its lease",
                        extra={"stream": self.stream_name, "owner": owner, "connections": ended})

    def _forget(self, shard_id: str, counter: int | None = None) -> None:
        """Drops a shard; with `counter`, only if it is still held under that lease."""
        with self._lock:
            if counter is not None and self._held.get(shard_id) != counter:
                return
            self._held.pop(shard_id, None)
            self._states.pop(shard_id, None)

    # processing ------------------------------------------------------------------

    def _consume_shard(self, shard_id: str, counter: int) -> None:
        """Reads one shard for as long as this worker holds it under `counter`."""
        try:
            self._read_while_held(shard_id, counter)
        finally:
            with self._lock:
                if self._shard_threads.get(shard_id) is threading.current_thread():
                    del self._shard_threads[shard_id]

    def _read_while_held(self, shard_id: str, counter: int) -> None:
        while not self._stop.is_set():
            state = self._states.get(shard_id)
            if state is None or state.lease_counter != counter:
                return  # lost, finished or handed back: a new lease gets a new reader
            wait = state.not_before - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            progressed = False
            try:
                progressed = self._poll_shard(shard_id, state)
                state.failures = 0
            except LeaseLost:
                log.info("lease lost at commit; batch rolled back",
                         extra={"stream": self.stream_name, "shard": shard_id})
                self._forget(shard_id, counter)
                return
            except Exception as error:  # noqa: BLE001 - retry this shard from its checkpoint
                state.failures += 1
                state.iterator = None  # restart from the last committed checkpoint
                delay = SHARD_FAILURE_BACKOFF.delay(state.failures)
                state.not_before = time.monotonic() + delay
                log.warning("shard poll failed; will retry from checkpoint",
                            extra={"stream": self.stream_name, "shard": shard_id,
                                   "error": f"{type(error).__name__}: {str(error)[:300]}",
                                   "retry_in_seconds": round(delay, 2)})
            if not progressed:
                self._stop.wait(self.idle_sleep)

    def _iterator(self, shard_id: str, state: _ShardState) -> str:
        if state.checkpoint:
            response = self.kinesis.get_shard_iterator(
                StreamName=self.stream_name, ShardId=shard_id,
                ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=state.checkpoint,
            )
        else:
            response = self.kinesis.get_shard_iterator(
                StreamName=self.stream_name, ShardId=shard_id, ShardIteratorType="TRIM_HORIZON"
            )
        return str(response["ShardIterator"])

    def _poll_shard(self, shard_id: str, state: _ShardState) -> bool:
        if state.iterator is None:
            state.iterator = self._iterator(shard_id, state)
        try:
            response = self.kinesis.get_records(ShardIterator=state.iterator, Limit=self.batch_size)
        except ClientError as error:
            code = error.response["Error"]["Code"]
            if code == "ExpiredIteratorException":
                state.iterator = None
                return False
            if code in ("ProvisionedThroughputExceededException", "LimitExceededException"):
                state.failures += 1
                state.not_before = time.monotonic() + THROTTLED_BACKOFF.delay(state.failures)
                return False
            raise
        records = [
            StreamRecord(
                stream_name=self.stream_name,
                shard_id=shard_id,
                sequence_number=r["SequenceNumber"],
                partition_key=r["PartitionKey"],
                data=bytes(r["Data"]),
                arrival=r["ApproximateArrivalTimestamp"],
                worker_id=self.worker_id,
                lease_counter=state.lease_counter,
            )
            for r in response.get("Records", [])
        ]
        next_iterator = response.get("NextShardIterator")
        if records:
            self._commit(shard_id, state, records)
            state.lag_seconds = max(0.0, time.time() - records[-1].arrival.timestamp())
        else:
            state.lag_seconds = 0.0
        if next_iterator is None and not records:
            self._finish(shard_id, state)
            return bool(records)
        state.iterator = next_iterator
        return bool(records)

    def _commit(self, shard_id: str, state: _ShardState, records: list[StreamRecord]) -> None:
        last = records[-1].sequence_number
        with self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                # Tags this connection for the transaction only, so a worker taking over
                # an expired lease can end the batch if this worker is stuck in it.
                conn.execute(
                    text("SELECT set_config('application_name', :tag || current_setting('application_name'), true)"),
                    {"tag": _batch_tag(self.worker_id)},
                )
            self.handler(conn, records)
            # Last, lock our lease row and check the fencing token: a worker that lost the
            # lease meanwhile rolls its effects back. Locked only now, the row stays free
            # for the heartbeat while the batch runs, so a batch longer than the lease
            # keeps it (and is not ended as stuck by the next worker on every attempt).
            fenced = conn.execute(self._mine(shard_id, state.lease_counter).values(checkpoint=last))
            if fenced.rowcount != 1:
                raise LeaseLost(shard_id)
        state.checkpoint = last
        if self.on_commit:
            self.on_commit()

    def _finish(self, shard_id: str, state: _ShardState) -> None:
        with self.engine.begin() as conn:
            done = conn.execute(self._mine(shard_id, state.lease_counter).values(finished=True, owner=None))
            if done.rowcount != 1:
                raise LeaseLost(shard_id)
        log.info("shard finished", extra={"stream": self.stream_name, "shard": shard_id})
        self._forget(shard_id)
        self._last_shard_refresh = 0.0  # look for its children now
