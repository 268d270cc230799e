"""Wires the registration service: Kinesis batchers, the catalogue cache, gRPC."""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2_grpc
from libs.grpc_server import ServiceHooks, in_daemon_thread, run_service
from libs.kinesis import (
    REGISTRATIONS_STREAM,
    RecordBatcher,
    ensure_stream,
    kinesis_client,
    wait_for_kinesis,
)
from services.registration.adapters.catalogue import Catalogue
from services.registration.domain.registration_ids import RegistrationIds
from services.registration.entrypoints.grpc_api import SERVICE_NAME, RegistrationServicer
from services.registration.settings import RegistrationSettings

log = logging.getLogger(__name__)


def build_hooks(settings: RegistrationSettings, *, worker: int | None = None) -> ServiceHooks:
    """The service's hooks; `worker` is this process's index when it is one of several sharing the port."""
    client = kinesis_client(settings.aws_region, max_pool_connections=32)
    parts: dict[str, Any] = {}

    def register(server: grpc.aio.Server) -> None:
        # Runs inside the server's event loop, so the asyncio parts can be built here.
        channel = grpc.aio.insecure_channel(settings.enrollment_target)
        wait = settings.register_batch_millis / 1000
        parts.update(
            channel=channel,
            catalogue=Catalogue(channel),
            commands=RecordBatcher(client, settings.stream_name(REGISTRATIONS_STREAM), max_wait_seconds=wait,
                                   max_in_flight=settings.register_max_in_flight),
        )
        parts["servicer"] = RegistrationServicer(
            RegistrationIds(settings.registration_id_secret),
            parts["catalogue"],
            enrollment_pb2_grpc.EnrollmentServiceStub(channel),
            parts["commands"],
            max_pending=settings.register_max_pending,
            retry_delay_seconds=settings.register_retry_delay_millis / 1000,
        )
        registration_pb2_grpc.add_RegistrationServiceServicer_to_server(parts["servicer"], server)

    async def start() -> None:
        await in_daemon_thread(wait_for_kinesis, client)
        await in_daemon_thread(ensure_stream, client, settings.stream_name(REGISTRATIONS_STREAM),
                               settings.kinesis_shard_count)
        parts["catalogue"].start()
        parts["commands"].start()
        parts["servicer"].ready = True

    async def stop() -> None:
        servicer, commands = parts["servicer"], parts["commands"]
        log.info("registration worker stopped", extra={
            "worker": worker, "pid": os.getpid(), "register_accepted": servicer.accepted,
            "register_refused_overload": servicer.shed, "put_records_calls": commands.batches_sent,
            "records_per_put": round(commands.records_sent / max(commands.batches_sent, 1), 1)})
        await parts["commands"].close()
        await parts["catalogue"].close()
        await parts["channel"].close()

    hooks = ServiceHooks.for_service(
        settings,
        name="registration",
        port=settings.registration_port,
        register=register,
        service_name=SERVICE_NAME,
        start=start,
        stop=stop,
    )
    hooks.reuse_port = worker is not None
    return hooks


def serve_worker(settings: RegistrationSettings, worker: int | None = None) -> None:
    """Serves in this process (alone, or as worker `worker` of several) until SIGTERM."""
    run_service("registration", settings, lambda s: build_hooks(s, worker=worker))
