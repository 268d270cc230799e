"""How the operator command (`python -m libs.operator --service stats`) finds the stats
service's leases, dead letters and migrations: registered in pyproject.toml."""

from __future__ import annotations

from libs.kinesis import ENROLLMENT_EVENTS_STREAM
from libs.service_registry import ServiceDescription
from services.stats.migrations import MIGRATIONS
from services.stats.settings import StatsSettings

DESCRIPTION = ServiceDescription(StatsSettings, "stats_database_url", (ENROLLMENT_EVENTS_STREAM,),
                                 migrations=MIGRATIONS)
