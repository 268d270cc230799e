"""The enrollment service's settings: the shared `CommonSettings` and its own."""

from __future__ import annotations

from pydantic import Field

from libs.config import CommonSettings, Secret


class EnrollmentSettings(CommonSettings):
    enrollment_port: int = 50052
    # Prometheus /metrics over HTTP on BIND_HOST; 0 turns it off.
    enrollment_metrics_port: int = Field(default=9452, ge=0, le=65535)
    enrollment_database_url: str = "sqlite:///var/enrollment.db"
    # Key that signs page tokens (ListCampuses, ListCourses, ExportEnrollments): the same
    # on every enrollment instance; changing it makes outstanding tokens INVALID_ARGUMENT.
    enrollment_page_token_secret: Secret
    # Load the demo catalogue (two campuses, a few courses) when the catalogue is empty.
    seed_demo_catalogue: bool = False
