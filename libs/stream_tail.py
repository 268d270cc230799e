"""A read-only tail of a Kinesis stream: every shard from now on, no leases, no checkpoint.

`libs.consumer` is for work that must happen once per record (leases, fencing,
checkpoints in the service's database). Some readers only need to *notice* records as
they arrive, in every process, and can afford to miss one (they re-read their source of
truth anyway): registration's watches, woken by enrollment's events. For them this is
cheap: one thread per process reading every shard in turn from LATEST, handing each
non-empty read to a callback. Shards that appear later (a reshard) are read from their
start, since all their records are newer than the tail; closed shards are dropped once
read to their end. A failed read is retried from after the last record seen (or LATEST).

Nothing is persisted: a record written while the tail was not reading (before start,
during a Kinesis outage, after an iterator expired with nothing seen yet) is not seen.
Callers that need every record use the lease consumer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from libs.backoff import Backoff
from libs.consumer import StreamRecord

log = logging.getLogger(__name__)

TAIL_FAILURE_BACKOFF = Backoff(base_seconds=0.5, cap_seconds=10.0)


@dataclass
class _Shard:
    iterator: str | None
    last_sequence: str | None = None
    # Read from its first record (a shard born after the tail started) when re-opened.
    from_start: bool = False


class StreamTail:
    """Reads every shard of `stream_name` from the moment `start` returns; `on_records`
    gets each non-empty GetRecords result (one shard's records, in order), in the tail's
    thread."""

    def __init__(self, kinesis: Any, stream_name: str, on_records: Callable[[list[StreamRecord]], None], *,
                 idle_seconds: float = 0.25, shard_refresh_seconds: float = 10.0, batch_size: int = 1000) -> None:
        self.kinesis = kinesis
        self.stream_name = stream_name
        self.on_records = on_records
        self.idle_seconds = idle_seconds
        self.shard_refresh_seconds = shard_refresh_seconds
        self.batch_size = batch_size
        self.records_seen = 0
        self._shards: dict[str, _Shard] = {}
        self._known: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_refresh = 0.0
        self._failures = 0

    def start(self) -> None:
        """Blocking: opens every shard at LATEST (so anything written after this returns is
        seen), then reads in a daemon thread."""
        self._refresh(initial=True)
        self._thread = threading.Thread(target=self._run, name=f"tail-{self.stream_name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def shard_count(self) -> int:
        return len(self._shards)

    def _list_shards(self) -> list[dict[str, Any]]:
        shards: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"StreamName": self.stream_name}
        while True:
            page = self.kinesis.list_shards(**kwargs)
            shards.extend(page["Shards"])
            if not page.get("NextToken"):
                return shards
            kwargs = {"NextToken": page["NextToken"]}

    def _refresh(self, initial: bool = False) -> None:
        for shard in self._list_shards():
            shard_id = shard["ShardId"]
            if shard_id in self._known:
                continue
            self._known.add(shard_id)
            if "EndingSequenceNumber" in shard.get("SequenceNumberRange", {}) and initial:
                continue  # closed before the tail started: nothing new can arrive on it
            state = _Shard(iterator=None, from_start=not initial)
            state.iterator = self._iterator(shard_id, state)
            self._shards[shard_id] = state
        self._last_refresh = time.monotonic()

    def _iterator(self, shard_id: str, state: _Shard) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.stream_name, "ShardId": shard_id}
        if state.last_sequence:
            kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=state.last_sequence)
        else:
            kwargs.update(ShardIteratorType="TRIM_HORIZON" if state.from_start else "LATEST")
        return str(self.kinesis.get_shard_iterator(**kwargs)["ShardIterator"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() - self._last_refresh > self.shard_refresh_seconds:
                    self._refresh()
                progressed = self._read_all()
                self._failures = 0
            except (BotoCoreError, ClientError) as error:
                self._failures += 1
                delay = TAIL_FAILURE_BACKOFF.delay(self._failures)
                log.warning("stream tail read failed; retrying", extra={
                    "stream": self.stream_name, "error": str(error)[:300], "retry_in_seconds": round(delay, 2)})
                self._stop.wait(delay)
                continue
            except Exception:  # noqa: BLE001 - a callback bug must not end the tail
                log.exception("stream tail failed; retrying", extra={"stream": self.stream_name})
                self._stop.wait(1.0)
                continue
            if not progressed:
                self._stop.wait(self.idle_seconds)

    def _read_all(self) -> bool:
        progressed = False
        for shard_id, state in list(self._shards.items()):
            if self._stop.is_set():
                break
            if state.iterator is None:
                state.iterator = self._iterator(shard_id, state)
            try:
                response = self.kinesis.get_records(ShardIterator=state.iterator, Limit=self.batch_size)
            except ClientError as error:
                if error.response["Error"]["Code"] in ("ExpiredIteratorException", "InvalidArgumentException"):
                    state.iterator = None  # opened again after the last record seen
                    continue
                raise
            raw = response.get("Records", [])
            if raw:
                records = [StreamRecord(stream_name=self.stream_name, shard_id=shard_id,
                                        sequence_number=r["SequenceNumber"], partition_key=r["PartitionKey"],
                                        data=bytes(r["Data"]), arrival=r["ApproximateArrivalTimestamp"])
                           for r in raw]
                state.last_sequence = records[-1].sequence_number
                self.records_seen += len(records)
                progressed = True
                self.on_records(records)
            state.iterator = response.get("NextShardIterator")
            if state.iterator is None:
                del self._shards[shard_id]  # closed and read to its end
        return progressed
