"""The notifier service end to end, in-process: kinesalite, a real aiosmtpd, SQLite and PostgreSQL.

Besides delivery, each SMTP trouble an operator meets: a refusing, deferring (421/451),
hanging or absent server, and what the service reports about it (GetDeliveryStats,
the periodic metrics log line). The checkpoint never waits for SMTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

import grpc
import pytest
from aiosmtpd.controller import Controller
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import select

from coursesignup.events.v1 import events_pb2
from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from libs.consumer import dead_letters, shard_leases
from libs.db import make_engine
from libs.envelope import new_envelope
from libs.kinesis import (
    ENROLLMENT_EVENTS_STREAM,
    REGISTRATIONS_STREAM,
    OutgoingRecord,
    ensure_stream,
    kinesis_client,
    put_records,
)
from libs.logs import JsonFormatter
from services.notifier import bootstrap
from services.notifier.settings import NotifierSettings
from tests import helpers
from tests.helpers import free_port, serve_in_thread, wait_until

Kind = events_pb2.NotificationKind
SENT = notifier_pb2.DELIVERY_STATUS_SENT
FAILED = notifier_pb2.DELIVERY_STATUS_FAILED
PENDING = notifier_pb2.DELIVERY_STATUS_PENDING
HOSTILE_NAME = "Eve\r\nBcc: attacker@evil.test <script>alert(1)</script>"


# --- a real SMTP server ---------------------------------------------------------------


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


@dataclass
class RecordingHandler:
    """Accepts mail and records it; refuses or defers chosen recipients."""

    # recipient -> reply to every RCPT (e.g. "550 ...")
    refuse: dict[str, str] = field(default_factory=dict)
    # recipient -> replies to the first RCPTs, then accept (e.g. ["451 ..."])
    defer_first: dict[str, list[str]] = field(default_factory=dict)
    # recipient -> replies to the first DATA commands, then accept (e.g. ["421 ..."])
    defer_data_first: dict[str, list[str]] = field(default_factory=dict)
    # While set, DATA gets no answer at all (the client must time out).
    hanging: bool = False
    hung: int = 0
    # A slow server: each DATA is answered after this long.
    data_delay_seconds: float = 0.0
    received: list[ReceivedMail] = field(default_factory=list)
    rcpt_attempts: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any) -> str:
        with self.lock:
            self.rcpt_attempts[address] = self.rcpt_attempts.get(address, 0) + 1
            if address in self.refuse:
                return self.refuse[address]
            deferred = self.defer_first.get(address)
            if deferred:
                return deferred.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.hanging:
            with self.lock:
                self.hung += 1
            while self.hanging:
                await asyncio.sleep(0.05)
            return "451 4.4.2 too late: the client gave up long ago"
        if self.data_delay_seconds:
            await asyncio.sleep(self.data_delay_seconds)
        with self.lock:
            for address in envelope.rcpt_tos:
                deferred = self.defer_data_first.get(address)
                if deferred:
                    return deferred.pop(0)
            self.received.append(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"

    def mail_to(self, recipient: str) -> list[ReceivedMail]:
        with self.lock:
            return [mail for mail in self.received if recipient in mail.rcpt_tos]


@pytest.fixture
def smtp_server() -> Iterator[tuple[RecordingHandler, int]]:
    handler = RecordingHandler()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# --- the notifier, in-process ------------------------------------------------------------


@dataclass
class RunningNotifier:
    port: int
    # The streams it reads, by base name: registrations, enrollment-events.
    streams: dict[str, str]
    channel: grpc.Channel

    @property
    def events(self) -> str:
        return self.streams[ENROLLMENT_EVENTS_STREAM]

    @property
    def stub(self) -> notifier_pb2_grpc.NotifierServiceStub:
        return notifier_pb2_grpc.NotifierServiceStub(self.channel)

    def notifications(self, registration_id: str) -> list[notifier_pb2.Notification]:
        request = notifier_pb2.ListNotificationsRequest(registration_id=registration_id)
        return list(self.stub.ListNotifications(request, timeout=5, metadata=helpers.ADMIN_METADATA).notifications)

    def stats(self) -> notifier_pb2.GetDeliveryStatsResponse:
        return self.stub.GetDeliveryStats(notifier_pb2.GetDeliveryStatsRequest(), timeout=5)


@contextlib.contextmanager
def running_notifier(monkeypatch: pytest.MonkeyPatch, database_url: str, smtp_port: int,
                     **overrides: str) -> Iterator[RunningNotifier]:
    """The notifier service in this process; `overrides` are more environment variables."""
    port = free_port()
    for key, value in {
        "NOTIFIER_DATABASE_URL": database_url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "NOTIFIER_PORT": str(port),
        "KINESIS_SHARD_COUNT": "2",
        "LEASE_SECONDS": "3",
        "SMTP_TIMEOUT_SECONDS": "5",
        "NOTIFIER_RETRY_BASE_SECONDS": "0.2",
        "MAIL_FROM": "Course Sign-up <no-reply@course-signup.example>",
        **overrides,
    }.items():
        monkeypatch.setenv(key, value)
    settings = NotifierSettings()
    streams = {base: settings.stream_name(base) for base in (REGISTRATIONS_STREAM, ENROLLMENT_EVENTS_STREAM)}
    try:
        with serve_in_thread(bootstrap.build_hooks(settings)), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield RunningNotifier(port, streams, channel)
    finally:
        # The session's kinesalite has a shard limit shared by the whole suite.
        for stream in streams.values():
            with contextlib.suppress(Exception):
                kinesis_client("us-east-1").delete_stream(StreamName=stream, EnforceConsumerDeletion=True)


@pytest.fixture
def notifier(kinesis_env: dict[str, str], database_url: str, smtp_server: tuple[RecordingHandler, int],
             monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningNotifier]:
    _, smtp_port = smtp_server
    with running_notifier(monkeypatch, database_url, smtp_port) as running:
        yield running


@dataclass(frozen=True)
class Fact:
    """A record that calls for one email: what its producer (registration, enrollment) writes."""

    registration_id: str
    kind: int
    email: str
    locale: str
    stream: str  # base name
    body: dict[str, Any]

    def data(self) -> bytes:
        return new_envelope(self.registration_id, **self.body).SerializeToString()


_DECLINE_REASON = {Kind.NOTIFICATION_KIND_DECLINED_FULL: events_pb2.DECLINE_REASON_FULL,
                   Kind.NOTIFICATION_KIND_DECLINED_DUPLICATE: events_pb2.DECLINE_REASON_DUPLICATE}
# The kinds a stream fact calls for today (cancellation and the waitlist have no producer yet).
STREAM_KINDS = (Kind.NOTIFICATION_KIND_RECEIVED, Kind.NOTIFICATION_KIND_ENROLLED,
                Kind.NOTIFICATION_KIND_DECLINED_FULL, Kind.NOTIFICATION_KIND_DECLINED_DUPLICATE)


def _command(registration_id: str, kind: int, email_address: str, **fields: str) -> Fact:
    name = fields.get("name", "Ana Souza")
    course_id = fields.get("course_id", "c-physics")
    course_name = fields.get("course_name", "Physics 101")
    locale = fields.get("locale", "en")
    body: dict[str, Any]
    if kind == Kind.NOTIFICATION_KIND_RECEIVED:
        stream = REGISTRATIONS_STREAM
        body = {"register_student": events_pb2.RegisterStudent(
            registration_id=registration_id, course_id=course_id, name=name, email=email_address,
            locale=locale, course_name=course_name)}
    elif kind == Kind.NOTIFICATION_KIND_ENROLLED:
        stream = ENROLLMENT_EVENTS_STREAM
        body = {"student_enrolled": events_pb2.StudentEnrolled(
            registration_id=registration_id, course_id=course_id, campus_id="sp", name=name,
            email=email_address.lower(), contact_email=email_address, course_name=course_name, locale=locale)}
    else:
        stream = ENROLLMENT_EVENTS_STREAM
        body = {"registration_declined": events_pb2.RegistrationDeclined(
            registration_id=registration_id, course_id=course_id, campus_id="sp", reason=_DECLINE_REASON[kind],
            name=name, contact_email=email_address, course_name=course_name, locale=locale)}
    return Fact(registration_id, kind, email_address, locale, stream, body)


def _publish(notifier: RunningNotifier, facts: list[Fact | bytes], partition_key: str | None = None) -> list[str]:
    """Puts each fact on its stream (bytes: poison, on enrollment-events); returns sequence numbers."""
    client = kinesis_client("us-east-1")
    by_stream: dict[str, list[OutgoingRecord]] = {}
    for fact in facts:
        if isinstance(fact, bytes):
            by_stream.setdefault(notifier.events, []).append(OutgoingRecord(partition_key or "poison", fact))
            continue
        record = OutgoingRecord(partition_key or fact.registration_id, fact.data())
        by_stream.setdefault(notifier.streams[fact.stream], []).append(record)
    sequence_numbers: list[str] = []
    for stream, records in by_stream.items():
        ensure_stream(client, stream, 2)
        published = put_records(client, stream, records)
        assert all(published)
        sequence_numbers.extend(str(n) for n in published)
    return sequence_numbers


def _drained(notifier: RunningNotifier) -> bool:
    """Nothing pending and no send in progress: every notification recorded so far had its attempts."""
    stats = notifier.stats()
    return stats.pending_count == 0 and stats.in_flight == 0


def _settled(notifier: RunningNotifier, registration_ids: list[str], expected: int) -> bool:
    found = [n for rid in registration_ids for n in notifier.notifications(rid)]
    return len(found) >= expected and all(n.status != PENDING for n in found)


# --- behaviour -------------------------------------------------------------------------


def test_each_notification_is_emailed_once_even_when_the_command_is_redelivered(
    notifier: RunningNotifier, smtp_server: tuple[RecordingHandler, int]
) -> None:
    handler, _ = smtp_server
    ana, bia, eve = (f"reg-{uuid.uuid4().hex[:10]}" for _ in range(3))
    received = _command(ana, Kind.NOTIFICATION_KIND_RECEIVED, "ana@example.com")
    enrolled = _command(ana, Kind.NOTIFICATION_KIND_ENROLLED, "ana@example.com")
    full = _command(bia, Kind.NOTIFICATION_KIND_DECLINED_FULL, "bia@example.org", name="Bia", locale="pt-BR",
                    course_name="Química")
    duplicate = _command(eve, Kind.NOTIFICATION_KIND_DECLINED_DUPLICATE, "eve@example.net", name=HOSTILE_NAME)
    # In one batch: the same record twice, and the same fact in a fresh envelope.
    _publish(notifier, [received, enrolled, full, duplicate, received])
    _publish(notifier, [received, received], partition_key=ana)
    wait_until(lambda: _settled(notifier, [ana, bia, eve], 4), what="all notifications sent")

    # Later, after they were sent: Kinesis redelivers, a relay republishes. Markers
    # behind them on the same shards tell when both consumers have read past them.
    markers = [_command(f"{ana}-marker-{kind}", kind, f"marker{kind}@example.com")
               for kind in (Kind.NOTIFICATION_KIND_RECEIVED, Kind.NOTIFICATION_KIND_ENROLLED)]
    _publish(notifier, [received, enrolled, *markers], partition_key=ana)
    wait_until(lambda: _settled(notifier, [m.registration_id for m in markers], 2), what="markers sent")
    # The consumers recorded whatever the copies called for before the markers; sends run
    # concurrently, so a copy's email could still be on its way: once nothing is pending or
    # in flight, it would have been received.
    wait_until(lambda: _drained(notifier), what="nothing pending or being sent")
    assert [len(handler.mail_to(m.email)) for m in markers] == [1, 1]

    ana_mail = handler.mail_to("ana@example.com")
    assert len(ana_mail) == 2
    subjects = sorted(mail.message["Subject"] for mail in ana_mail)
    assert subjects == ["We received your request for Physics 101", "You are enrolled in Physics 101"]
    assert len(handler.received) == 6

    for mail in handler.received:
        assert len(mail.rcpt_tos) == 1
        assert mail.mail_from == "no-reply@course-signup.example"
        message = mail.message
        assert message.get_content_type() == "multipart/alternative"
        assert message["To"] == mail.rcpt_tos[0]
        assert message.get_body(("plain",)) is not None and message.get_body(("html",)) is not None

    (bia_mail,) = handler.mail_to("bia@example.org")
    assert bia_mail.message["Subject"] == "Turma lotada: Química"
    assert "Olá Bia" in bia_mail.message.get_body(("plain",)).get_content()

    (eve_mail,) = handler.mail_to("eve@example.net")
    assert eve_mail.rcpt_tos == ["eve@example.net"]
    assert eve_mail.message["Bcc"] is None
    assert "attacker@evil.test" not in "".join(handler.rcpt_attempts)
    html = eve_mail.message.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;" in html

    listed = notifier.notifications(ana)
    # The two emails come from two streams (the sign-up and its decision), so either may be
    # recorded first.
    assert sorted(n.kind for n in listed) == [Kind.NOTIFICATION_KIND_RECEIVED, Kind.NOTIFICATION_KIND_ENROLLED]
    for n in listed:
        assert n.status == SENT
        assert n.attempts == 1
        assert n.recipient == "ana@example.com"
        assert n.registration_id == ana
        assert n.HasField("send_time") and n.send_time.ToDatetime() >= n.create_time.ToDatetime()
        assert n.last_error == ""
    assert notifier.notifications(f"reg-{uuid.uuid4().hex}") == []


def test_refused_or_invalid_recipients_fail_at_once_while_busy_or_closing_servers_are_retried(
    notifier: RunningNotifier, smtp_server: tuple[RecordingHandler, int], database_url: str
) -> None:
    handler, _ = smtp_server
    handler.refuse["gone@example.com"] = "550 5.1.1 No such user here"
    handler.defer_first["busy@example.com"] = ["451 4.3.0 Mailbox busy, try later"]
    handler.defer_first["closing@example.com"] = ["421 4.3.2 Service shutting down, closing channel"]
    handler.defer_data_first["closing-data@example.com"] = ["421 4.4.5 Too busy, closing channel"]
    gone, invalid, busy, closing, closing_data, fine = (f"reg-{uuid.uuid4().hex[:10]}" for _ in range(6))
    _publish(notifier, [
        _command(gone, Kind.NOTIFICATION_KIND_ENROLLED, "gone@example.com"),
        _command(invalid, Kind.NOTIFICATION_KIND_ENROLLED, "not-an-address"),
        _command(busy, Kind.NOTIFICATION_KIND_ENROLLED, "busy@example.com"),
        _command(closing, Kind.NOTIFICATION_KIND_ENROLLED, "closing@example.com"),
        _command(closing_data, Kind.NOTIFICATION_KIND_ENROLLED, "closing-data@example.com"),
        _command(fine, Kind.NOTIFICATION_KIND_ENROLLED, "fine@example.com"),
        b"\x00not an envelope",
    ])

    everyone = [gone, invalid, busy, closing, closing_data, fine]
    wait_until(lambda: _settled(notifier, everyone, 6), what="all notifications settled")

    for registration_id, address, reply in [(closing, "closing@example.com", "421"),
                                            (closing_data, "closing-data@example.com", "421")]:
        (deferred,) = notifier.notifications(registration_id)
        assert (deferred.status, deferred.attempts) == (SENT, 2), address
        assert reply in deferred.last_error
        assert len(handler.mail_to(address)) == 1
    assert handler.rcpt_attempts["closing@example.com"] == 2

    (refused,) = notifier.notifications(gone)
    assert refused.status == FAILED
    assert refused.attempts == 1
    assert "550" in refused.last_error
    assert handler.rcpt_attempts["gone@example.com"] == 1

    (bad_address,) = notifier.notifications(invalid)
    assert bad_address.status == FAILED
    assert bad_address.attempts == 1
    assert "invalid recipient" in bad_address.last_error
    assert not any("not-an-address" in address for address in handler.rcpt_attempts)

    (retried,) = notifier.notifications(busy)
    assert retried.status == SENT
    assert retried.attempts == 2
    assert "451" in retried.last_error
    assert len(handler.mail_to("busy@example.com")) == 1

    (delivered,) = notifier.notifications(fine)
    assert delivered.status == SENT and delivered.attempts == 1

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            letters = conn.execute(select(dead_letters.c.data)).scalars().all()
    finally:
        engine.dispose()
    assert letters == [b"\x00not an envelope"]

    # Nothing failed is tried again. A marker notification, due after the failures, goes
    # through the same sender, which claims the oldest due first: once it is sent and no
    # send is in progress, an attempt at a failed one would have reached the server.
    marker = _command(f"reg-{uuid.uuid4().hex[:10]}", Kind.NOTIFICATION_KIND_ENROLLED, "marker@example.com")
    _publish(notifier, [marker])
    wait_until(lambda: _settled(notifier, [marker.registration_id], 1), what="the marker sent")
    wait_until(lambda: _drained(notifier), what="nothing pending or being sent")
    assert [n.status for n in notifier.notifications(marker.registration_id)] == [SENT]
    assert len(handler.mail_to("marker@example.com")) == 1
    assert handler.rcpt_attempts["gone@example.com"] == 1
    assert not any("not-an-address" in address for address in handler.rcpt_attempts)
    assert [(n.status, n.attempts) for rid in (gone, invalid) for n in notifier.notifications(rid)] == [
        (FAILED, 1), (FAILED, 1)]

    stats = notifier.stats()
    # The marker is the fifth email sent.
    assert (stats.sent_since_start, stats.failed_since_start, stats.retried_since_start) == (5, 2, 3)
    assert (stats.pending_count, stats.due_count, stats.retrying_count, stats.failed_count) == (0, 0, 0, 2)
    assert stats.in_flight == 0
    assert stats.oldest_pending_age.ToTimedelta().total_seconds() == 0


def test_listing_without_a_valid_registration_id_is_invalid_argument_naming_the_field(
    notifier: RunningNotifier,
) -> None:
    for registration_id in ("", "   ", "x" * 300):
        with pytest.raises(grpc.RpcError) as raised:
            notifier.stub.ListNotifications(
                notifier_pb2.ListNotificationsRequest(registration_id=registration_id), timeout=5,
                    metadata=helpers.ADMIN_METADATA)
        call = raised.value
        assert call.code() == grpc.StatusCode.INVALID_ARGUMENT, registration_id
        status = rpc_status.from_call(call)
        assert status is not None
        violations = []
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations.extend(bad_request.field_violations)
        assert [v.field for v in violations] == ["registration_id"]


def _checkpoints(database_url: str, stream: str) -> set[str]:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return {c for c in conn.execute(
                select(shard_leases.c.checkpoint).where(shard_leases.c.stream_name == stream)
            ).scalars() if c}
    finally:
        engine.dispose()


def test_a_hanging_server_times_out_each_send_while_the_checkpoint_moves_on_and_all_is_sent_later(
    kinesis_env: dict[str, str], database_url: str, smtp_server: tuple[RecordingHandler, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, smtp_port = smtp_server
    handler.hanging = True
    first = [_command(f"reg-{uuid.uuid4().hex[:10]}", Kind.NOTIFICATION_KIND_ENROLLED, f"early{i}@example.com")
             for i in range(3)]
    later = [_command(f"reg-{uuid.uuid4().hex[:10]}", Kind.NOTIFICATION_KIND_ENROLLED, f"later{i}@example.com")
             for i in range(20)]
    with running_notifier(monkeypatch, database_url, smtp_port, SMTP_TIMEOUT_SECONDS="0.5",
                          NOTIFIER_MAX_ATTEMPTS="50", NOTIFIER_RETRY_MAX_SECONDS="0.4") as notifier:
        _publish(notifier, list(first), partition_key="one-shard")
        wait_until(lambda: handler.hung >= 1, what="a send stuck in DATA")

        # SMTP hangs; the consumer keeps recording commands and checkpointing past them.
        last_sequence = _publish(notifier, list(later), partition_key="one-shard")[-1]
        everyone = [c.registration_id for c in first + later]
        wait_until(lambda: last_sequence in _checkpoints(database_url, notifier.events), timeout=10,
                    what="checkpoint at the last record")
        assert all(len(notifier.notifications(rid)) == 1 for rid in everyone)
        assert handler.hanging and handler.received == []

        # Each stuck send gave up after the timeout and was scheduled again.
        wait_until(lambda: any("timed out" in n.last_error for n in notifier.notifications(first[0].registration_id)),
                    what="a timed-out attempt recorded")
        stats = notifier.stats()
        assert stats.pending_count == len(everyone)
        assert stats.sent_since_start == 0 and stats.failed_since_start == 0
        assert stats.retried_since_start >= 1
        assert stats.retrying_count >= 1
        assert stats.oldest_pending_age.ToTimedelta().total_seconds() > 0

        handler.hanging = False
        wait_until(lambda: _settled(notifier, everyone, len(everyone)), what="everything sent once SMTP answers")
        assert all(n.status == SENT for rid in everyone for n in notifier.notifications(rid))
        (early,) = notifier.notifications(first[0].registration_id)
        assert early.attempts >= 2 and "timed out" in early.last_error
        assert notifier.stats().pending_count == 0
    recipients = [address for mail in handler.received for address in mail.rcpt_tos]
    assert sorted(recipients) == sorted(c.email for c in first + later)


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port where nothing listens (bound, so nobody else takes it): connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_a_server_that_is_down_is_retried_with_backoff_then_recorded_as_failed(
    kinesis_env: dict[str, str], database_url: str, refusing_port: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    registration_ids = [f"reg-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    with running_notifier(monkeypatch, database_url, refusing_port, NOTIFIER_MAX_ATTEMPTS="3",
                          NOTIFIER_RETRY_BASE_SECONDS="0.4") as notifier:
        published = time.monotonic()
        _publish(notifier, [_command(rid, Kind.NOTIFICATION_KIND_RECEIVED, f"{rid}@example.com")
                                   for rid in registration_ids])
        wait_until(lambda: _settled(notifier, registration_ids, 3), what="all recorded")
        elapsed = time.monotonic() - published
        stats = notifier.stats()
        for rid in registration_ids:
            (failed,) = notifier.notifications(rid)
            assert (failed.status, failed.attempts) == (FAILED, 3)
            assert "connect failed" in failed.last_error
    # Refused connections fail at once: only the backoff (>= 0.2 s, then >= 0.4 s) takes time.
    assert elapsed >= 0.6
    assert (stats.sent_since_start, stats.retried_since_start, stats.failed_since_start) == (0, 6, 3)
    assert (stats.pending_count, stats.failed_count) == (0, 3)


def test_every_kind_in_both_locales_reaches_the_server_well_formed_with_hostile_names_inert(
    notifier: RunningNotifier, smtp_server: tuple[RecordingHandler, int]
) -> None:
    handler, _ = smtp_server
    commands = [
        _command(f"reg-{uuid.uuid4().hex[:10]}", kind, f"{locale.lower()}-{kind}@example.com", locale=locale,
                 name=HOSTILE_NAME, course_name='Math\r\nCc: other@evil.test\n"quoted" <b>bold</b>')
        for kind in STREAM_KINDS
        for locale in ("en", "pt-BR")
    ]
    _publish(notifier, list(commands))
    wait_until(lambda: _settled(notifier, [c.registration_id for c in commands], 8), what="all sent")

    subjects = set()
    for command in commands:
        (mail,) = handler.mail_to(command.email)
        assert mail.rcpt_tos == [command.email]
        message = mail.message
        assert not message.defects
        assert message["To"] == command.email
        assert message["Bcc"] is None and message["Cc"] is None
        assert message["X-Course-Signup-Kind"] == Kind.Name(command.kind).removeprefix(
            "NOTIFICATION_KIND_").lower().replace("_", "-")
        assert message["X-Course-Signup-Registration"] == command.registration_id
        assert "Math Cc: other@evil.test" in message["Subject"]
        subjects.add(message["Subject"])
        text = message.get_body(("plain",)).get_content()
        html = message.get_body(("html",)).get_content()
        assert ("Olá Eve" if command.locale == "pt-BR" else "Hello Eve") in text
        assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;bold" in html
    assert len(subjects) == 8
    assert "attacker@evil.test" not in "".join(handler.rcpt_attempts)
    assert not any("evil.test" in address for mail in handler.received for address in mail.rcpt_tos)


def test_a_metrics_line_is_logged_periodically_as_json_and_no_log_line_holds_an_address(
    kinesis_env: dict[str, str], database_url: str, smtp_server: tuple[RecordingHandler, int],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    handler, smtp_port = smtp_server
    # Like Postfix, the reply quotes the address; the log must not.
    handler.refuse["gone@example.com"] = "550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown"
    caplog.set_level(logging.INFO, logger="services.notifier")
    sent, gone = (f"reg-{uuid.uuid4().hex[:10]}" for _ in range(2))
    with running_notifier(monkeypatch, database_url, smtp_port, NOTIFIER_METRICS_LOG_SECONDS="0.2") as notifier:
        _publish(notifier, [_command(sent, Kind.NOTIFICATION_KIND_ENROLLED, "ana@example.com"),
                                   _command(gone, Kind.NOTIFICATION_KIND_ENROLLED, "gone@example.com")])
        wait_until(lambda: _settled(notifier, [sent, gone], 2), what="both settled")

        def settled_line() -> logging.LogRecord | None:
            lines = [r for r in caplog.records if r.getMessage() == "notifier metrics"]
            return next((r for r in reversed(lines) if getattr(r, "sent", 0) == 1 and getattr(r, "failed", 0) == 1
                         and getattr(r, "pending", -1) == 0), None)

        wait_until(lambda: settled_line() is not None, timeout=5, what="a metrics line after both settled")
        notifier_views = notifier.notifications(gone)
    record = settled_line()
    assert record is not None
    entry = json.loads(JsonFormatter("notifier").format(record))
    assert entry["message"] == "notifier metrics" and entry["level"] == "info"
    assert {key: entry[key] for key in ("sent", "failed", "retried", "pending", "due", "retrying", "failed_total",
                                        "in_flight")} == {
        "sent": 1, "failed": 1, "retried": 0, "pending": 0, "due": 0, "retrying": 0, "failed_total": 1,
        "in_flight": 0}
    failures = [r for r in caplog.records if r.getMessage() == "notification failed"]
    assert len(failures) == 1 and "Recipient address rejected" in failures[0].error  # type: ignore[attr-defined]
    assert failures[0].error.startswith("550 5.1.1 <pii:")  # type: ignore[attr-defined]
    logged = "\n".join(JsonFormatter("notifier").format(r) for r in caplog.records)
    assert "ana@example.com" not in logged and "gone@" not in logged and "Ana Souza" not in logged
    (gone_view,) = notifier_views
    assert "<gone@example.com>" in gone_view.last_error, "the operator's record keeps the full reply"
