"""Kinesis access shared by every service: the boto3 client, stream creation, and writers.

boto3 finds the endpoint through the standard AWS_ENDPOINT_URL_KINESIS variable; with
it unset, real AWS is used with the usual credential chain. `RecordBatcher` lets many
concurrent asyncio callers share PutRecords calls while each caller is still answered
only once Kinesis accepted its own record.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError
from tenacity import retry_if_exception_type, retry_if_result

from libs.backoff import DEPENDENCY_WAIT_BACKOFF, DEPENDENCY_WAIT_SECONDS, Backoff

log = logging.getLogger(__name__)

MAX_RECORDS_PER_PUT = 500
REGISTRATIONS_STREAM = "registrations"
ENROLLMENT_EVENTS_STREAM = "enrollment-events"

# PutRecords entries Kinesis rejected (throttling, internal failure), retried in place.
PUT_RECORDS_BACKOFF = Backoff(base_seconds=0.05, cap_seconds=2.0)
# A batched record rejected again, rescheduled on the event loop.
BATCHED_RECORD_BACKOFF = Backoff(base_seconds=0.04, cap_seconds=1.0)


class KinesisUnavailable(Exception):
    """Kinesis did not accept a record in time, and certainly did not write it."""


class KinesisOutcomeUnknown(Exception):
    """Kinesis did not answer in time for a record it may have written: a PutRecords that
    carried it timed out waiting for an answer (or is still waiting). The caller must not
    be told "not written"; a retry of the same record is deduplicated downstream."""


def certainly_not_written(error: BaseException) -> bool:
    """True when a failed PutRecords call certainly wrote none of its records: the request
    never reached Kinesis (no connection), or Kinesis answered it with a client error.
    A read timeout, a connection dropped after sending or a 5xx leaves the outcome open."""
    if isinstance(error, ClientError):
        return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)) < 500
    return isinstance(error, (EndpointConnectionError, ConnectTimeoutError))


def kinesis_client(region: str, endpoint_url: str | None = None, max_pool_connections: int = 20) -> Any:
    """A Kinesis client that makes each call once: botocore does not retry.

    Every caller retries in its own loop with `libs.backoff` (put_records, the
    RecordBatcher until its deadline, the consumer from its checkpoint, wait_for_kinesis,
    ensure_stream), so botocore's retries would only multiply the attempts and stretch
    the deadlines those loops keep.
    """
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_KINESIS")
    kwargs: dict[str, Any] = {}
    if endpoint and not (os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")):
        # A local emulator accepts any credentials; don't make users invent some.
        kwargs.update(aws_access_key_id="local", aws_secret_access_key="local")
    config = Config(
        # botocore counts `max_attempts` as retries; total_max_attempts=1 is the one call.
        retries={"total_max_attempts": 1, "mode": "standard"},
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
            code = error.response["Error"]["Code"]
            if code in _TRANSIENT_ERRORS:
                status = "UNKNOWN"  # throttled: ask again at the next poll
            elif code != "ResourceNotFoundException":
                raise
            else:
                status = _create_stream(client, name, shard_count)
        except BotoCoreError:
            status = "UNKNOWN"  # the endpoint did not answer: ask again until the deadline
        if status in ("ACTIVE", "UPDATING"):
            return
        if time.monotonic() > deadline:
            raise KinesisUnavailable(f"stream {name} not active after {timeout}s")
        time.sleep(0.2)


_TRANSIENT_ERRORS = frozenset(
    {"LimitExceededException", "ThrottlingException", "ProvisionedThroughputExceededException",
     "InternalFailure", "ServiceUnavailable"}
)


def _create_stream(client: Any, name: str, shard_count: int) -> str:
    try:
        client.create_stream(StreamName=name, ShardCount=shard_count)
        log.info("created stream", extra={"stream": name, "shards": shard_count})
    except ClientError as error:
        if error.response["Error"]["Code"] not in ("ResourceInUseException", *_TRANSIENT_ERRORS):
            raise
    return "CREATING"


def wait_for_kinesis(client: Any, timeout: float = DEPENDENCY_WAIT_SECONDS) -> None:
    """Waits (with backoff) until Kinesis answers ListStreams: a service started while
    Kinesis is down stays NOT_SERVING and waits, exactly as for its database
    (libs.db.wait_for_database: the same backoff, deadline and log line per retry)."""
    try:
        DEPENDENCY_WAIT_BACKOFF.retrying(
            retry=retry_if_exception_type((BotoCoreError, ClientError)), deadline_seconds=timeout,
            log=log, message="Kinesis not reachable; retrying",
        )(client.list_streams, Limit=1)
    except (BotoCoreError, ClientError) as error:
        raise KinesisUnavailable(f"Kinesis not reachable: {error}") from error


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

    def put_pending(pending: list[int]) -> list[int]:
        """One PutRecords of the pending indexes; leaves in `pending` those Kinesis rejected."""
        try:
            sequence_numbers = put_records_once(client, stream, [records[i] for i in pending])
        except (BotoCoreError, ClientError) as error:
            log.warning("PutRecords failed", extra={"stream": stream, "error": str(error)})
            return pending
        for index, sequence_number in zip(pending, sequence_numbers):
            results[index] = sequence_number
        pending[:] = [index for index, sequence_number in zip(pending, sequence_numbers) if sequence_number is None]
        return pending

    # Out of attempts, the records still pending keep None in `results`: no exception.
    retrying = PUT_RECORDS_BACKOFF.retrying(
        retry=retry_if_result(bool), attempts=attempts, retry_error_callback=lambda _state: None
    )
    for start in range(0, len(records), MAX_RECORDS_PER_PUT):
        retrying(put_pending, list(range(start, min(start + MAX_RECORDS_PER_PUT, len(records)))))
    return results


@dataclass(eq=False)
class _Pending:
    record: OutgoingRecord
    future: asyncio.Future[str]
    # Loop time after which no new attempt starts: the caller's deadline, or the batcher's.
    expires: float
    # Seconds the caller allowed, for the retry budget of rejected records.
    budget: float
    attempts: int = 0
    # A PutRecords carrying this record is running now.
    in_flight: bool = False
    # An earlier PutRecords carrying it ended without a clear answer: it may be written.
    maybe_written: bool = False


class RecordBatcher:
    """Gathers concurrent `put` calls into PutRecords batches.

    Up to `max_in_flight` PutRecords calls run at once in worker threads; records that
    arrive meanwhile wait and leave together, so batches grow with the load. Records that
    Kinesis rejects (throttling, internal failure) or whose call failed are retried with
    backoff until the caller's deadline (`put(timeout=)`, else `deadline_seconds`).

    Every answer is true: a future fails with KinesisUnavailable only when its record was
    certainly not written (never sent, rejected, no connection), and with
    KinesisOutcomeUnknown when an attempt may have written it (a read timeout). A record
    in a PutRecords in flight is never given up while that call runs: the call's answer
    decides. Records whose future is already done (a caller that gave up) are not sent.

    As a backstop (a call that hangs past botocore's timeouts), one sweep per second
    settles the records past their deadline: those waiting for a batch or a retry at once,
    those in flight `IN_FLIGHT_GRACE_SECONDS` later (as unknown). One timer for the
    batcher, not one per call.
    """

    # botocore's connect (2 s) and read (10 s) timeouts, and a margin.
    IN_FLIGHT_GRACE_SECONDS = 17.0

    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        max_wait_seconds: float = 0.002,
        max_in_flight: int = 1,
        deadline_seconds: float = 10.0,
        sweep_seconds: float = 1.0,
    ) -> None:
        self._client = client
        self._stream = stream
        self._max_wait = max_wait_seconds
        self._deadline = deadline_seconds
        self._sweep_seconds = sweep_seconds
        self._ready: collections.deque[_Pending] = collections.deque()  # waiting for a batch
        self._outstanding: list[_Pending] = []  # not settled yet, for the sweep
        self._wake: asyncio.Future[None] | None = None
        self._slots = asyncio.Semaphore(max_in_flight)
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=f"put-{stream}")
        self._tasks: list[asyncio.Task[None]] = []
        self._in_flight: set[asyncio.Task[None]] = set()
        self._retrying = 0
        # PutRecords calls made and records they carried (their ratio: the batch size).
        self.batches_sent = 0
        self.records_sent = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._run()), self._loop.create_task(self._sweep_forever())]

    async def close(self) -> None:
        while self._ready or self._in_flight or self._retrying:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        self._executor.shutdown(wait=True)

    def put(self, data: bytes, partition_key: str, timeout: float | None = None) -> asyncio.Future[str]:
        """Queues one record; the returned future gets its sequence number (await it).

        `timeout`: seconds the caller waits (its gRPC deadline); no attempt starts after
        it. Without one, the batcher's `deadline_seconds`."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        budget = self._deadline if timeout is None else max(timeout, 0.0)
        pending = _Pending(OutgoingRecord(partition_key, data), future, loop.time() + budget, budget)
        self._ready.append(pending)
        self._outstanding.append(pending)
        self._wake_up()
        return future

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._ready:
                self._wake = loop.create_future()
                await self._wake
            # Group commit: while every slot is busy, new records pile up and leave
            # together in the next call, so batches grow with the load by themselves.
            await self._slots.acquire()
            if self._max_wait and len(self._ready) < MAX_RECORDS_PER_PUT:
                await asyncio.sleep(self._max_wait)
            batch: list[_Pending] = []
            while self._ready and len(batch) < MAX_RECORDS_PER_PUT:
                pending = self._ready.popleft()
                if not pending.future.done():  # settled while waiting (given up, caller gone): never sent
                    pending.in_flight = True
                    batch.append(pending)
            if not batch:
                self._slots.release()
                continue
            self.batches_sent += 1
            self.records_sent += len(batch)
            task = loop.create_task(self._send(batch))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        sequence_numbers: list[str | None] = [None] * len(batch)
        not_written = True  # per-record rejections are certain; a failed call may not be
        try:
            sequence_numbers = await loop.run_in_executor(
                self._executor, put_records_once, self._client, self._stream, [p.record for p in batch]
            )
        except (BotoCoreError, ClientError) as error:
            not_written = certainly_not_written(error)
            log.warning("PutRecords failed", extra={"stream": self._stream, "error": str(error),
                                                    "outcome": "not written" if not_written else "unknown"})
        except Exception:  # an unexpected answer: its records are retried, their outcome unknown
            not_written = False
            log.exception("PutRecords failed unexpectedly", extra={"stream": self._stream})
        finally:
            self._slots.release()
        for pending, sequence_number in zip(batch, sequence_numbers):
            pending.in_flight = False
            if pending.future.done():
                continue
            if sequence_number is not None:
                pending.future.set_result(sequence_number)
                continue
            pending.maybe_written = pending.maybe_written or not not_written
            pending.attempts += 1
            delay = BATCHED_RECORD_BACKOFF.delay(pending.attempts)
            if pending.attempts * 0.05 > pending.budget or pending.attempts > 12:  # the sweep ends it at `expires`
                self._give_up(pending, "did not accept the record")
            else:
                self._retrying += 1
                loop.call_later(delay, self._retry, pending)

    def _give_up(self, pending: _Pending, why: str) -> None:
        if pending.maybe_written:
            pending.future.set_exception(KinesisOutcomeUnknown(
                f"stream {self._stream} {why}; an earlier attempt may have written it"))
        else:
            pending.future.set_exception(KinesisUnavailable(f"stream {self._stream} {why}"))

    def _retry(self, pending: _Pending) -> None:
        self._retrying -= 1
        if not pending.future.done():
            self._ready.append(pending)
            self._wake_up()

    def _sweep(self, now: float) -> None:
        still: list[_Pending] = []
        for pending in self._outstanding:
            if pending.future.done():
                continue
            if not pending.in_flight and pending.expires <= now:
                self._give_up(pending, "was not reached before the deadline")
            elif pending.in_flight and pending.expires + self.IN_FLIGHT_GRACE_SECONDS <= now:
                pending.maybe_written = True
                self._give_up(pending, f"did not answer within {self.IN_FLIGHT_GRACE_SECONDS:.0f}s of the deadline")
            else:
                still.append(pending)
        self._outstanding = still

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._sweep_seconds)
            self._sweep(loop.time())
