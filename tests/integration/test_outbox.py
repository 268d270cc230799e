"""The outbox relay: no transaction across the Kinesis call, claims shared by concurrent relays."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError
from sqlalchemy import select

from libs import outbox as outbox_lib
from libs.db import ensure_schema, make_engine
from libs.outbox import OutboxRelay, enqueue, outbox


class FakeKinesis:
    """Accepts PutRecords, keeping what it got; `hold` makes each call wait for `release`."""

    def __init__(self, *, fail: bool = False, hold: bool = False) -> None:
        self.fail = fail
        self.hold = hold
        self.entered = threading.Event()
        self.release = threading.Event()
        self.received: list[bytes] = []
        self.calls = 0

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        self.calls += 1
        self.entered.set()
        if self.hold:
            assert self.release.wait(20), "test never released the publish"
        if self.fail:
            raise EndpointConnectionError(endpoint_url="http://kinesis.invalid")
        self.received.extend(r["Data"] for r in Records)
        return {"FailedRecordCount": 0,
                "Records": [{"SequenceNumber": str(n), "ShardId": "shardId-0"} for n, _ in enumerate(Records)]}


@pytest.fixture
def engine(database_url: str) -> Any:
    engine = make_engine(database_url)
    ensure_schema(engine, outbox_lib.metadata)
    yield engine
    engine.dispose()


def add(engine: Any, *payloads: bytes) -> None:
    with engine.begin() as conn:
        enqueue(conn, [("enrollment-events", "course-1", payload) for payload in payloads])


def pending(engine: Any) -> list[tuple[bytes, float | None]]:
    with engine.connect() as conn:
        return [(row.data, row.claimed_until)
                for row in conn.execute(select(outbox.c.data, outbox.c.claimed_until).order_by(outbox.c.id))]


def in_background(target: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)
    thread.start()
    return thread, result


def test_a_failing_publish_holds_no_transaction_and_leaves_its_rows_pending(engine: Any) -> None:
    add(engine, b"e1", b"e2", b"e3")
    kinesis = FakeKinesis(fail=True, hold=True)
    relay = OutboxRelay(engine, kinesis)
    publishing, result = in_background(relay.publish_once)
    assert kinesis.entered.wait(10)

    # While Kinesis is being called the relay holds no connection, so no transaction:
    # on SQLite another writer gets the write lock and commits at once.
    assert engine.pool.checkedout() == 0
    writer, _ = in_background(lambda: add(engine, b"e4"))
    writer.join(5)
    assert not writer.is_alive(), "a writer waited for the relay's transaction"

    kinesis.release.set()
    publishing.join(10)
    assert result == [0]
    assert kinesis.calls == 3, "put_records retried within the pass"
    assert pending(engine) == [(b"e1", None), (b"e2", None), (b"e3", None), (b"e4", None)]

    working = FakeKinesis()
    assert OutboxRelay(engine, working).publish_once() == 4
    assert working.received == [b"e1", b"e2", b"e3", b"e4"]
    assert pending(engine) == []


def test_concurrent_relays_publish_disjoint_rows(engine: Any) -> None:
    add(engine, b"a1", b"a2")
    slow = FakeKinesis(hold=True)
    first = OutboxRelay(engine, slow)
    publishing, result = in_background(first.publish_once)
    assert slow.entered.wait(10)

    add(engine, b"b1")
    quick = FakeKinesis()
    second = OutboxRelay(engine, quick)
    assert second.publish_once() == 1
    assert quick.received == [b"b1"], "the rows another relay is publishing are left to it"
    assert second.publish_once() == 0

    slow.release.set()
    publishing.join(10)
    assert result == [2]
    assert slow.received == [b"a1", b"a2"]
    assert pending(engine) == []


def test_rows_of_a_relay_that_died_after_claiming_are_published_once_its_claim_lapses(engine: Any) -> None:
    add(engine, b"c1", b"c2")
    crashed = OutboxRelay(engine, FakeKinesis(), claim_seconds=0.5)
    assert len(crashed._claim()) == 2  # and then the process died
    survivor_kinesis = FakeKinesis()
    survivor = OutboxRelay(engine, survivor_kinesis)
    assert survivor.publish_once() == 0
    time.sleep(0.6)
    assert survivor.publish_once() == 2
    assert survivor_kinesis.received == [b"c1", b"c2"]


def test_a_crash_between_publish_and_delete_only_publishes_again(
    engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(engine, b"d1")
    first_kinesis = FakeKinesis()
    crashed = OutboxRelay(engine, first_kinesis, claim_seconds=0.3)

    def die(published: list[int], claimed: list[int]) -> None:
        raise ConnectionError("database went away before the delete")

    monkeypatch.setattr(crashed, "_settle", die)
    with pytest.raises(ConnectionError):
        crashed.publish_once()
    assert first_kinesis.received == [b"d1"]
    assert [data for data, _ in pending(engine)] == [b"d1"]

    time.sleep(0.4)
    again = FakeKinesis()
    assert OutboxRelay(engine, again).publish_once() == 1
    assert again.received == [b"d1"], "published a second time, identical: consumers absorb it"
    assert pending(engine) == []


def test_catalogue_writes_go_on_on_sqlite_while_a_paused_kinesis_holds_the_relay(tmp_path: Any,
                                                                                 monkeypatch: Any) -> None:
    """Issue 10 item 7, with the real parts: kinesalite paused (SIGSTOP) while the relay
    publishes a pending event. The relay committed its claim before calling Kinesis, so
    the SQLite write lock is free and catalogue writes answer at once."""
    import grpc

    from coursesignup.enrollment.v1 import enrollment_pb2 as pb
    from coursesignup.enrollment.v1 import enrollment_pb2_grpc
    from libs.config import CommonSettings
    from libs.kinesis import kinesis_client
    from tests import helpers

    with helpers.kinesalite_process() as (url, kinesalite):
        monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", url)
        monkeypatch.setenv("KINESIS_STREAM_PREFIX", "paused-")
        database = f"sqlite:///{tmp_path / 'enrollment.db'}"
        with helpers.serve_enrollment(database) as target, grpc.insecure_channel(target) as channel:
            stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
            stub.CreateCampus(pb.CreateCampusRequest(campus=pb.Campus(campus_id="k", name="Kinesis paused")),
                metadata=helpers.ADMIN_METADATA)
            engine = make_engine(database)
            kinesalite.send_signal(signal.SIGSTOP)
            try:
                with engine.begin() as conn:
                    enqueue(conn, [("paused-enrollment-events", "k1", b"an event waiting to be published")])

                def claimed() -> bool:  # the relay took the row and is now waiting on Kinesis
                    with engine.connect() as conn:
                        return conn.execute(select(outbox.c.claimed_until)).scalar() is not None
                helpers.wait_until(claimed, timeout=30, what="the relay to claim the row")
                for i in range(5):  # each within its deadline: no write waits on the relay
                    stub.CreateCourse(pb.CreateCourseRequest(course=pb.Course(
                        course_id=f"k{i}", campus_id="k", name=f"Course {i}", capacity=10)), timeout=10,
                            metadata=helpers.ADMIN_METADATA)
                    stub.UpdateCourse(pb.UpdateCourseRequest(course=pb.Course(course_id=f"k{i}", capacity=20),
                                                             update_mask=["capacity"]), timeout=10,
                                                                 metadata=helpers.ADMIN_METADATA)
                stub.CreateCampus(pb.CreateCampusRequest(campus=pb.Campus(campus_id="k2", name="Second")),
                                  timeout=10, metadata=helpers.ADMIN_METADATA)
            finally:
                kinesalite.send_signal(signal.SIGCONT)

            def published() -> bool:
                with engine.connect() as conn:
                    return conn.execute(select(outbox.c.id)).first() is None
            helpers.wait_until(published, timeout=60, what="the row published once Kinesis is back")
            settings = CommonSettings()
            client = kinesis_client(settings.aws_region)
            shards = client.list_shards(StreamName="paused-enrollment-events")["Shards"]
            data = []
            for shard in shards:
                iterator = client.get_shard_iterator(StreamName="paused-enrollment-events", ShardId=shard["ShardId"],
                                                     ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
                data += [r["Data"] for r in client.get_records(ShardIterator=iterator)["Records"]]
            assert data == [b"an event waiting to be published"]
            assert stub.GetCourse(pb.GetCourseRequest(course_id="k4")).capacity == 20
            engine.dispose()
