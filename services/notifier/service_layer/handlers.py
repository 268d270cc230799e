"""Command handlers: recording SendNotification commands, and building their messages."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import Connection

from services.notifier.adapters import repository
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.messages import compose_message
from services.notifier.domain.model import Notification
from services.notifier.service_layer.sender import Composer

log = logging.getLogger(__name__)


def record_notifications(conn: Connection, commands: Sequence[Notification]) -> int:
    """Adds the commands as PENDING notifications in the caller's transaction.

    A command already recorded (same registration and kind: Kinesis redelivered it, or
    an upstream relay published it twice) adds nothing. No email is sent here: the
    sender picks the rows up after the transaction commits.
    """
    added = repository.add_notifications(conn, commands, datetime.now(UTC))
    if len(commands) > added:
        log.info("duplicate notification commands ignored", extra={"count": len(commands) - added})
    return added


def message_composer(renderer: TemplateRenderer, mail_from: str) -> Composer:
    def compose(notification: Notification, recipient: str) -> bytes:
        return compose_message(
            renderer.render(notification), mail_from=mail_from, recipient=recipient,
            kind=notification.kind.value, registration_id=notification.registration_id,
        )

    return compose
