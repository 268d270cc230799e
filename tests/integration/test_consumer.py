"""The shared Kinesis consumer against real kinesalite and both databases."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

from sqlalchemy import Column, Connection, MetaData, String, Table, func, insert, select

from coursesignup.events.v1 import events_pb2
from libs import consumer as consumer_lib
from libs.config import CommonSettings
from libs.db import make_engine
from libs.envelope import decode_envelope, new_envelope
from libs.kinesis import OutgoingRecord, ensure_stream, kinesis_client, put_records
from tests.helpers import partition_key_per_shard, wait_until

seen_metadata = MetaData()
seen = Table("seen", seen_metadata, Column("message_id", String(64), primary_key=True),
             Column("course_id", String(64), nullable=False))


def _envelope_bytes(course_id: str) -> bytes:
    command = events_pb2.RegisterStudent(registration_id=str(uuid.uuid4()), course_id=course_id)
    return new_envelope(command.registration_id, register_student=command).SerializeToString()


def test_every_record_is_applied_once_and_poison_goes_to_dead_letters(kinesis_env, database_url):
    settings = CommonSettings()
    client = kinesis_client(settings.aws_region)
    stream = settings.stream_name("consumer-test")
    ensure_stream(client, stream, 3)
    engine = make_engine(database_url)
    seen_metadata.create_all(engine)

    def handle(conn: Connection, records: list[consumer_lib.StreamRecord]) -> None:
        for _record, envelope in consumer_lib.decode_or_dead_letter(conn, records, decode_envelope):
            conn.execute(insert(seen).values(message_id=envelope.message_id,
                                             course_id=envelope.register_student.course_id))

    records = [OutgoingRecord(f"c{i % 7}", _envelope_bytes(f"c{i % 7}")) for i in range(300)]
    records.insert(150, OutgoingRecord("c1", b"\xff\xfenot a protobuf"))
    assert all(put_records(client, stream, records))

    worker = consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream, handler=handle,
                                         lease_seconds=3, batch_size=50)
    worker.start()
    try:
        def count() -> int:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(seen)).scalar_one()
        wait_until(lambda: count() == 300)
        with engine.connect() as conn:
            letters = conn.execute(select(consumer_lib.dead_letters)).all()
        assert len(letters) == 1
        assert letters[0].data == b"\xff\xfenot a protobuf"
        assert len(worker.held_shards()) == 3
    finally:
        worker.stop()
    # The checkpoints committed with the effects: a new worker re-applies nothing. A marker
    # record on each shard, behind the 301: once the new worker has handed every marker to
    # its handler, it has read each shard from its checkpoint onwards, so anything before
    # the checkpoint it were to re-apply would have reached the handler first.
    redelivered: list[consumer_lib.StreamRecord] = []
    second = consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream,
                                         handler=lambda conn, batch: redelivered.extend(batch),
                                         lease_seconds=3, batch_size=50)
    second.start()
    try:
        wait_until(lambda: len(second.held_shards()) == 3)
        keys = partition_key_per_shard(client, stream)
        markers = {shard_id: b"marker " + shard_id.encode() for shard_id in keys}
        assert all(put_records(client, stream, [OutgoingRecord(keys[s], markers[s]) for s in keys]))
        wait_until(lambda: {r.data for r in list(redelivered)} >= set(markers.values()),
                   what="the new worker to read a marker on every shard")
        # Only the markers (a batch retried after a failed commit may hand one over twice).
        assert {(r.shard_id, r.data) for r in redelivered} == set(markers.items())
        assert all(view.checkpoint for view in second.leases())
    finally:
        second.stop()
    engine.dispose()


tally_metadata = MetaData()
tally = Table("tally", tally_metadata, Column("sequence_number", String(64), nullable=False),
              Column("worker", String(64), nullable=False))


class PausableKinesis:
    """The real kinesalite client, except that get_records can hold its result: the
    worker is paused after reading a batch and before committing it."""

    def __init__(self, client):
        self._client = client
        self.armed = threading.Event()
        self.holding = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_records(self, **kwargs):
        response = self._client.get_records(**kwargs)
        if self.armed.is_set() and response["Records"]:
            self.holding.set()
            self.release.wait(30)
        return response


class PausableConsumer(consumer_lib.StreamConsumer):
    paused = False

    def _sync_leases(self) -> None:  # a paused process renews nothing either
        if not self.paused:
            super()._sync_leases()


def test_a_worker_paused_with_a_batch_in_hand_cannot_commit_it_after_a_takeover(kinesis_env, database_url):
    settings = CommonSettings()
    client = kinesis_client(settings.aws_region)
    stream = settings.stream_name("fencing")
    ensure_stream(client, stream, 1)
    engine = make_engine(database_url)
    tally_metadata.create_all(engine)

    def handler_of(worker: str):
        def handle(conn: Connection, records: list[consumer_lib.StreamRecord]) -> None:
            # Deliberately not idempotent: only the fencing token prevents a double count.
            conn.execute(insert(tally), [{"sequence_number": r.sequence_number, "worker": worker} for r in records])
        return handle

    pausable = PausableKinesis(client)
    first = PausableConsumer(engine=engine, kinesis=pausable, stream_name=stream, handler=handler_of("first"),
                             worker_id="first", lease_seconds=1.0)
    first.start()
    wait_until(lambda: first.held_shards())
    pausable.armed.set()
    first.paused = True
    assert all(put_records(client, stream, [OutgoingRecord("k", b"%d" % i) for i in range(10)]))
    assert pausable.holding.wait(15), "the first worker read the batch"

    second = consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream,
                                         handler=handler_of("second"), worker_id="second", lease_seconds=1.0)
    second.start()
    try:
        def counted() -> int:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(tally)).scalar_one()
        wait_until(lambda: counted() == 10)
        pausable.release.set()  # the first worker wakes up and tries to commit its batch
        # Its attempt ends one way or the other, on its own reader: refused, it drops the
        # shard (it renews nothing while paused, so only the refused commit makes it let go);
        # accepted, its ten rows appear. Either is observed before the assertions below.
        wait_until(lambda: not first.held_shards() or counted() > 10,
                   what="the paused worker's commit attempt to be refused or applied")
        with engine.connect() as conn:
            workers = conn.execute(select(tally.c.worker, func.count()).group_by(tally.c.worker)).all()
        assert dict(workers) == {"second": 10}
        assert first.held_shards() == {}
        (lease,) = second.leases()
        assert lease.owner == "second" and lease.lease_counter == 2
    finally:
        pausable.release.set()
        first.stop()
        second.stop()
        engine.dispose()


class FlakyKinesis:
    """The real kinesalite client with injected faults no emulator produces: throttling
    and expired iterators on reads, rejected entries on writes."""

    def __init__(self, client, every: int = 3):
        self._client = client
        self._calls = 0
        self.every = every
        self.injected: Counter[str] = Counter()

    def __getattr__(self, name):
        return getattr(self._client, name)

    def _error(self, code: str, operation: str):
        from botocore.exceptions import ClientError

        self.injected[code] += 1
        return ClientError({"Error": {"Code": code, "Message": "injected"}}, operation)

    def get_records(self, **kwargs):
        self._calls += 1
        if self._calls % self.every == 0:
            raise self._error("ProvisionedThroughputExceededException", "GetRecords")
        if self._calls % (self.every * 2 + 1) == 0:
            raise self._error("ExpiredIteratorException", "GetRecords")
        return self._client.get_records(**kwargs)

    def put_records(self, **kwargs):
        response = self._client.put_records(**kwargs)
        self._calls += 1
        # Pretend Kinesis throttled every third entry of every other call (they were written
        # for real, so a retry duplicates them: consumers must cope, as with real Kinesis).
        if self._calls % 2 == 1:
            for index in range(len(response["Records"])):
                if index % 3 == 0:
                    response["Records"][index] = {"ErrorCode": "ProvisionedThroughputExceededException",
                                                  "ErrorMessage": "injected"}
                    self.injected["put throttled"] += 1
            response["FailedRecordCount"] = sum(1 for e in response["Records"] if "ErrorCode" in e)
        return response


def test_throttling_and_expired_iterators_lose_no_position(kinesis_env, database_url):
    settings = CommonSettings()
    client = kinesis_client(settings.aws_region)
    stream = settings.stream_name("flaky")
    ensure_stream(client, stream, 2)
    engine = make_engine(database_url)
    tally_metadata.create_all(engine)
    flaky = FlakyKinesis(client)
    payloads = [b"%d" % i for i in range(400)]
    assert all(put_records(flaky, stream, [OutgoingRecord(f"k{i % 5}", p) for i, p in enumerate(payloads)]))
    assert flaky.injected["put throttled"] > 0

    def handle(conn: Connection, records: list[consumer_lib.StreamRecord]) -> None:
        conn.execute(insert(tally), [{"sequence_number": r.sequence_number, "worker": r.data.decode()}
                                     for r in records])

    worker = consumer_lib.StreamConsumer(engine=engine, kinesis=flaky, stream_name=stream, handler=handle,
                                         lease_seconds=3, batch_size=25, idle_sleep_seconds=0.05)
    worker.start()
    try:
        def applied() -> list[tuple[str, str]]:
            with engine.connect() as conn:
                return [tuple(r) for r in conn.execute(select(tally.c.sequence_number, tally.c.worker))]
        wait_until(lambda: {w for _, w in applied()} == {p.decode() for p in payloads}, timeout=60)
        # A marker on each shard, behind the 400: once every marker is applied, each shard was
        # read past everything before it, so a record applied twice (a read fault sending the
        # worker back behind its checkpoint) would already be in the table.
        keys = partition_key_per_shard(client, stream)
        markers = {shard_id: f"marker {shard_id}" for shard_id in keys}
        assert all(put_records(client, stream, [OutgoingRecord(keys[s], markers[s].encode()) for s in keys]))
        wait_until(lambda: set(markers.values()) <= {w for _, w in applied()}, what="a marker applied on every shard")
        rows = applied()
        # Each record once (a throttled put that was retried is a second record: it has its own
        # sequence number), and no sequence number applied twice despite the read faults.
        assert len({seq for seq, _ in rows}) == len(rows)
        assert flaky.injected["ProvisionedThroughputExceededException"] > 0
        assert flaky.injected["ExpiredIteratorException"] > 0
    finally:
        worker.stop()
        engine.dispose()


def test_a_new_worker_gets_a_fair_share_within_a_few_lease_periods(kinesis_env, database_url):
    settings = CommonSettings()
    client = kinesis_client(settings.aws_region)
    stream = settings.stream_name("balance")
    ensure_stream(client, stream, 4)
    engine = make_engine(database_url)
    lease_seconds = 1.0

    def make(worker_id: str) -> consumer_lib.StreamConsumer:
        return consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream,
                                           handler=lambda conn, records: None, worker_id=worker_id,
                                           lease_seconds=lease_seconds)

    first = make("first")
    first.start()
    second = make("second")
    try:
        wait_until(lambda: len(first.held_shards()) == 4)
        second.start()
        wait_until(lambda: len(first.held_shards()) == 2 and len(second.held_shards()) == 2, timeout=20)
        owners = Counter(lease.owner for lease in second.leases())
        assert owners == {"first": 2, "second": 2}
    finally:
        second.stop()
        first.stop()
    engine.dispose()


def test_a_batch_longer_than_the_lease_keeps_its_lease_and_commits_once(kinesis_env, database_url):
    """The heartbeat renews the lease while a slow batch runs, so another worker does not
    take the shard over and end the batch (on every attempt, when each takes as long)."""
    settings = CommonSettings()
    client = kinesis_client(settings.aws_region)
    stream = settings.stream_name("slowbatch")
    ensure_stream(client, stream, 1)
    engine = make_engine(database_url)
    tally_metadata.create_all(engine)
    attempts: Counter[str] = Counter()

    def handler_of(worker: str):
        def handle(conn: Connection, records: list[consumer_lib.StreamRecord]) -> None:
            attempts[worker] += 1
            conn.execute(insert(tally), [{"sequence_number": r.sequence_number, "worker": worker} for r in records])
            time.sleep(3.5)  # 3.5 lease periods, holding the batch's transaction open
        return handle

    first = consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream,
                                        handler=handler_of("first"), worker_id="first", lease_seconds=1.0)
    first.start()
    wait_until(lambda: first.held_shards())
    second = consumer_lib.StreamConsumer(engine=engine, kinesis=client, stream_name=stream,
                                         handler=handler_of("second"), worker_id="second", lease_seconds=1.0)
    second.start()
    try:
        assert all(put_records(client, stream, [OutgoingRecord("k", b"%d" % i) for i in range(5)]))

        def counted() -> int:
            with engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(tally)).scalar_one()
        wait_until(lambda: counted() >= 5, 60, "the slow batch committed")
        # A marker batch after it: once it is in, nothing of the first batch is still pending.
        assert all(put_records(client, stream, [OutgoingRecord("k", b"marker")]))
        wait_until(lambda: counted() >= 6, 60, "the marker committed")
        with engine.connect() as conn:
            workers = dict(conn.execute(select(tally.c.worker, func.count()).group_by(tally.c.worker)).all())
        assert workers == {"first": 6}, workers
        assert attempts["second"] == 0 and attempts["first"] == 2, attempts
    finally:
        first.stop()
        second.stop()
        engine.dispose()


def test_batch_tags_of_worker_ids_sharing_a_long_prefix_differ():
    common = "enrollment-6f9c7d8b5-x2kqz.cluster.local.example:" + "7" * 20
    first, second = consumer_lib._batch_tag(common + ":1:ab12"), consumer_lib._batch_tag(common + ":2:ab12")
    assert first != second and not first.startswith(second) and not second.startswith(first)
    assert len(first.encode()) == len(second.encode()) <= 32  # room left in application_name's 63 bytes
