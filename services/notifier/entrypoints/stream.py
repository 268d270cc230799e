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
}
KIND_TO_PROTO = {kind: proto for proto, kind in KIND_FROM_PROTO.items()}


def decode_send_notification(data: bytes) -> Notification:
    """The notification a record asks for; MalformedRecord (a ValueError) if it cannot be sent."""
    envelope = decode_envelope(data)
    body = envelope.WhichOneof("body")
    if body != "send_notification":
        raise MalformedRecord(f"unexpected {body} on the notifications stream")
    command = envelope.send_notification
    if not command.registration_id:
        raise MalformedRecord("SendNotification without registration_id")
    kind = KIND_FROM_PROTO.get(command.kind)
    if kind is None:
        raise MalformedRecord(f"SendNotification with unknown kind {command.kind}")
    if not command.email:
        raise MalformedRecord("SendNotification without email")
    return Notification(
        registration_id=command.registration_id,
        kind=kind,
        recipient=command.email,
        locale=command.locale,
        name=command.name,
        course_id=command.course_id,
        course_name=command.course_name,
    )


def handle_batch(conn: Connection, records: list[StreamRecord]) -> None:
    decoded = decode_or_dead_letter(conn, records, decode_send_notification)
    handlers.record_notifications(conn, [notification for _, notification in decoded])
