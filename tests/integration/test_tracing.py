"""Traces in one process (libs.tracing), with the SDK's in-memory exporter: the server span
continues the caller's traceparent, envelopes carry the current span, the runtime's consumer
spans are children of the envelope's context and pass theirs on to the events a handler
returns; with no OTLP endpoint configured nothing is set up and no exporter is made. The
chain across the four services as processes is tests/e2e/test_tracing_mesh.py."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import types
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.exporter.otlp.proto.grpc import trace_exporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from coursesignup.events.v1 import events_pb2
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs import tracing
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.envelope import decode_envelope, new_envelope
from libs.errors import NotFound
from libs.grpc_server import ErrorInterceptor
from libs.worker import Consume, Event, Handle, Message, dispatch
from tests import helpers

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
SERVICE = "test.tracing.v1.Probe"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "under-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _traceparent_span_id(carrier: dict[str, str] | object) -> int:
    traceparent = dict(carrier)["traceparent"]  # type: ignore[call-overload]
    return int(traceparent.split("-")[2], 16)


async def _call_probe(methods: dict[str, object], calls: list[tuple[str, tuple[tuple[str, str], ...]]]) -> list:
    """Serves `methods` of the probe service behind the bootstrap's interceptor; makes `calls`."""
    interceptor = ErrorInterceptor("probe")
    interceptor.ready = True
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(handler) for name, handler in methods.items()})])
    from grpc_health.v1 import health, health_pb2_grpc
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    answers: list = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method, metadata in calls:
                if method == "health":
                    check = channel.unary_unary("/grpc.health.v1.Health/Check",
                                                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                                response_deserializer=health_pb2.HealthCheckResponse.FromString)
                    answers.append(await check(health_pb2.HealthCheckRequest(), timeout=10))
                    continue
                try:
                    answers.append(await channel.unary_unary(f"/{SERVICE}/{method}")(b"", metadata=metadata,
                                                                                        timeout=10))
                except grpc.aio.AioRpcError as error:
                    answers.append(error.code())
    finally:
        await server.stop(None)
    return answers


def test_the_server_span_continues_the_callers_traceparent_and_envelopes_carry_it(spans):
    async def register(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        body = events_pb2.RegisterStudent(registration_id="reg-1", email="ana@example.com", name="Ana")
        return new_envelope("reg-1", register_student=body).SerializeToString()

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise NotFound("no such thing for ana@example.com")

    async def broken(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("bug with ana@example.com inside")

    answers = asyncio.run(_call_probe({"Register": register, "Missing": missing, "Broken": broken}, [
        ("Register", (("traceparent", TRACEPARENT),)), ("Register", ()), ("Missing", ()), ("Broken", ()),
        ("health", ())]))
    assert answers[2:4] == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL]

    finished = spans.get_finished_spans()
    assert [span.name for span in finished] == [f"{SERVICE}/{name}" for name in
                                                ("Register", "Register", "Missing", "Broken")], \
        "one server span per call, health is not traced"
    continued, fresh, not_found, internal = finished
    assert continued.kind is SpanKind.SERVER
    assert continued.context.trace_id == TRACE_ID
    assert continued.parent is not None and continued.parent.span_id == CALLER_SPAN_ID
    assert continued.parent.is_remote
    assert continued.attributes["rpc.method"] == "Register"
    assert continued.attributes["rpc.grpc.status_code"] == 0
    assert fresh.parent is None and fresh.context.trace_id != TRACE_ID, "without traceparent: a new trace"

    envelope = decode_envelope(answers[0])
    assert _traceparent_span_id(envelope.trace_context) == continued.context.span_id
    assert decode_envelope(answers[1]).trace_context["traceparent"].split("-")[1] == f"{fresh.context.trace_id:032x}"

    assert not_found.status.status_code is StatusCode.UNSET, "NOT_FOUND is an answer, not a server error"
    assert not_found.attributes["rpc.grpc.status_code"] == 5
    assert internal.status.status_code is StatusCode.ERROR
    assert internal.attributes["rpc.grpc.status_code"] == 13
    for span in finished:  # no personal data, no error message
        assert "ana" not in repr(dict(span.attributes or {})) + repr(span.events) + (span.status.description or "")


def _record(sequence: int, data: bytes) -> StreamRecord:
    return StreamRecord("registrations", "shard-7", str(sequence), "c1", data, dt.datetime.now(dt.UTC))


def _register_envelope(registration_id: str, traceparent: str | None) -> bytes:
    envelope = new_envelope(registration_id,
                            register_student=events_pb2.RegisterStudent(registration_id=registration_id,
                                                                        course_id="c1"))
    if traceparent:
        envelope.trace_context["traceparent"] = traceparent
    return envelope.SerializeToString()


def test_each_record_gets_a_consumer_span_under_its_envelope_context_and_its_events_carry_that_span(spans,
                                                                                                     tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'worker.db'}")
    consumer_lib.metadata.create_all(engine)
    outbox_lib.metadata.create_all(engine)
    seen: list[Message[events_pb2.RegisterStudent]] = []

    def decide(conn, messages: list[Message[events_pb2.RegisterStudent]]) -> list[Event]:
        seen.extend(messages)
        return [Event("enrollment-events", "c1", new_envelope(m.body.registration_id,
                                                             student_enrolled=events_pb2.StudentEnrolled(
                                                                 registration_id=m.body.registration_id)))
                for m in reversed(messages)]  # in another order: matched by correlation id

    other_trace = f"00-{TRACE_ID + 1:032x}-{CALLER_SPAN_ID + 1:016x}-01"
    records = [_record(1, _register_envelope("reg-a", TRACEPARENT)),
               _record(2, _register_envelope("reg-b", other_trace)),
               _record(3, _register_envelope("reg-c", None))]
    try:
        with engine.begin() as conn:
            dispatch(conn, records, Consume("registrations", {"register_student": Handle(decide)}),
                     lambda base: f"prefix-{base}")
        with engine.connect() as conn:
            published = [decode_envelope(row.data) for row in conn.execute(outbox_lib.outbox.select())]
    finally:
        engine.dispose()

    finished = {span.attributes["messaging.message.id"]: span for span in spans.get_finished_spans()}
    a, b, c = (finished[f"register_student:reg-{x}"] for x in "abc")
    assert a.kind is SpanKind.CONSUMER and a.name == "process registrations"
    assert a.context.trace_id == TRACE_ID and a.parent is not None and a.parent.span_id == CALLER_SPAN_ID
    assert b.context.trace_id == TRACE_ID + 1 and b.parent is not None and b.parent.span_id == CALLER_SPAN_ID + 1
    assert c.parent is None, "a record without trace context starts a trace"
    assert a.attributes["messaging.destination.name"] == "prefix-registrations"
    assert a.attributes["messaging.destination.partition.id"] == "shard-7"
    assert a.attributes["coursesignup.handler"] == "decide"

    assert [_traceparent_span_id(m.trace_context) for m in seen] == [s.context.span_id for s in (a, b, c)]
    by_registration = {event.correlation_id: event for event in published}
    for registration_id, span in (("reg-a", a), ("reg-b", b), ("reg-c", c)):
        assert _traceparent_span_id(by_registration[registration_id].trace_context) == span.context.span_id, \
            "the stored event carries the span of the record that caused it"


def test_a_failing_handler_marks_its_records_spans_failed(spans, tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'worker.db'}")
    consumer_lib.metadata.create_all(engine)

    def fail(conn, messages):
        raise RuntimeError("database gone")

    try:
        with pytest.raises(RuntimeError), engine.begin() as conn:
            dispatch(conn, [_record(1, _register_envelope("reg-a", TRACEPARENT))],
                     Consume("registrations", {"register_student": Handle(fail)}), publish=False)
    finally:
        engine.dispose()
    (span,) = spans.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "RuntimeError"


def test_without_an_otlp_endpoint_no_tracing_is_set_up_and_no_exporter_is_made(monkeypatch):
    made: list[object] = []

    class CountingExporter(trace_exporter.OTLPSpanExporter):
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trace_exporter, "OTLPSpanExporter", CountingExporter)
    for variable in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                     "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(variable, raising=False)
    assert not tracing.enabled()
    assert tracing.setup("enrollment") is False
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.setup("enrollment") is False
    assert not tracing.enabled() and made == []
    envelope = new_envelope("reg-1", register_student=events_pb2.RegisterStudent(registration_id="reg-1"))
    assert len(envelope.trace_context) == 0
    assert tracing.start_span("anything", {"traceparent": TRACEPARENT}, SpanKind.INTERNAL) is None

    # The same call with an endpoint does make one (the test of the test).
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    try:
        assert tracing.setup("enrollment")
        assert tracing.enabled() and len(made) == 1
        span = tracing.start_span("probe", None, SpanKind.INTERNAL)
        assert isinstance(span, ReadableSpan) and span.resource.attributes["service.name"] == "enrollment"
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


def test_a_stopping_process_waits_a_bounded_time_for_an_unreachable_collector(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{helpers.free_port()}")  # nobody there
    assert tracing.setup("enrollment")
    for _ in range(3):
        span = tracing.start_span("probe", None, SpanKind.INTERNAL)
        assert span is not None
        span.end()
    stopping = threading.Thread(target=tracing.shutdown, args=(0.5,))
    stopping.start()
    stopping.join(30)  # the exporter alone would retry for up to 10 s (OTEL_EXPORTER_OTLP_TIMEOUT)
    assert not stopping.is_alive() and not tracing.enabled()


def test_the_services_own_calls_carry_the_trace_so_the_called_servers_span_is_a_child(spans):
    from libs import grpc_client

    settings = types.SimpleNamespace(tls_ca_file="", tls_cert_file="", tls_key_file="")
    target: list[str] = []

    async def inner(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"inner"

    async def outer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        async with grpc_client.aio_channel(target[0], settings) as channel:  # type: ignore[arg-type]
            return await channel.unary_unary(f"/{SERVICE}/Inner")(b"", timeout=10)

    async def scenario() -> list:
        interceptor = ErrorInterceptor("probe")
        interceptor.ready = True
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Outer": grpc.unary_unary_rpc_method_handler(outer),
            "Inner": grpc.unary_unary_rpc_method_handler(inner)})])
        target.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(target[0]) as channel:
                return [await channel.unary_unary(f"/{SERVICE}/Outer")(b"", metadata=(("traceparent", TRACEPARENT),),
                                                                       timeout=10)]
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == [b"inner"]
    by_name = {span.name: span for span in spans.get_finished_spans()}
    outer_span, inner_span = by_name[f"{SERVICE}/Outer"], by_name[f"{SERVICE}/Inner"]
    assert outer_span.parent is not None and outer_span.parent.span_id == CALLER_SPAN_ID
    assert inner_span.context.trace_id == TRACE_ID
    assert inner_span.parent is not None and inner_span.parent.span_id == outer_span.context.span_id


def test_a_server_streaming_call_gets_one_span_ending_with_its_status(spans):
    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        for part in (b"a", b"b", b"c"):
            yield part

    async def scenario() -> list[bytes]:
        interceptor = ErrorInterceptor("probe")
        interceptor.ready = True
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Stream": grpc.unary_stream_rpc_method_handler(stream)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=(("traceparent", TRACEPARENT),),
                                                                  timeout=10)
                return [part async for part in call]
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == [b"a", b"b", b"c"]
    (span,) = spans.get_finished_spans()
    assert span.name == f"{SERVICE}/Stream" and span.kind is SpanKind.SERVER
    assert span.parent is not None and span.parent.span_id == CALLER_SPAN_ID
    assert span.attributes["rpc.grpc.status_code"] == 0
    assert span.status.status_code is StatusCode.UNSET
