"""Wires the enrollment service: database, Kinesis streams, consumer, outbox relay, gRPC."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs.db import ensure_schema, make_engine, wait_for_database
from libs.grpc_server import ServiceHooks, in_daemon_thread, run_service
from libs.kinesis import (
    ENROLLMENT_EVENTS_STREAM,
    REGISTRATIONS_STREAM,
    ensure_stream,
    kinesis_client,
    wait_for_kinesis,
)
from services.enrollment.adapters.tables import metadata
from services.enrollment.entrypoints.grpc_api import SERVICE_NAME, EnrollmentServicer
from services.enrollment.service_layer.catalogue import seed_demo_catalogue
from services.enrollment.service_layer.deciding import decide_batch
from services.enrollment.settings import EnrollmentSettings

log = logging.getLogger(__name__)


@dataclass
class EnrollmentApp:
    settings: EnrollmentSettings
    engine: Any = None
    consumer: consumer_lib.StreamConsumer | None = None
    relay: outbox_lib.OutboxRelay | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        settings = self.settings
        wait_for_database(self.engine)
        ensure_schema(self.engine, metadata, consumer_lib.metadata, outbox_lib.metadata)
        if settings.seed_demo_catalogue and seed_demo_catalogue(self.engine):
            log.info("demo catalogue loaded")
        client = kinesis_client(settings.aws_region)
        wait_for_kinesis(client)
        for base in (REGISTRATIONS_STREAM, ENROLLMENT_EVENTS_STREAM):
            ensure_stream(client, settings.stream_name(base), settings.kinesis_shard_count)
        self.relay = outbox_lib.OutboxRelay(self.engine, client)
        self.relay.start()
        self.consumer = consumer_lib.StreamConsumer(
            engine=self.engine,
            kinesis=client,
            stream_name=settings.stream_name(REGISTRATIONS_STREAM),
            handler=functools.partial(decide_batch, stream=settings.stream_name(ENROLLMENT_EVENTS_STREAM)),
            worker_id=settings.worker_id,
            lease_seconds=settings.lease_seconds,
            on_commit=self.relay.wake,
        )
        self.consumer.start()
        self.consumer.ready.wait(60)

    def stop(self) -> None:
        if self.consumer:
            self.consumer.stop()
        if self.relay:
            self.relay.stop()


def build_hooks(settings: EnrollmentSettings) -> ServiceHooks:
    app = EnrollmentApp(
        settings,
        engine=make_engine(settings.enrollment_database_url, idle_in_transaction_seconds=2 * settings.lease_seconds),
    )

    def register(server: grpc.aio.Server) -> None:
        servicer = EnrollmentServicer(app.engine, settings.enrollment_admin_token)
        enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server(servicer, server)

    async def start() -> None:
        await in_daemon_thread(app.start)

    async def stop() -> None:
        await asyncio.to_thread(app.stop)
        app.engine.dispose()

    return ServiceHooks.for_service(
        settings,
        name="enrollment",
        port=settings.enrollment_port,
        register=register,
        service_name=SERVICE_NAME,
        start=start,
        stop=stop,
    )


def main() -> None:
    run_service("enrollment", EnrollmentSettings(), build_hooks)
