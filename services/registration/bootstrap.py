"""Wires the registration service: Kinesis batchers, the catalogue cache, gRPC."""

from __future__ import annotations

from typing import Any

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2_grpc
from libs.config import RegistrationSettings
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


def build_hooks(settings: RegistrationSettings) -> ServiceHooks:
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
        await parts["commands"].close()
        await parts["catalogue"].close()
        await parts["channel"].close()

    return ServiceHooks.for_service(
        settings,
        name="registration",
        port=settings.registration_port,
        register=register,
        service_name=SERVICE_NAME,
        start=start,
        stop=stop,
    )


def main() -> None:
    run_service("registration", RegistrationSettings(), build_hooks)
