"""The notifier's part of a registration's trace and its email lag: the record's consumer span is
stored with the notification, the send's span is its child, and a sent email's lag (from the
fact's time to the send) is observed per kind."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator

import pytest
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY
from sqlalchemy import select

from coursesignup.events.v1 import events_pb2
from libs import tracing
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.envelope import new_envelope
from libs.worker import dispatch
from services.notifier.adapters import repository
from services.notifier.adapters.repository import NotificationStore
from services.notifier.domain.model import PermanentDeliveryError
from services.notifier.entrypoints.stream import REGISTRATIONS
from services.notifier.service_layer.sender import Sender
from tests.helpers import wait_until

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
REGISTER_SPAN_ID = 0xB7AD6B7169203331
TRACEPARENT = f"00-{TRACE_ID:032x}-{REGISTER_SPAN_ID:016x}-01"


class FakeMailer:
    """Accepts every message, except for recipients it is told to refuse."""

    max_connections = 2

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.sent: list[str] = []
        self.refuse = refuse

    async def send(self, message: bytes, recipient: str) -> None:
        if recipient in self.refuse:
            raise PermanentDeliveryError("550 no such mailbox")
        self.sent.append(recipient)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "notifier"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _sign_up(registration_id: str, email: str, accept_time: dt.datetime) -> StreamRecord:
    accepted = timestamp_pb2.Timestamp()
    accepted.FromDatetime(accept_time)
    command = events_pb2.RegisterStudent(registration_id=registration_id, course_id="c1", name="Ana",
                                         email=email, locale="en", accept_time=accepted, course_name="Physics")
    envelope = new_envelope(registration_id, time=accepted, register_student=command)
    envelope.trace_context["traceparent"] = TRACEPARENT
    return StreamRecord("registrations", "shard-0", registration_id, "c1", envelope.SerializeToString(),
                        dt.datetime.now(dt.UTC))


def _lag(suffix: str) -> float:
    return REGISTRY.get_sample_value(f"coursesignup_email_lag_seconds_{suffix}", {"kind": "RECEIVED"}) or 0.0


def test_the_send_span_is_a_child_of_the_records_span_and_a_sent_email_observes_its_lag(spans, tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'notifier.db'}")
    repository.create_tables(engine)
    count_before, sum_before = _lag("count"), _lag("sum")
    accepted = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    try:
        with engine.begin() as conn:
            dispatch(conn, [_sign_up("reg-sent", "ana@example.com", accepted),
                            _sign_up("reg-refused", "refused@example.com", accepted)], REGISTRATIONS, publish=False)
        with engine.connect() as conn:
            stored = {row.registration_id: row for row in conn.execute(select(repository.notifications))}
        mailer = FakeMailer(refuse=frozenset({"refused@example.com"}))
        store = NotificationStore(engine)

        async def send_all() -> None:
            sender = Sender(store=store, mailer=mailer, compose=lambda notification, recipient: b"Subject: x\r\n\r\n",
                            poll_seconds=0.05)
            sender.start()
            await asyncio.to_thread(wait_until, lambda: sender.counters.sent + sender.counters.failed == 2, 30.0,
                                    "both emails attempted", 0.02)
            await sender.stop(2.0)

        asyncio.run(send_all())
    finally:
        engine.dispose()

    finished = spans.get_finished_spans()
    consumer = {span.attributes["messaging.message.id"]: span for span in finished if span.kind is SpanKind.CONSUMER}
    sends = {span.attributes["coursesignup.registration_id"]: span for span in finished
             if span.name == "send email"}
    for registration_id in ("reg-sent", "reg-refused"):
        recorded = consumer[f"register_student:{registration_id}"]
        assert recorded.parent is not None and recorded.parent.span_id == REGISTER_SPAN_ID
        assert stored[registration_id].trace_parent == \
            f"00-{TRACE_ID:032x}-{recorded.context.span_id:016x}-01", "the row keeps its record's span"
        send = sends[registration_id]
        assert send.kind is SpanKind.CLIENT
        assert send.context.trace_id == TRACE_ID
        assert send.parent is not None and send.parent.span_id == recorded.context.span_id
        assert send.attributes["coursesignup.notification.kind"] == "RECEIVED"
    assert sends["reg-sent"].attributes["coursesignup.outcome"] == "sent"
    assert sends["reg-sent"].status.status_code is StatusCode.UNSET
    assert sends["reg-refused"].attributes["coursesignup.outcome"] == "failed"
    assert sends["reg-refused"].status.status_code is StatusCode.ERROR
    for span in finished:
        text = repr(dict(span.attributes or {})) + (span.status.description or "")
        assert "example.com" not in text and "Ana" not in text, "no personal data in spans"

    assert stored["reg-sent"].event_time == pytest.approx(accepted.timestamp()), "the acceptance time is kept"
    # Only the sent email has a lag, of at least the 30 s the test back-dated its acceptance by.
    assert _lag("count") - count_before == 1
    assert _lag("sum") - sum_before >= 30.0


def test_with_tracing_off_the_notification_has_no_trace_parent_and_the_send_no_span(tmp_path):
    assert not tracing.enabled()
    engine = make_engine(f"sqlite:///{tmp_path / 'notifier.db'}")
    repository.create_tables(engine)
    try:
        with engine.begin() as conn:
            dispatch(conn, [_sign_up("reg-1", "ana@example.com", dt.datetime.now(dt.UTC))], REGISTRATIONS,
                     publish=False)
        with engine.connect() as conn:
            (row,) = conn.execute(select(repository.notifications)).all()
    finally:
        engine.dispose()
    assert row.trace_parent is None
    assert row.event_time is not None
