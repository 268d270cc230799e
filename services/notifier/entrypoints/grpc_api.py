"""The gRPC API: ListNotifications, the log of emails sent about one registration."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from libs.errors import InvalidArgument, Unavailable
from services.notifier.adapters.repository import NotificationStore
from services.notifier.domain.model import DeliveryStatus, NotificationView
from services.notifier.entrypoints.stream import KIND_TO_PROTO, MAX_REGISTRATION_ID_CHARS

SERVICE_NAME = notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name

_STATUS_TO_PROTO = {
    DeliveryStatus.PENDING: notifier_pb2.DELIVERY_STATUS_PENDING,
    DeliveryStatus.SENT: notifier_pb2.DELIVERY_STATUS_SENT,
    DeliveryStatus.FAILED: notifier_pb2.DELIVERY_STATUS_FAILED,
}


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _to_proto(view: NotificationView) -> notifier_pb2.Notification:
    message = notifier_pb2.Notification(
        registration_id=view.registration_id,
        kind=KIND_TO_PROTO[view.kind],
        recipient=view.recipient,
        status=_STATUS_TO_PROTO[view.status],
        attempts=view.attempts,
        last_error=view.last_error or "",
        create_time=_timestamp(view.create_time),
    )
    if view.send_time is not None:
        message.send_time.CopyFrom(_timestamp(view.send_time))
    return message


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(self, store: Callable[[], NotificationStore | None]) -> None:
        # The store exists once the service's start-up made the engine.
        self._store = store

    async def ListNotifications(
        self, request: notifier_pb2.ListNotificationsRequest, context: grpc.aio.ServicerContext
    ) -> notifier_pb2.ListNotificationsResponse:
        registration_id = request.registration_id.strip()
        if not registration_id:
            raise InvalidArgument.single("registration_id", "is required")
        if len(registration_id) > MAX_REGISTRATION_ID_CHARS:
            raise InvalidArgument.single(
                "registration_id", f"must be at most {MAX_REGISTRATION_ID_CHARS} characters"
            )
        if "\x00" in registration_id:
            raise InvalidArgument.single("registration_id", "must not contain NUL characters")
        store = self._store()
        if store is None:
            raise Unavailable("the notifier is starting; try again shortly")
        views = await asyncio.to_thread(store.list_for_registration, registration_id)
        return notifier_pb2.ListNotificationsResponse(notifications=[_to_proto(view) for view in views])
