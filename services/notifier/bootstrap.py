"""The notifier, declared: it reads `registrations` (the "received" email) and
`enrollment-events` (the decision emails) as a second consumer application of both
streams, records one notification per email in its database, and its sender delivers
them over a pool of SMTP connections. The runtime (libs.worker) does the rest; the
sender, the SMTP pool and the periodic metrics line are this service's own parts:
started before the consumers, stopped after them (sends in flight get a short grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client.core import GaugeMetricFamily

from coursesignup.notifier.v1 import notifier_pb2_grpc
from libs.config import load_settings
from libs.grpc_server import ServiceHooks, run_service
from libs.worker import Runtime, Service, Servicer
from services.notifier.adapters.repository import NotificationStore, metadata
from services.notifier.adapters.smtp import SmtpMailer
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.model import RetryPolicy
from services.notifier.entrypoints.grpc_api import SERVICE_NAME, NotifierServicer
from services.notifier.entrypoints.stream import ENROLLMENT_EVENTS, REGISTRATIONS
from services.notifier.migrations import MIGRATIONS
from services.notifier.service_layer import metrics
from services.notifier.service_layer.handlers import message_composer
from services.notifier.service_layer.sender import Sender
from services.notifier.settings import NotifierSettings

log = logging.getLogger(__name__)

# How long shutdown waits for emails already being sent.
SEND_GRACE_SECONDS = 5.0


def _servicers(runtime: Runtime[NotifierSettings]) -> list[Servicer]:
    settings = runtime.settings
    assert runtime.engine is not None
    store = NotificationStore(runtime.engine)
    mailer = SmtpMailer(
        host=settings.smtp_host,
        port=settings.smtp_port,
        mail_from=settings.mail_from,
        username=settings.smtp_username,
        password=settings.smtp_password,
        starttls=settings.smtp_starttls,
        timeout_seconds=settings.smtp_timeout_seconds,
        max_connections=settings.smtp_max_connections,
    )
    sender = Sender(
        store=store,
        mailer=mailer,
        compose=message_composer(TemplateRenderer(), settings.mail_from),
        retry=RetryPolicy(
            max_attempts=settings.notifier_max_attempts,
            base_delay_seconds=settings.notifier_retry_base_seconds,
            max_delay_seconds=settings.notifier_retry_max_seconds,
        ),
        send_timeout_seconds=settings.smtp_timeout_seconds,
        claim_lease_seconds=settings.notifier_claim_seconds,
    )

    async def delivery_stats() -> metrics.DeliveryStats:
        return await metrics.collect(sender.counters, sender.in_flight, store.delivery_stats)

    metrics_stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []

    def start() -> None:
        sender.start()
        tasks.append(asyncio.create_task(
            metrics.log_periodically(delivery_stats, settings.notifier_metrics_log_seconds, metrics_stop),
            name="notifier-metrics"))
        log.info("sending", extra={"smtp": f"{settings.smtp_host}:{settings.smtp_port}"})

    async def stop() -> None:
        metrics_stop.set()
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
        await sender.stop(min(SEND_GRACE_SECONDS, settings.shutdown_grace_seconds))
        await mailer.close()

    def pool_gauges() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("coursesignup_smtp_connections_busy", "SMTP connections carrying a message now.",
                              value=mailer.busy),
            GaugeMetricFamily("coursesignup_smtp_connections_max", "SMTP_MAX_CONNECTIONS.",
                              value=mailer.max_connections),
            GaugeMetricFamily("coursesignup_emails_in_flight", "Emails being sent now.", value=sender.in_flight),
        ]

    runtime.gauges(pool_gauges)
    runtime.on_start(start)
    runtime.on_stop(stop)
    runtime.after_commit(sender.wake_threadsafe)
    return [Servicer(notifier_pb2_grpc.add_NotifierServiceServicer_to_server,
                     NotifierServicer(store, delivery_stats), SERVICE_NAME,
                     admin_methods=("ListNotifications",))]  # recipients' addresses and names


def service(settings: NotifierSettings) -> Service[NotifierSettings]:
    return Service(
        name="notifier",
        settings=settings,
        port=settings.notifier_port,
        metrics_port=settings.notifier_metrics_port,
        servicers=_servicers,
        database_url=settings.notifier_database_url,
        schema=[metadata],
        migrations=MIGRATIONS,
        consumes=[REGISTRATIONS, ENROLLMENT_EVENTS],
    )


def build_hooks(settings: NotifierSettings) -> ServiceHooks:
    return service(settings).hooks()


def main() -> None:
    run_service("notifier", load_settings(NotifierSettings), build_hooks)
