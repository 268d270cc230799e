"""The notifier service end to end, in-process: kinesalite, a real aiosmtpd, SQLite and PostgreSQL."""

from __future__ import annotations

import email
import email.policy
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
from libs.config import NotifierSettings
from libs.consumer import dead_letters
from libs.db import make_engine
from libs.envelope import new_envelope
from libs.kinesis import (
    NOTIFICATIONS_STREAM,
    OutgoingRecord,
    ensure_stream,
    kinesis_client,
    put_records,
)
from services.notifier import bootstrap
from tests.helpers import free_port, serve_in_thread

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
        with self.lock:
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
    stream: str
    channel: grpc.Channel

    @property
    def stub(self) -> notifier_pb2_grpc.NotifierServiceStub:
        return notifier_pb2_grpc.NotifierServiceStub(self.channel)

    def notifications(self, registration_id: str) -> list[notifier_pb2.Notification]:
        request = notifier_pb2.ListNotificationsRequest(registration_id=registration_id)
        return list(self.stub.ListNotifications(request, timeout=5).notifications)


@pytest.fixture
def notifier(kinesis_env: dict[str, str], database_url: str, smtp_server: tuple[RecordingHandler, int],
             monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningNotifier]:
    _, smtp_port = smtp_server
    port = free_port()
    for key, value in {
        "NOTIFIER_DATABASE_URL": database_url,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "NOTIFIER_PORT": str(port),
        "KINESIS_SHARD_COUNT": "2",
        "LEASE_SECONDS": "3",
        "SMTP_TIMEOUT_SECONDS": "5",
        "MAIL_FROM": "Course Sign-up <no-reply@course-signup.example>",
    }.items():
        monkeypatch.setenv(key, value)
    settings = NotifierSettings()
    with serve_in_thread(bootstrap.build_hooks(settings)), grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield RunningNotifier(port, settings.stream_name(NOTIFICATIONS_STREAM), channel)


def _command(registration_id: str, kind: int, email_address: str, **fields: str) -> events_pb2.SendNotification:
    return events_pb2.SendNotification(
        registration_id=registration_id, kind=kind, email=email_address,  # type: ignore[arg-type]
        name=fields.get("name", "Ana Souza"), course_id=fields.get("course_id", "c-physics"),
        course_name=fields.get("course_name", "Physics 101"), locale=fields.get("locale", "en"),
    )


def _publish(stream: str, commands: list[events_pb2.SendNotification | bytes]) -> None:
    records = []
    for command in commands:
        if isinstance(command, bytes):
            records.append(OutgoingRecord("poison", command))
            continue
        data = new_envelope(command.registration_id, send_notification=command).SerializeToString()
        records.append(OutgoingRecord(command.registration_id, data))
    client = kinesis_client("us-east-1")
    ensure_stream(client, stream, 2)
    assert all(put_records(client, stream, records))


def _eventually(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


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
    data = new_envelope(ana, send_notification=received).SerializeToString()
    client = kinesis_client("us-east-1")
    # In one batch: the same record twice, and the same command in a fresh envelope.
    _publish(notifier.stream, [received, enrolled, full, duplicate, received])
    assert all(put_records(client, notifier.stream, [OutgoingRecord(ana, data), OutgoingRecord(ana, data)]))
    _eventually(lambda: _settled(notifier, [ana, bia, eve], 4), what="all notifications sent")

    # Later, after they were sent: Kinesis redelivers, a relay republishes. A marker
    # behind them on the same shard tells when the consumer has read past them.
    marker = _command(f"{ana}-marker", Kind.NOTIFICATION_KIND_RECEIVED, "marker@example.com")
    assert all(put_records(client, notifier.stream, [
        OutgoingRecord(ana, data),
        OutgoingRecord(ana, new_envelope(ana, send_notification=enrolled).SerializeToString()),
        OutgoingRecord(ana, new_envelope(ana, send_notification=marker).SerializeToString()),
    ]))
    _eventually(lambda: _settled(notifier, [marker.registration_id], 1), what="marker sent")
    time.sleep(1.2)  # a second email, if any were coming, would be sent within a poll interval
    assert len(handler.mail_to("marker@example.com")) == 1

    ana_mail = handler.mail_to("ana@example.com")
    assert len(ana_mail) == 2
    subjects = sorted(mail.message["Subject"] for mail in ana_mail)
    assert subjects == ["We received your request for Physics 101", "You are enrolled in Physics 101"]
    assert len(handler.received) == 5

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
    assert [n.kind for n in listed] == [Kind.NOTIFICATION_KIND_RECEIVED, Kind.NOTIFICATION_KIND_ENROLLED]
    for n in listed:
        assert n.status == SENT
        assert n.attempts == 1
        assert n.recipient == "ana@example.com"
        assert n.registration_id == ana
        assert n.HasField("send_time") and n.send_time.ToDatetime() >= n.create_time.ToDatetime()
        assert n.last_error == ""
    assert notifier.notifications(f"reg-{uuid.uuid4().hex}") == []


def test_refused_or_invalid_recipients_fail_at_once_while_a_busy_mailbox_is_retried(
    notifier: RunningNotifier, smtp_server: tuple[RecordingHandler, int], database_url: str
) -> None:
    handler, _ = smtp_server
    handler.refuse["gone@example.com"] = "550 5.1.1 No such user here"
    handler.defer_first["busy@example.com"] = ["451 4.3.0 Mailbox busy, try later"]
    gone, invalid, busy, fine = (f"reg-{uuid.uuid4().hex[:10]}" for _ in range(4))
    _publish(notifier.stream, [
        _command(gone, Kind.NOTIFICATION_KIND_ENROLLED, "gone@example.com"),
        _command(invalid, Kind.NOTIFICATION_KIND_ENROLLED, "not-an-address"),
        _command(busy, Kind.NOTIFICATION_KIND_ENROLLED, "busy@example.com"),
        _command(fine, Kind.NOTIFICATION_KIND_ENROLLED, "fine@example.com"),
        b"\x00not an envelope",
    ])

    _eventually(lambda: _settled(notifier, [gone, invalid, busy, fine], 4), what="all notifications settled")

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

    time.sleep(1.2)  # nothing failed is tried again
    assert handler.rcpt_attempts["gone@example.com"] == 1


def test_listing_without_a_valid_registration_id_is_invalid_argument_naming_the_field(
    notifier: RunningNotifier,
) -> None:
    for registration_id in ("", "   ", "x" * 300):
        with pytest.raises(grpc.RpcError) as raised:
            notifier.stub.ListNotifications(
                notifier_pb2.ListNotificationsRequest(registration_id=registration_id), timeout=5
            )
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
