"""How the operator command (`python -m libs.operator --service enrollment`) finds the
enrollment service's leases, dead letters and migrations: registered in pyproject.toml."""

from __future__ import annotations

from libs.kinesis import REGISTRATIONS_STREAM
from libs.service_registry import ServiceDescription
from services.enrollment.migrations import MIGRATIONS
from services.enrollment.settings import EnrollmentSettings

DESCRIPTION = ServiceDescription(EnrollmentSettings, "enrollment_database_url", (REGISTRATIONS_STREAM,),
                                 migrations=MIGRATIONS)
