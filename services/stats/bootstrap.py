"""The stats service, declared: it projects `enrollment-events` into its read model and
answers queries over it; the runtime (libs.worker) does the rest."""

from __future__ import annotations

import logging

from sqlalchemy import Engine

from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs.config import load_settings
from libs.grpc_server import ServiceHooks, run_service
from libs.worker import Runtime, Service, Servicer
from services.stats.adapters.tables import metadata
from services.stats.entrypoints.grpc_api import StatsServicer
from services.stats.migrations import MIGRATIONS
from services.stats.service_layer.projection import ENROLLMENT_EVENTS
from services.stats.service_layer.rebuild import complete_older_read_model
from services.stats.settings import StatsSettings

log = logging.getLogger(__name__)

SERVICE_NAME = stats_pb2.DESCRIPTOR.services_by_name["StatsService"].full_name


def _upgrade_read_model(engine: Engine) -> None:
    if complete_older_read_model(engine):
        log.info("counted the aggregates an older version of the read model lacked")


def service(settings: StatsSettings) -> Service[StatsSettings]:
    def servicers(runtime: Runtime[StatsSettings]) -> list[Servicer]:
        assert runtime.engine is not None
        return [Servicer(stats_pb2_grpc.add_StatsServiceServicer_to_server,
                         StatsServicer(runtime.engine, settings.stats_page_token_secret.encode()), SERVICE_NAME,
                         admin_methods=("ListEnrollments",))]  # names, emails and birth dates

    return Service(
        name="stats",
        settings=settings,
        port=settings.stats_port,
        metrics_port=settings.stats_metrics_port,
        servicers=servicers,
        database_url=settings.stats_database_url,
        schema=[metadata],
        migrations=MIGRATIONS,
        prepare=_upgrade_read_model,
        consumes=[ENROLLMENT_EVENTS],
    )


def build_hooks(settings: StatsSettings) -> ServiceHooks:
    return service(settings).hooks()


def main() -> None:
    run_service("stats", load_settings(StatsSettings), build_hooks)
