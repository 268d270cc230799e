"""How the operator command (`python -m libs.operator --service notifier`) finds the
notifier's leases, dead letters and migrations: registered in pyproject.toml."""

from __future__ import annotations

from libs.kinesis import ENROLLMENT_EVENTS_STREAM, REGISTRATIONS_STREAM
from libs.service_registry import ServiceDescription
from services.notifier.migrations import MIGRATIONS
from services.notifier.settings import NotifierSettings

DESCRIPTION = ServiceDescription(
    NotifierSettings, "notifier_database_url", (REGISTRATIONS_STREAM, ENROLLMENT_EVENTS_STREAM), migrations=MIGRATIONS
)
