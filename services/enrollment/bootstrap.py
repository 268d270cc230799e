"""The enrollment service, declared: it decides the sign-ups on `registrations` and
publishes the decisions on `enrollment-events` (through its outbox); the runtime
(libs.worker) does the rest."""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from libs.config import load_settings
from libs.grpc_server import ServiceHooks, run_service
from libs.kinesis import ENROLLMENT_EVENTS_STREAM
from libs.worker import Runtime, Service, Servicer
from services.enrollment.adapters.tables import metadata
from services.enrollment.entrypoints.grpc_api import ADMIN_METHODS, SERVICE_NAME, EnrollmentServicer
from services.enrollment.migrations import MIGRATIONS
from services.enrollment.service_layer.catalogue import seed_demo_catalogue
from services.enrollment.service_layer.deciding import REGISTRATIONS
from services.enrollment.settings import EnrollmentSettings

log = logging.getLogger(__name__)


def service(settings: EnrollmentSettings) -> Service[EnrollmentSettings]:
    def seed(engine: Engine) -> None:
        if settings.seed_demo_catalogue and seed_demo_catalogue(engine):
            log.info("demo catalogue loaded")

    def servicers(runtime: Runtime[EnrollmentSettings]) -> list[Servicer]:
        assert runtime.engine is not None
        def wake_relay() -> None:
            if runtime.relay is not None:
                runtime.relay.wake()

        servicer = EnrollmentServicer(runtime.engine, settings.enrollment_page_token_secret.encode(),
                                      stream_name=runtime.stream_name, published=wake_relay)
        return [Servicer(enrollment_pb2_grpc.add_EnrollmentServiceServicer_to_server, servicer, SERVICE_NAME,
                         ADMIN_METHODS)]

    return Service(
        name="enrollment",
        settings=settings,
        port=settings.enrollment_port,
        metrics_port=settings.enrollment_metrics_port,
        servicers=servicers,
        database_url=settings.enrollment_database_url,
        schema=[metadata],
        migrations=MIGRATIONS,
        prepare=seed,
        consumes=[REGISTRATIONS],
        publishes=[ENROLLMENT_EVENTS_STREAM],
    )


def build_hooks(settings: EnrollmentSettings) -> ServiceHooks:
    return service(settings).hooks()


def main() -> None:
    run_service("enrollment", load_settings(EnrollmentSettings), build_hooks)
