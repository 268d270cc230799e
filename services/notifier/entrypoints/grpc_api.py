"""The gRPC API: ListNotifications (the log of emails about one registration) and
GetDeliveryStats (sent, failed and retried counters, and the queue depth)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf import duration_pb2

from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from libs.errors import InvalidArgument
from libs.proto_time import timestamp
from services.notifier.adapters.repository import NotificationStore
from services.notifier.domain.model import DeliveryStatus, NotificationView
from services.notifier.entrypoints.stream import KIND_TO_PROTO, MAX_REGISTRATION_ID_CHARS
from services.notifier.service_layer.metrics import DeliveryStats

SERVICE_NAME = notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name

_STATUS_TO_PROTO = {
    DeliveryStatus.PENDING: notifier_pb2.DELIVERY_STATUS_PENDING,
    DeliveryStatus.SENT: notifier_pb2.DELIVERY_STATUS_SENT,
    DeliveryStatus.FAILED: notifier_pb2.DELIVERY_STATUS_FAILED,
}


def _to_proto(view: NotificationView) -> notifier_pb2.Notification:
    message = notifier_pb2.Notification(
        registration_id=view.registration_id,
        kind=KIND_TO_PROTO[view.kind],
        recipient=view.recipient,
        status=_STATUS_TO_PROTO[view.status],
        attempts=view.attempts,
        last_error=view.last_error or "",
        create_time=timestamp(view.create_time),
    )
    if view.send_time is not None:
        message.send_time.CopyFrom(timestamp(view.send_time))
    return message


class NotifierServicer(notifier_pb2_grpc.NotifierServiceServicer):
    def __init__(
        self,
        store: NotificationStore,
        stats: Callable[[], Awaitable[DeliveryStats]],
    ) -> None:
        self._store = store
        self._stats = stats

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
        views = await asyncio.to_thread(self._store.list_for_registration, registration_id)
        return notifier_pb2.ListNotificationsResponse(notifications=[_to_proto(view) for view in views])

    async def GetDeliveryStats(
        self, request: notifier_pb2.GetDeliveryStatsRequest, context: grpc.aio.ServicerContext
    ) -> notifier_pb2.GetDeliveryStatsResponse:
        stats = await self._stats()
        counters, queue = stats.counters, stats.queue
        age = duration_pb2.Duration()
        age.FromMilliseconds(round(queue.oldest_pending_seconds * 1000))
        return notifier_pb2.GetDeliveryStatsResponse(
            start_time=timestamp(counters.start_time),
            sent_since_start=counters.sent,
            failed_since_start=counters.failed,
            retried_since_start=counters.retried,
            in_flight=stats.in_flight,
            pending_count=queue.pending,
            due_count=queue.due,
            retrying_count=queue.retrying,
            failed_count=queue.failed,
            oldest_pending_age=age,
        )
