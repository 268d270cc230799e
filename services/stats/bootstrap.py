"""Wires the stats service: settings, database, the enrollment-events consumer, the servicer.

The gRPC port opens first (health NOT_SERVING); the start hook then opens the
database, creates the tables, waits for Kinesis and the stream, and starts the
consumer; health turns SERVING once the consumer holds its first leases.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import grpc
from sqlalchemy import Engine

from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs import consumer as consumer_lib
from libs.db import make_engine, wait_for_database
from libs.errors import Unavailable
from libs.grpc_server import ServiceHooks, in_daemon_thread, run_service
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, ensure_stream, kinesis_client, wait_for_kinesis
from services.stats.adapters.tables import create_schema
from services.stats.entrypoints.grpc_api import StatsServicer
from services.stats.service_layer.projection import project_batch
from services.stats.service_layer.rebuild import complete_older_read_model
from services.stats.settings import StatsSettings

log = logging.getLogger(__name__)

SERVICE_NAME = stats_pb2.DESCRIPTOR.services_by_name["StatsService"].full_name


class StatsRuntime:
    """What the stats service opens at start and closes at stop."""

    def __init__(self, settings: StatsSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.consumer: consumer_lib.StreamConsumer | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def read_engine(self) -> Engine:
        engine = self.engine
        if engine is None:
            raise Unavailable("the stats service is starting; retry shortly")
        return engine

    def start(self) -> None:
        """Blocking start-up (run in a daemon thread); returns once the consumer is ready."""
        settings = self.settings
        engine = make_engine(settings.stats_database_url, idle_in_transaction_seconds=2 * settings.lease_seconds)
        wait_for_database(engine)
        create_schema(engine)
        if complete_older_read_model(engine):
            log.info("counted the aggregates an older version of the read model lacked")
        self.engine = engine
        client = kinesis_client(settings.aws_region, settings.aws_endpoint_url_kinesis)
        wait_for_kinesis(client)
        stream = settings.stream_name(ENROLLMENT_EVENTS_STREAM)
        ensure_stream(client, stream, settings.kinesis_shard_count)
        consumer = consumer_lib.StreamConsumer(
            engine=engine,
            kinesis=client,
            stream_name=stream,
            handler=project_batch,
            worker_id=settings.worker_id,
            lease_seconds=settings.lease_seconds,
        )
        with self._lock:
            if self._stopping.is_set():
                engine.dispose()
                return
            consumer.start()
            self.consumer = consumer
        # Poll rather than block, so this thread ends if the service stops during start-up.
        while not consumer.ready.wait(0.2):
            if self._stopping.is_set():
                return
        log.info("consuming", extra={"stream": stream, "worker": consumer.worker_id})

    def stop(self) -> None:
        """Finishes the batch in progress, hands back the leases, closes the database."""
        with self._lock:
            self._stopping.set()
            consumer = self.consumer
        if consumer is not None:
            consumer.stop()
        if self.engine is not None:
            self.engine.dispose()


def build_hooks(settings: StatsSettings) -> ServiceHooks:
    runtime = StatsRuntime(settings)

    def register(server: grpc.aio.Server) -> None:
        stats_pb2_grpc.add_StatsServiceServicer_to_server(
            StatsServicer(runtime.read_engine, settings.stats_page_token_secret.encode()), server
        )

    async def start() -> None:
        await in_daemon_thread(runtime.start)

    async def stop() -> None:
        await asyncio.to_thread(runtime.stop)

    return ServiceHooks.for_service(
        settings,
        name="stats",
        port=settings.stats_port,
        register=register,
        service_name=SERVICE_NAME,
        start=start,
        stop=stop,
    )


def main() -> None:
    run_service("stats", StatsSettings(), build_hooks)
