"""Wires the notifier: settings, database, Kinesis consumer, SMTP pool, sender, gRPC API.

`build_hooks` gives the shared server bootstrap (libs.grpc_server) what it needs:
start-up creates the tables, waits for Kinesis, makes sure the streams it reads exist
(`registrations` for the "received" email, `enrollment-events` for the decision
emails), starts the sender, one stream consumer per stream and the periodic metrics
log line, and returns once the consumers hold their leases; shutdown stops the
consumers (each finishes and checkpoints its batch), lets the sender finish sends in
flight briefly, and closes SMTP connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from sqlalchemy import Engine

from coursesignup.notifier.v1 import notifier_pb2_grpc
from libs import consumer as consumer_lib
from libs.db import make_engine, wait_for_database
from libs.grpc_server import ServiceHooks, in_daemon_thread, run_service
from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM, ensure_stream, kinesis_client, wait_for_kinesis
from services.notifier.adapters import repository
from services.notifier.adapters.repository import NotificationStore
from services.notifier.adapters.smtp import SmtpMailer
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.model import RetryPolicy
from services.notifier.entrypoints import stream
from services.notifier.entrypoints.grpc_api import SERVICE_NAME, NotifierServicer
from services.notifier.service_layer import metrics
from services.notifier.service_layer.handlers import message_composer
from services.notifier.service_layer.sender import Sender
from services.notifier.settings import NotifierSettings

log = logging.getLogger(__name__)

# How long shutdown waits for emails already being sent.
SEND_GRACE_SECONDS = 5.0


class Notifier:
    """The running parts of one notifier process."""

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.engine: Engine | None = None
        self.store: NotificationStore | None = None
        self.consumers: list[consumer_lib.StreamConsumer] = []
        self.sender: Sender | None = None
        self.mailer: SmtpMailer | None = None
        self._metrics_stop = asyncio.Event()
        self._metrics_task: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        notifier_pb2_grpc.add_NotifierServiceServicer_to_server(
            NotifierServicer(lambda: self.store, self.delivery_stats), server
        )

    async def delivery_stats(self) -> metrics.DeliveryStats | None:
        """None until start-up made the store and the sender."""
        if self.store is None or self.sender is None:
            return None
        return await metrics.collect(self.sender.counters, self.sender.in_flight, self.store.delivery_stats)

    async def start(self) -> None:
        settings = self.settings
        engine = self.engine = make_engine(
            settings.notifier_database_url, idle_in_transaction_seconds=2 * settings.lease_seconds
        )

        def create_tables() -> None:
            wait_for_database(engine)
            repository.create_tables(engine)

        await in_daemon_thread(create_tables)
        self.store = NotificationStore(engine)

        kinesis = kinesis_client(settings.aws_region)
        await in_daemon_thread(wait_for_kinesis, kinesis)
        streams = {
            settings.stream_name(REGISTRATIONS_STREAM): stream.handle_registrations,
            settings.stream_name(ENROLLMENT_EVENTS_STREAM): stream.handle_enrollment_events,
        }
        for stream_name in streams:
            await in_daemon_thread(ensure_stream, kinesis, stream_name, settings.kinesis_shard_count)

        self.mailer = SmtpMailer(
            host=settings.smtp_host,
            port=settings.smtp_port,
            mail_from=settings.mail_from,
            username=settings.smtp_username,
            password=settings.smtp_password,
            starttls=settings.smtp_starttls,
            timeout_seconds=settings.smtp_timeout_seconds,
            max_connections=settings.smtp_max_connections,
        )
        self.sender = Sender(
            store=self.store,
            mailer=self.mailer,
            compose=message_composer(TemplateRenderer(), settings.mail_from),
            retry=RetryPolicy(
                max_attempts=settings.notifier_max_attempts,
                base_delay_seconds=settings.notifier_retry_base_seconds,
                max_delay_seconds=settings.notifier_retry_max_seconds,
            ),
            send_timeout_seconds=settings.smtp_timeout_seconds,
            claim_lease_seconds=settings.notifier_claim_seconds,
        )
        self.sender.start()
        self._metrics_task = asyncio.create_task(
            metrics.log_periodically(self._stats_for_log, settings.notifier_metrics_log_seconds, self._metrics_stop),
            name="notifier-metrics",
        )

        for stream_name, handler in streams.items():
            consumer = consumer_lib.StreamConsumer(
                engine=engine,
                kinesis=kinesis,
                stream_name=stream_name,
                handler=handler,
                worker_id=settings.worker_id,
                lease_seconds=settings.lease_seconds,
                on_commit=self.sender.wake_threadsafe,
            )
            await asyncio.to_thread(consumer.start)
            self.consumers.append(consumer)
        # Polled rather than waited in a thread, so a shutdown during start-up is not stuck.
        while not all(consumer.ready.is_set() for consumer in self.consumers):
            await asyncio.sleep(0.05)
        log.info("notifier started", extra={"streams": list(streams),
                                            "smtp": f"{settings.smtp_host}:{settings.smtp_port}"})

    async def _stats_for_log(self) -> metrics.DeliveryStats:
        stats = await self.delivery_stats()
        assert stats is not None  # the log task starts after the sender
        return stats

    async def stop(self) -> None:
        self._metrics_stop.set()
        if self._metrics_task is not None:
            with contextlib.suppress(Exception):
                await self._metrics_task
        for consumer in self.consumers:
            await asyncio.to_thread(consumer.stop)
        if self.sender is not None:
            await self.sender.stop(min(SEND_GRACE_SECONDS, self.settings.shutdown_grace_seconds))
        if self.mailer is not None:
            await self.mailer.close()
        if self.engine is not None:
            self.engine.dispose()


def build_hooks(settings: NotifierSettings) -> ServiceHooks:
    notifier = Notifier(settings)
    return ServiceHooks.for_service(
        settings,
        name="notifier",
        port=settings.notifier_port,
        register=notifier.register,
        service_name=SERVICE_NAME,
        start=notifier.start,
        stop=notifier.stop,
    )


def main() -> None:
    run_service("notifier", NotifierSettings(), build_hooks)
