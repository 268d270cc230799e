"""How the operator command (`python -m libs.operator --service enrollment`) finds the
enrollment service's leases and dead letters: registered in pyproject.toml."""

from __future__ import annotations

from libs.kinesis import REGISTRATIONS_STREAM
from libs.service_registry import ServiceDescription
from services.enrollment.settings import EnrollmentSettings

DESCRIPTION = ServiceDescription(EnrollmentSettings, "enrollment_database_url", (REGISTRATIONS_STREAM,))
