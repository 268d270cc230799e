"""The one configuration mechanism: environment variables read by pydantic-settings.

`CommonSettings` holds what every service reads; each service subclasses it in its
own `settings` module with its own names (all documented in the README). Defaults are the
embedded local setup of `make run`: kinesalite on 127.0.0.1:4567, SQLite under var/,
aiosmtpd on 127.0.0.1:1025.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    aws_endpoint_url_kinesis: str | None = None
    aws_region: str = "us-east-1"
    kinesis_stream_prefix: str = ""
    kinesis_shard_count: int = Field(default=4, ge=1)
    bind_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # How long a shard lease lasts without a heartbeat before another worker may take it.
    lease_seconds: float = Field(default=10.0, gt=0)
    # A name for this worker in lease tables; defaults to host:pid.
    worker_id: str | None = None
    # How long SIGTERM waits for in-flight calls to finish.
    shutdown_grace_seconds: float = 5.0

    def stream_name(self, base: str) -> str:
        return f"{self.kinesis_stream_prefix}{base}"
