"""The stream entrypoints: which facts call for an email, declared to the runtime (libs.worker).

The notifier is a second consumer application of two streams that other services
already read (a standard Kinesis fan-out, with its own leases and checkpoints):
`registrations` (RegisterStudent: the "received" email; cancellation commands mean
nothing here, the cancellation event does) and `enrollment-events` (the decision:
enrolled, class full, already enrolled, waitlisted with its position; then promoted from
the waiting list, cancelled). Each fact is written once, by its
producer, and no email depends on a second record. The handlers run inside the
consumer's checkpoint transaction and only record notifications; they never talk to
SMTP, so the checkpoint never waits for email. The runtime decodes each record once;
records that do not decode, or that the parse functions here find incomplete, go to
dead letters.
"""

from __future__ import annotations

import dataclasses

from google.protobuf import timestamp_pb2
from sqlalchemy import Connection

from coursesignup.events.v1 import events_pb2
from libs.envelope import MalformedRecord
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from libs.worker import Consume, Handle, Message
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

_DECLINED_KIND = {
    events_pb2.DECLINE_REASON_FULL: NotificationKind.DECLINED_FULL,
    events_pb2.DECLINE_REASON_DUPLICATE: NotificationKind.DECLINED_DUPLICATE,
    # An unknown course gets no email: Register refuses unknown courses, so this is only
    # a course deleted between acceptance and decision.
    events_pb2.DECLINE_REASON_UNKNOWN_COURSE: None,
}

# Column sizes of the notifications table.
MAX_REGISTRATION_ID_CHARS = 256
MAX_EMAIL_CHARS = 320
MAX_COURSE_ID_CHARS = 128
MAX_LOCALE_CHARS = 16


def received_notification(envelope: events_pb2.Envelope) -> Notification:
    """The "received" email a sign-up calls for; MalformedRecord if it cannot be sent."""
    command = envelope.register_student
    return _notification(NotificationKind.RECEIVED, "register_student", command.registration_id, command.email,
                         command.name, command.course_id, command.course_name, command.locale,
                         _epoch(command.accept_time, envelope))


def enrolled_notification(envelope: events_pb2.Envelope) -> Notification:
    """The "enrolled" email, or "promoted" for a seat from the waiting list; MalformedRecord if it cannot be sent."""
    event = envelope.student_enrolled
    kind = NotificationKind.PROMOTED if event.promoted else NotificationKind.ENROLLED
    return _notification(kind, "student_enrolled", event.registration_id,
                         event.contact_email or event.email, event.name, event.course_id, event.course_name,
                         event.locale, _epoch(event.enroll_time, envelope))


def declined_notification(envelope: events_pb2.Envelope) -> Notification | None:
    """The email a declined registration calls for (None: no email); MalformedRecord if it cannot be sent."""
    declined = envelope.registration_declined
    if declined.reason not in _DECLINED_KIND:
        raise MalformedRecord(f"registration_declined with unknown reason {declined.reason}")
    kind = _DECLINED_KIND[declined.reason]
    if kind is None:
        return None
    return _notification(kind, "registration_declined", declined.registration_id, declined.contact_email,
                         declined.name, declined.course_id, declined.course_name, declined.locale,
                         _epoch(declined.decide_time, envelope))


def waitlisted_notification(envelope: events_pb2.Envelope) -> Notification:
    """The "waiting list" email, with the place in line; MalformedRecord if it cannot be sent."""
    event = envelope.registration_waitlisted
    notification = _notification(NotificationKind.WAITLISTED, "registration_waitlisted", event.registration_id,
                                 event.contact_email, event.name, event.course_id, event.course_name, event.locale,
                                 _epoch(event.decide_time, envelope))
    return dataclasses.replace(notification, waitlist_position=max(0, event.waitlist_position))


def cancelled_notification(envelope: events_pb2.Envelope) -> Notification | None:
    """The "cancelled" email (None: no address known, a registration cancelled before it was
    ever decided); MalformedRecord if it cannot be sent."""
    event = envelope.registration_cancelled
    if not event.contact_email:
        return None
    return _notification(NotificationKind.CANCELLED, "registration_cancelled", event.registration_id,
                         event.contact_email, event.name, event.course_id, event.course_name, event.locale,
                         _epoch(event.cancel_time, envelope))


def _epoch(moment: timestamp_pb2.Timestamp, envelope: events_pb2.Envelope) -> float | None:
    """When the fact happened (the body's own time, else the envelope's), epoch seconds; None if neither."""
    if not (moment.seconds or moment.nanos):
        moment = envelope.time
    if not (moment.seconds or moment.nanos):
        return None
    return moment.seconds + moment.nanos / 1e9


def _notification(kind: NotificationKind, body: str, registration_id: str, email: str, name: str, course_id: str,
                  course_name: str, locale: str, event_time: float | None) -> Notification:
    return Notification(
        registration_id=_identifier(registration_id, body, "registration_id", MAX_REGISTRATION_ID_CHARS),
        kind=kind,
        recipient=_identifier(email, body, "contact_email" if body != "register_student" else "email",
                              MAX_EMAIL_CHARS),
        # Free text is kept, minus NUL, which PostgreSQL text cannot hold.
        locale=locale.replace("\x00", "")[:MAX_LOCALE_CHARS],
        name=name.replace("\x00", ""),
        course_id=_identifier(course_id, body, "course_id", MAX_COURSE_ID_CHARS, required=False),
        course_name=course_name.replace("\x00", ""),
        event_time=event_time,
    )


def _identifier(value: str, body: str, field: str, max_chars: int, required: bool = True) -> str:
    # A value the table cannot hold would fail the whole batch on every redelivery:
    # such a record is malformed and goes to dead letters instead.
    if required and not value:
        raise MalformedRecord(f"{body} without {field}")
    if len(value) > max_chars:
        raise MalformedRecord(f"{body} {field} longer than {max_chars} characters")
    if "\x00" in value:
        raise MalformedRecord(f"{body} {field} contains NUL")
    return value


def record(conn: Connection, messages: list[Message[Notification | None]]) -> None:
    """Records the notifications a run of messages calls for (the sender sends them after commit),
    each with the traceparent of its record's span (tracing on), which the send continues."""
    handlers.record_notifications(conn, [
        dataclasses.replace(message.body, trace_parent=message.trace_context.get("traceparent", ""))
        if message.trace_context else message.body
        for message in messages if message.body is not None
    ])


# The notifier is a second consumer application of both streams (a Kinesis fan-out).
REGISTRATIONS = Consume(REGISTRATIONS_STREAM, {"register_student": Handle(record, received_notification)},
                        ignore=frozenset({"cancel_registration"}))
ENROLLMENT_EVENTS = Consume(ENROLLMENT_EVENTS_STREAM, {
    "student_enrolled": Handle(record, enrolled_notification),
    "registration_declined": Handle(record, declined_notification),
    "registration_waitlisted": Handle(record, waitlisted_notification),
    "registration_cancelled": Handle(record, cancelled_notification),
})
