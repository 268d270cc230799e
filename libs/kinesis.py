"""Kinesis access shared by every service: the boto3 client, stream creation, and writers.

boto3 finds the endpoint through the standard AWS_ENDPOINT_URL_KINESIS variable; with
it unset, real AWS is used with the usual credential chain. `RecordBatcher` lets many
concurrent asyncio callers share PutRecords calls while each caller is still answered
only once Kinesis accepted its own record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

log = logging.getLogger(__name__)

MAX_RECORDS_PER_PUT = 500
REGISTRATIONS_STREAM = "registrations"
ENROLLMENT_EVENTS_STREAM = "enrollment-events"


class KinesisUnavailable(Exception):
    """Kinesis did not accept a record in time."""


def kinesis_client(region: str, endpoint_url: str | None = None, max_pool_connections: int = 20) -> Any:
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_KINESIS")
    kwargs: dict[str, Any] = {}
    if endpoint and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        # A local emulator accepts any credentials; don't make users invent some.
        kwargs.update(aws_access_key_id="local", aws_secret_access_key="local")
    config = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=max_pool_connections,
        connect_timeout=2,
        read_timeout=10,
    )
    return boto3.client("kinesis", region_name=region, endpoint_url=endpoint, config=config, **kwargs)


def ensure_stream(client: Any, name: str, shard_count: int, timeout: float = 60.0) -> None:
    """Creates the stream if it is missing and waits until it is ACTIVE."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = client.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"]
        except ClientError as error:
            if error.response["Error"]["Code"] != "ResourceNotFoundException":
                raise
            try:
                client.create_stream(StreamName=name, ShardCount=shard_count)
                log.info("created stream", extra={"stream": name, "shards": shard_count})
            except ClientError as create_error:
                if create_error.response["Error"]["Code"] != "ResourceInUseException":
                    raise
            status = "CREATING"
        if status in ("ACTIVE", "UPDATING"):
            return
        if time.monotonic() > deadline:
            raise KinesisUnavailable(f"stream {name} not active after {timeout}s")
        time.sleep(0.2)


def wait_for_kinesis(client: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.list_streams(Limit=1)
            return
        except (BotoCoreError, ClientError) as error:
            if time.monotonic() > deadline:
                raise KinesisUnavailable(f"Kinesis not reachable: {error}") from error
            time.sleep(0.5)


@dataclass(frozen=True)
class OutgoingRecord:
    partition_key: str
    data: bytes


def put_records_once(client: Any, stream: str, records: Sequence[OutgoingRecord]) -> list[str | None]:
    """One PutRecords call; returns each record's sequence number, or None where it failed."""
    response = client.put_records(
        StreamName=stream,
        Records=[{"Data": r.data, "PartitionKey": r.partition_key} for r in records],
    )
    return [entry.get("SequenceNumber") if "ErrorCode" not in entry else None for entry in response["Records"]]


def put_records(client: Any, stream: str, records: Sequence[OutgoingRecord], attempts: int = 6) -> list[str | None]:
    """PutRecords in chunks of 500, retrying failed entries (throttling) with backoff and jitter."""
    results: list[str | None] = [None] * len(records)
    for start in range(0, len(records), MAX_RECORDS_PER_PUT):
        pending = list(range(start, min(start + MAX_RECORDS_PER_PUT, len(records))))
        for attempt in range(attempts):
            try:
                sequence_numbers = put_records_once(client, stream, [records[i] for i in pending])
            except (BotoCoreError, ClientError) as error:
                log.warning("PutRecords failed", extra={"stream": stream, "error": str(error)})
                sequence_numbers = [None] * len(pending)
            still_pending = []
            for index, sequence_number in zip(pending, sequence_numbers):
                if sequence_number is None:
                    still_pending.append(index)
                else:
                    results[index] = sequence_number
            pending = still_pending
            if not pending:
                break
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))
    return results


@dataclass
class _Pending:
    record: OutgoingRecord
    future: asyncio.Future[str]
    attempts: int = 0
    not_before: float = field(default=0.0)


class RecordBatcher:
    """Gathers concurrent `put` calls into PutRecords batches.

    Up to `max_in_flight` PutRecords calls run at once in worker threads; records that
    arrive meanwhile wait and leave together, so batches grow with the load. Records that
    Kinesis rejects (throttling, internal failure) are retried with backoff until
    `deadline_seconds`, after which their callers get KinesisUnavailable.
    """

    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        max_wait_seconds: float = 0.002,
        max_in_flight: int = 1,
        deadline_seconds: float = 10.0,
    ) -> None:
        self._client = client
        self._stream = stream
        self._max_wait = max_wait_seconds
        self._deadline = deadline_seconds
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._slots = asyncio.Semaphore(max_in_flight)
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=f"put-{stream}")
        self._task: asyncio.Task[None] | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        while not self._queue.empty() or self._in_flight:
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def put(self, data: bytes, partition_key: str) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(OutgoingRecord(partition_key, data), future))
        async with asyncio.timeout(self._deadline + 5):  # a backstop: _send settles every future
            return await future

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            # Group commit: while every slot is busy, new records pile up in the queue and
            # leave together in the next call, so batches grow with the load by themselves.
            await self._slots.acquire()
            if self._max_wait and self._queue.qsize() < MAX_RECORDS_PER_PUT - 1:
                await asyncio.sleep(self._max_wait)
            batch = [first]
            while len(batch) < MAX_RECORDS_PER_PUT and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            loop = asyncio.get_running_loop()
            try:
                sequence_numbers = await loop.run_in_executor(
                    self._executor, put_records_once, self._client, self._stream, [p.record for p in batch]
                )
            except (BotoCoreError, ClientError) as error:
                log.warning("PutRecords failed", extra={"stream": self._stream, "error": str(error)})
                sequence_numbers = [None] * len(batch)
        finally:
            self._slots.release()
        for pending, sequence_number in zip(batch, sequence_numbers):
            if pending.future.done():
                continue
            if sequence_number is not None:
                pending.future.set_result(sequence_number)
                continue
            pending.attempts += 1
            delay = min(1.0, 0.02 * 2**pending.attempts) * random.uniform(0.5, 1.0)
            if pending.attempts * 0.05 > self._deadline or pending.attempts > 12:
                pending.future.set_exception(KinesisUnavailable(f"stream {self._stream} did not accept the record"))
            else:
                asyncio.get_running_loop().call_later(delay, self._queue.put_nowait, pending)
