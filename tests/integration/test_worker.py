"""The service runtime (libs.worker): dispatch of decoded batches, and the readiness gate."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy import select

from coursesignup.enrollment.v1 import enrollment_pb2
from coursesignup.events.v1 import events_pb2
from coursesignup.notifier.v1 import notifier_pb2
from coursesignup.registration.v1 import registration_pb2
from coursesignup.stats.v1 import stats_pb2
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.envelope import MalformedRecord, decode_envelope, new_envelope
from libs.worker import Consume, Event, Handle, Message, dispatch
from tests import helpers


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    consumer_lib.metadata.create_all(engine)
    outbox_lib.metadata.create_all(engine)
    yield engine
    engine.dispose()


def _record(sequence: int, data: bytes) -> StreamRecord:
    return StreamRecord("commands", "shard-0", str(sequence), "key", data, dt.datetime.now(dt.UTC))


def _register(registration_id: str, course_id: str = "c1") -> bytes:
    body = events_pb2.RegisterStudent(registration_id=registration_id, course_id=course_id)
    return new_envelope(registration_id, register_student=body).SerializeToString()


def _enrolled(registration_id: str) -> bytes:
    body = events_pb2.StudentEnrolled(registration_id=registration_id, course_id="c1")
    return new_envelope(registration_id, student_enrolled=body).SerializeToString()


def _declined(registration_id: str) -> bytes:
    body = events_pb2.RegistrationDeclined(registration_id=registration_id, course_id="c1")
    return new_envelope(registration_id, registration_declined=body).SerializeToString()


def test_runs_keep_stream_order_across_types_and_what_cannot_be_handled_is_dead_lettered(engine):
    calls: list[tuple[str, list[str]]] = []

    def handler(name):
        def handle(conn, messages: list[Message]):
            calls.append((name, [m.body.registration_id for m in messages]))
        return handle

    def must_have_course(envelope):
        if not envelope.register_student.course_id:
            raise MalformedRecord("RegisterStudent without course_id")
        return envelope.register_student

    handlers = {"register_student": Handle(handler("register"), must_have_course),
                "student_enrolled": Handle(handler("enrolled"))}
    payloads = [_register("r1"), _register("r2"), _enrolled("e1"), _register("r3"),
                b"\xff not an envelope", _register("r4", course_id=""), _enrolled("e2"), _declined("d1")]
    with engine.begin() as conn:
        dispatch(conn, [_record(i, data) for i, data in enumerate(payloads)], Consume("commands", handlers),
                 publish=False)
    assert calls == [("register", ["r1", "r2"]), ("enrolled", ["e1"]), ("register", ["r3"]),
                     ("enrolled", ["e2"])]
    with engine.connect() as conn:
        reasons = dict(conn.execute(select(consumer_lib.dead_letters.c.sequence_number,
                                           consumer_lib.dead_letters.c.reason)).all())
    assert set(reasons) == {"4", "5", "7"}
    assert "not an Envelope" in reasons["4"]
    assert reasons["5"] == "RegisterStudent without course_id"
    assert reasons["7"] == "a registration_declined message does not belong on the commands stream"

    # Declared as ignored, the same message is skipped: no dead letter, and the run around it stays one.
    calls.clear()
    with engine.begin() as conn:
        dispatch(conn, [_record(10, _register("r5")), _record(11, _declined("d2")), _record(12, _register("r6"))],
                 Consume("commands", handlers, ignore=frozenset({"registration_declined"})), publish=False)
    assert calls == [("register", ["r5", "r6"])]
    with engine.connect() as conn:
        assert len(conn.execute(select(consumer_lib.dead_letters)).all()) == 3


def test_one_handler_for_two_types_gets_one_run_and_its_events_go_to_the_outbox(engine):
    seen: list[list[str]] = []

    def handle(conn, messages):
        seen.append([m.envelope.WhichOneof("body") for m in messages])
        return [Event("decisions", "c1", new_envelope(m.envelope.correlation_id,
                                                      student_enrolled=events_pb2.StudentEnrolled(
                                                          registration_id=m.envelope.correlation_id)))
                for m in messages]

    consume = Consume("events", {"student_enrolled": Handle(handle), "registration_declined": Handle(handle)})
    with engine.begin() as conn:
        dispatch(conn, [_record(0, _enrolled("a")), _record(1, _declined("b")), _record(2, _enrolled("c"))],
                 consume, lambda base: f"prefix-{base}")
    assert seen == [["student_enrolled", "registration_declined", "student_enrolled"]]
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_lib.outbox.c.stream_name, outbox_lib.outbox.c.data)
                            .order_by(outbox_lib.outbox.c.id)).all()
    assert [(row.stream_name, decode_envelope(row.data).correlation_id) for row in rows] == [
        ("prefix-decisions", "a"), ("prefix-decisions", "b"), ("prefix-decisions", "c")]


def test_events_from_a_service_that_publishes_nothing_fail_the_batch(engine):
    consume = Consume("events", {"student_enrolled": Handle(
        lambda conn, messages: [Event("x", "k", messages[0].envelope)])})
    with pytest.raises(RuntimeError, match="publishes none"), engine.begin() as conn:
        dispatch(conn, [_record(0, _enrolled("a"))], consume, publish=False)


SERVICES = {
    "registration": (registration_pb2, "RegistrationService"),
    "enrollment": (enrollment_pb2, "EnrollmentService"),
    "stats": (stats_pb2, "StatsService"),
    "notifier": (notifier_pb2, "NotifierService"),
}


@pytest.mark.parametrize("name", list(SERVICES))
def test_until_started_every_method_answers_unavailable_while_health_and_reflection_answer(name, tmp_path):
    """Kinesis never answers, so start-up never ends: the gate must refuse every method."""
    module, service_name = SERVICES[name]
    port = helpers.free_port()
    env = {**os.environ, f"{name.upper()}_PORT": str(port),
           "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{helpers.free_port()}",
           f"{name.upper()}_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "ENROLLMENT_TARGET": f"127.0.0.1:{helpers.free_port()}"}
    process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=helpers.ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        helpers.wait_for_port(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            descriptor = module.DESCRIPTOR.services_by_name[service_name]
            for method in descriptor.methods:
                path = f"/{descriptor.full_name}/{method.name}"
                if method.server_streaming:
                    call = channel.unary_stream(path, request_serializer=bytes, response_deserializer=bytes)
                    with pytest.raises(grpc.RpcError) as raised:
                        list(call(b"", timeout=10))
                else:
                    call = channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
                    with pytest.raises(grpc.RpcError) as raised:
                        call(b"", timeout=10)
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, path
                assert f"the {name} service is starting" in raised.value.details(), path
                if not method.server_streaming:  # (a stream's trailers carry them too; one kind suffices)
                    details = rpc_status.from_call(raised.value).details
                    retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
                    assert any(d.Unpack(retry) for d in details) and retry.retry_delay.ToMilliseconds() > 0
                    assert any(d.Unpack(info) for d in details) and info.reason == "SERVICE_STARTING"
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", descriptor.full_name):
                assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status \
                    == health_pb2.HealthCheckResponse.NOT_SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            answer = next(reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert descriptor.full_name in {s.name for s in answer.list_services_response.service}
        # SIGTERM stops it at once although its start-up is still waiting for Kinesis.
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
