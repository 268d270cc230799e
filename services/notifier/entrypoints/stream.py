"""The notifications stream entrypoint: the StreamConsumer's batch handler.

Runs inside the consumer's checkpoint transaction: decodes each record's
SendNotification (undecodable or incomplete records go to dead letters) and records
the notifications. It never talks to SMTP, so the checkpoint never waits for email.
"""

from __future__ import annotations

from sqlalchemy import Connection

from coursesignup.events.v1 import events_pb2
from libs.consumer import StreamRecord, decode_or_dead_letter
from libs.envelope import MalformedRecord, decode_envelope
from services.notifier.domain.model import Notification, NotificationKind
from services.notifier.service_layer import handlers

KIND_FROM_PROTO = {
    events_pb2.NOTIFICATION_KIND_RECEIVED: NotificationKind.RECEIVED,
    events_pb2.NOTIFICATION_KIND_ENROLLED: NotificationKind.ENROLLED,
    events_pb2.NOTIFICATION_KIND_DECLINED_FULL: NotificationKind.DECLINED_FULL,
    events_pb2.NOTIFICATION_KIND_DECLINED_DUPLICATE: NotificationKind.DECLINED_DUPLICATE,
    events_pb2.NOTIFICATION_KIND_CANCELLED: NotificationKind.CANCELLED,
    events_pb2.NOTIFICATION_KIND_WAITLISTED: NotificationKind.WAITLISTED,
    events_pb2.NOTIFICATION_KIND_PROMOTED: NotificationKind.PROMOTED,
}
KIND_TO_PROTO = {kind: proto for proto, kind in KIND_FROM_PROTO.items()}

# Column sizes of the notifications table.
MAX_REGISTRATION_ID_CHARS = 256
MAX_EMAIL_CHARS = 320
MAX_COURSE_ID_CHARS = 128
MAX_LOCALE_CHARS = 16


def decode_send_notification(data: bytes) -> Notification:
    """The notification a record asks for; MalformedRecord (a ValueError) if it cannot be sent."""
    envelope = decode_envelope(data)
    body = envelope.WhichOneof("body")
    if body != "send_notification":
        raise MalformedRecord(f"unexpected {body} on the notifications stream")
    command = envelope.send_notification
    kind = KIND_FROM_PROTO.get(command.kind)
    if kind is None:
        raise MalformedRecord(f"SendNotification with unknown kind {command.kind}")
    return Notification(
        registration_id=_identifier(command.registration_id, "registration_id", MAX_REGISTRATION_ID_CHARS),
        kind=kind,
        recipient=_identifier(command.email, "email", MAX_EMAIL_CHARS),
        # Free text is kept, minus NUL, which PostgreSQL text cannot hold.
        locale=command.locale.replace("\x00", "")[:MAX_LOCALE_CHARS],
        name=command.name.replace("\x00", ""),
        course_id=_identifier(command.course_id, "course_id", MAX_COURSE_ID_CHARS, required=False),
        course_name=command.course_name.replace("\x00", ""),
    )


def _identifier(value: str, field: str, max_chars: int, required: bool = True) -> str:
    # A value the table cannot hold would fail the whole batch on every redelivery:
    # such a record is malformed and goes to dead letters instead.
    if required and not value:
        raise MalformedRecord(f"SendNotification without {field}")
    if len(value) > max_chars:
        raise MalformedRecord(f"SendNotification {field} longer than {max_chars} characters")
    if "\x00" in value:
        raise MalformedRecord(f"SendNotification {field} contains NUL")
    return value


def handle_batch(conn: Connection, records: list[StreamRecord]) -> None:
    decoded = decode_or_dead_letter(conn, records, decode_send_notification)
    handlers.record_notifications(conn, [notification for _, notification in decoded])
