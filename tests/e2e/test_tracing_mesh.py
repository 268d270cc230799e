"""One registration's trace across the four services as separate processes: the test process
runs an OTLP receiver (opentelemetry.proto's TraceService over gRPC) that every service
exports to, calls Register with a `traceparent`, and waits for the spans of the decision,
the statistics projection and both emails, checking each one's parent; then a status
look-up in the same trace, whose call from registration to enrollment carries it."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.type import date_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from tests.helpers import wait_until
from tests.mesh import running_mesh, smtp_server

pytestmark = pytest.mark.e2e

KIND = trace_pb2.Span.SpanKind
EMAIL = "trace.student@example.com"
NAME = "Tracy Tracewell"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span with the service.name of its resource."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, trace_pb2.Span]] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: bytes) -> list[tuple[str, trace_pb2.Span]]:
        with self.lock:
            return [(service, span) for service, span in self.spans if span.trace_id == trace_id]


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, port
    finally:
        server.stop(None)


def _attribute(span: trace_pb2.Span, key: str) -> str:
    return next((a.value.string_value for a in span.attributes if a.key == key), "")


def test_a_registrations_trace_runs_from_register_through_the_streams_to_both_emails(
    tmp_path, kinesis_endpoint, collector
):
    receiver, otlp_port = collector
    trace_id = random.getrandbits(128).to_bytes(16, "big")
    caller_span_id = random.getrandbits(64).to_bytes(8, "big")
    traceparent = f"00-{trace_id.hex()}-{caller_span_id.hex()}-01"
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export within 0.1 s instead of 5 s
    with smtp_server() as (smtp_port, _), \
            running_mesh(tmp_path, kinesis_endpoint, smtp_port,
                         extra_env={"SEED_DEMO_CATALOGUE": "true", **otel}) as mesh, \
            grpc.insecure_channel(mesh.target("registration")) as channel:
        reply = registration_pb2_grpc.RegistrationServiceStub(channel).Register(registration_pb2.RegisterRequest(
            name=NAME, email=EMAIL, course_id="art110", birth_date=date_pb2.Date(year=1990, month=12, day=10)),
            metadata=(("traceparent", traceparent),), timeout=10)

        def complete() -> list[tuple[str, trace_pb2.Span]] | None:
            spans = receiver.of_trace(trace_id)
            emails = [span for service, span in spans if service == "notifier" and span.name == "send email"]
            consumers = {(service, span.name) for service, span in spans if span.kind == KIND.SPAN_KIND_CONSUMER}
            wanted = {("enrollment", "process registrations"), ("stats", "process enrollment-events"),
                      ("notifier", "process registrations"), ("notifier", "process enrollment-events")}
            return spans if len(emails) == 2 and wanted <= consumers else None

        # Proven by the spans arriving, within a bound (the emails go out within seconds).
        spans = wait_until(complete, 45.0, "the registration's spans from all four services", 0.1)

        # A status look-up in the same trace: registration's own call to enrollment carries it.
        lookup_span_id = random.getrandbits(64).to_bytes(8, "big")
        registration_pb2_grpc.RegistrationServiceStub(channel).GetRegistration(
            registration_pb2.GetRegistrationRequest(registration_id=reply.registration_id),
            metadata=(("traceparent", f"00-{trace_id.hex()}-{lookup_span_id.hex()}-01"),), timeout=10)

        def looked_up() -> dict[str, trace_pb2.Span] | None:
            found = {span.name.rpartition("/")[2]: span for _, span in receiver.of_trace(trace_id)
                     if span.name.endswith(("/GetRegistration", "/GetDecision"))}
            return found if len(found) == 2 else None

        lookup = wait_until(looked_up, 30.0, "the spans of GetRegistration and its GetDecision call", 0.1)
    assert lookup["GetRegistration"].parent_span_id == lookup_span_id
    assert lookup["GetDecision"].parent_span_id == lookup["GetRegistration"].span_id, \
        "enrollment's server span is a child of the registration call that made it"

    def one(service: str, name: str, kind: int) -> trace_pb2.Span:
        (span,) = [s for svc, s in spans if svc == service and s.name == name and s.kind == kind]
        return span

    register = one("registration", "coursesignup.registration.v1.RegistrationService/Register",
                   KIND.SPAN_KIND_SERVER)
    assert register.parent_span_id == caller_span_id, "the caller's traceparent is honoured"
    decision = one("enrollment", "process registrations", KIND.SPAN_KIND_CONSUMER)
    assert decision.parent_span_id == register.span_id
    assert _attribute(decision, "messaging.message.conversation_id") == reply.registration_id
    projection = one("stats", "process enrollment-events", KIND.SPAN_KIND_CONSUMER)
    assert projection.parent_span_id == decision.span_id, "through the outbox, the event carries the decision's span"
    received = one("notifier", "process registrations", KIND.SPAN_KIND_CONSUMER)
    assert received.parent_span_id == register.span_id
    decided = one("notifier", "process enrollment-events", KIND.SPAN_KIND_CONSUMER)
    assert decided.parent_span_id == decision.span_id
    emails = {_attribute(s, "coursesignup.notification.kind"): s for svc, s in spans if s.name == "send email"}
    assert set(emails) == {"RECEIVED", "ENROLLED"}
    assert emails["RECEIVED"].parent_span_id == received.span_id
    assert emails["ENROLLED"].parent_span_id == decided.span_id
    assert all(_attribute(s, "coursesignup.outcome") == "sent" for s in emails.values())
    for _, span in spans:  # ids and kinds only: no address, no name
        data = span.SerializeToString()
        assert EMAIL.encode() not in data and NAME.encode() not in data and b"1990-12" not in data
