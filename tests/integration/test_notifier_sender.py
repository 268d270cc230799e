"""The notifier's sender against a real aiosmtpd and both databases: claims, crash recovery, outages."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from datetime import UTC, datetime

from aiosmtpd.controller import Controller
from sqlalchemy import Engine

from libs.db import make_engine
from services.notifier.adapters import repository
from services.notifier.adapters.repository import NotificationStore
from services.notifier.adapters.smtp import SmtpMailer
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.model import (
    Delivered,
    DeliveryStatus,
    GaveUp,
    Notification,
    NotificationKind,
    RetryPolicy,
)
from services.notifier.service_layer.handlers import message_composer
from services.notifier.service_layer.sender import Sender
from tests.helpers import wait_until
from tests.integration.test_notifier_service import RecordingHandler, smtp_server  # noqa: F401 - fixture

MAIL_FROM = "Course Sign-up <no-reply@course-signup.example>"


def _pending(engine: Engine, count: int) -> list[str]:
    registration_ids = [f"reg-{i:04d}" for i in range(count)]
    with engine.begin() as conn:
        repository.add_notifications(conn, [
            Notification(rid, NotificationKind.ENROLLED, f"student{i}@example.com", "en", "Ana", "c1", "Physics")
            for i, rid in enumerate(registration_ids)
        ], datetime.now(UTC))
    return registration_ids


def _sender(engine: Engine, smtp_port: int, **options: float) -> tuple[Sender, SmtpMailer]:
    mailer = SmtpMailer(host="127.0.0.1", port=smtp_port, mail_from=MAIL_FROM, max_connections=2,
                        timeout_seconds=5)
    sender = Sender(store=NotificationStore(engine), mailer=mailer,
                    compose=message_composer(TemplateRenderer(), MAIL_FROM), poll_seconds=0.1, **options)
    return sender, mailer


def _statuses(engine: Engine, registration_ids: list[str]) -> Counter[DeliveryStatus]:
    store = NotificationStore(engine)
    return Counter(view.status for rid in registration_ids for view in store.list_for_registration(rid))


async def _until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    await asyncio.to_thread(wait_until, predicate, timeout, "the notifications' statuses", 0.05)


def test_two_senders_on_one_database_never_send_the_same_notification(
    database_url: str, smtp_server: tuple[RecordingHandler, int]  # noqa: F811
) -> None:
    handler, smtp_port = smtp_server
    engines = [make_engine(database_url), make_engine(database_url)]
    repository.create_tables(engines[0])
    registration_ids = _pending(engines[0], 120)

    async def race() -> None:
        pairs = [_sender(engine, smtp_port) for engine in engines]
        for sender, _ in pairs:
            sender.start()
        await _until(lambda: _statuses(engines[0], registration_ids)[DeliveryStatus.SENT] == 120)
        for sender, mailer in pairs:
            await sender.stop(2.0)
            await mailer.close()
        assert all(sender.sent > 0 for sender, _ in pairs), "both senders took part"

    try:
        asyncio.run(race())
    finally:
        for engine in engines:
            engine.dispose()
    recipients = Counter(address for mail in handler.received for address in mail.rcpt_tos)
    assert len(recipients) == 120
    assert set(recipients.values()) == {1}


def test_notifications_claimed_by_a_crashed_sender_are_sent_once_the_claim_expires(
    database_url: str, smtp_server: tuple[RecordingHandler, int]  # noqa: F811
) -> None:
    handler, smtp_port = smtp_server
    engine = make_engine(database_url)
    repository.create_tables(engine)
    registration_ids = _pending(engine, 5)
    # A sender claimed them, then its process died before sending.
    crashed = NotificationStore(engine).claim_due(now=time.time(), limit=10, lease_seconds=1.0)
    assert len(crashed) == 5

    async def restart() -> None:
        sender, mailer = _sender(engine, smtp_port)
        sender.start()
        await asyncio.sleep(0.5)
        assert handler.received == [], "a live claim is respected"
        await _until(lambda: _statuses(engine, registration_ids)[DeliveryStatus.SENT] == 5)
        await sender.stop(2.0)
        await mailer.close()

    try:
        asyncio.run(restart())
        views = [view for rid in registration_ids for view in NotificationStore(engine).list_for_registration(rid)]
    finally:
        engine.dispose()
    assert len(handler.received) == 5
    assert {view.attempts for view in views} == {2}


def test_a_stale_sender_cannot_overwrite_the_outcome_of_a_newer_claim(database_url: str) -> None:
    engine = make_engine(database_url)
    repository.create_tables(engine)
    (registration_id,) = _pending(engine, 1)
    store = NotificationStore(engine)
    try:
        (stale,) = store.claim_due(now=time.time(), limit=1, lease_seconds=0.0)
        (fresh,) = store.claim_due(now=time.time() + 0.01, limit=1, lease_seconds=60.0)
        store.record_outcomes([Delivered(fresh.id, fresh.attempt, datetime.now(UTC))])
        store.record_outcomes([GaveUp(stale.id, stale.attempt, "550 late reply from the stale sender")])
        (view,) = store.list_for_registration(registration_id)
    finally:
        engine.dispose()
    assert (stale.attempt, fresh.attempt) == (1, 2)
    assert view.status == DeliveryStatus.SENT
    assert view.last_error is None


def test_a_claim_that_would_lapse_before_its_send_ends_is_handed_back_unsent_and_uncounted(
    database_url: str, smtp_server: tuple[RecordingHandler, int]  # noqa: F811
) -> None:
    handler, smtp_port = smtp_server
    handler.data_delay_seconds = 0.3
    engine = make_engine(database_url)
    repository.create_tables(engine)
    registration_ids = _pending(engine, 4)

    async def send_slowly() -> Sender:
        # One connection, 0.3 s a message, and claims that must start sending within 0.25 s:
        # of the rows claimed together only the first can go; the others are handed back.
        mailer = SmtpMailer(host="127.0.0.1", port=smtp_port, mail_from=MAIL_FROM, max_connections=1,
                            timeout_seconds=0.5)
        sender = Sender(store=NotificationStore(engine), mailer=mailer, poll_seconds=0.1,
                        compose=message_composer(TemplateRenderer(), MAIL_FROM),
                        send_timeout_seconds=0.5, claim_lease_seconds=1.0)
        sender.start()
        await _until(lambda: _statuses(engine, registration_ids)[DeliveryStatus.SENT] == 4, timeout=15)
        await sender.stop(2.0)
        await mailer.close()
        return sender

    try:
        sender = asyncio.run(send_slowly())
        views = [view for rid in registration_ids for view in NotificationStore(engine).list_for_registration(rid)]
    finally:
        engine.dispose()
    recipients = Counter(address for mail in handler.received for address in mail.rcpt_tos)
    assert sorted(recipients.values()) == [1, 1, 1, 1]
    assert [view.attempts for view in views] == [1, 1, 1, 1]
    assert (sender.counters.sent, sender.counters.retried, sender.counters.failed) == (4, 0, 0)


def test_mail_waits_out_an_smtp_outage_and_is_delivered_once_the_server_is_back(database_url: str) -> None:
    engine = make_engine(database_url)
    repository.create_tables(engine)
    (registration_id,) = _pending(engine, 1)
    handler = RecordingHandler()
    with socket.socket() as placeholder:  # holds the port; nothing listens, so connections are refused
        placeholder.bind(("127.0.0.1", 0))
        smtp_port = int(placeholder.getsockname()[1])
        controller = Controller(handler, hostname="127.0.0.1", port=smtp_port)

        async def outage() -> None:
            mailer = SmtpMailer(host="127.0.0.1", port=smtp_port, mail_from=MAIL_FROM, timeout_seconds=2)
            sender = Sender(store=NotificationStore(engine), mailer=mailer, poll_seconds=0.1,
                            compose=message_composer(TemplateRenderer(), MAIL_FROM),
                            retry=RetryPolicy(max_attempts=50, base_delay_seconds=0.05, max_delay_seconds=0.2))
            sender.start()
            store = NotificationStore(engine)
            await _until(lambda: store.list_for_registration(registration_id)[0].attempts >= 3)
            assert handler.received == []
            placeholder.close()
            controller.start()
            await _until(lambda: _statuses(engine, [registration_id])[DeliveryStatus.SENT] == 1)
            await sender.stop(2.0)
            await mailer.close()
            assert sender.counters.retried >= 2 and sender.counters.sent == 1

        try:
            asyncio.run(outage())
            (view,) = NotificationStore(engine).list_for_registration(registration_id)
        finally:
            controller.stop()
            engine.dispose()
    assert len(handler.received) == 1
    assert view.attempts >= 3
    assert view.last_error is not None and "connect failed" in view.last_error


def test_recording_counts_exactly_the_new_rows_and_stores_every_field(database_url: str) -> None:
    engine = make_engine(database_url)
    repository.create_tables(engine)
    now = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

    def notification(i: int, kind: NotificationKind = NotificationKind.ENROLLED, name: str = "Ana") -> Notification:
        return Notification(f"reg-{i}", kind, f"student{i}@example.com", "pt-BR", name, f"c{i}", "Física <1>")

    try:
        with engine.begin() as conn:
            assert repository.add_notifications(conn, [], now) == 0
            # Twice in one batch counts once.
            assert repository.add_notifications(conn, [notification(1), notification(2), notification(1)], now) == 2
        with engine.begin() as conn:
            # Already recorded (even with other contents) adds nothing; another kind is another email.
            batch = [notification(1, name="changed"), notification(2), notification(3),
                     notification(1, NotificationKind.RECEIVED)]
            assert repository.add_notifications(conn, batch, now) == 2
        with engine.begin() as conn:
            assert repository.add_notifications(conn, [notification(i) for i in range(1, 4)], now) == 0
        store = NotificationStore(engine)
        views = store.list_for_registration("reg-1")
        (claimed,) = [claim for claim in store.claim_due(now=now.timestamp(), limit=10, lease_seconds=30)
                      if claim.notification.registration_id == "reg-1"
                      and claim.notification.kind == NotificationKind.ENROLLED]
        assert store.claim_due(now=now.timestamp() - 1, limit=10, lease_seconds=30) == [], "due exactly at `now`"
    finally:
        engine.dispose()
    assert sorted(view.kind for view in views) == sorted([NotificationKind.ENROLLED, NotificationKind.RECEIVED])
    assert {(view.status, view.attempts, view.create_time, view.send_time, view.last_error) for view in views} == {
        (DeliveryStatus.PENDING, 0, now, None, None)}
    assert claimed.notification == notification(1)
    assert claimed.attempt == 1
