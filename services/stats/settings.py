"""The stats service's settings: the shared `CommonSettings` and its own."""

from __future__ import annotations

from libs.config import CommonSettings


class StatsSettings(CommonSettings):
    stats_port: int = 50053
    stats_database_url: str = "sqlite:///var/stats.db"
    # Key that signs page tokens: the same on every stats instance; changing it makes
    # outstanding tokens INVALID_ARGUMENT.
    stats_page_token_secret: str = "local-development-page-token-secret-change-me"
