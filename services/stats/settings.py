"""The stats service's settings: the shared `CommonSettings` and its own."""

from __future__ import annotations

from pydantic import Field

from libs.config import CommonSettings, Secret


class StatsSettings(CommonSettings):
    stats_port: int = 50053
    # Prometheus /metrics over HTTP on BIND_HOST; 0 turns it off.
    stats_metrics_port: int = Field(default=9453, ge=0, le=65535)
    stats_database_url: str = "sqlite:///var/stats.db"
    # Key that signs page tokens: the same on every stats instance; changing it makes
    # outstanding tokens INVALID_ARGUMENT.
    stats_page_token_secret: Secret
    # Where the enrollment service answers, for the rebuild (python -m services.stats.rebuild).
    enrollment_target: str = "127.0.0.1:50052"
    # The admin token the rebuild sends to ExportEnrollments (one of the enrollment
    # service's ADMIN_TOKENS): the export carries personal data.
    admin_token: str = ""
