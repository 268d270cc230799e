"""The one configuration mechanism: environment variables read by pydantic-settings.

Every service reads the same names (documented in the README). Defaults are the
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


class RegistrationSettings(CommonSettings):
    registration_port: int = 50051
    # Where the enrollment service answers catalogue and decision queries.
    enrollment_target: str = "127.0.0.1:50052"
    # Key that signs registration ids: set the same secret on every registration
    # instance; changing it makes earlier ids NOT_FOUND.
    registration_id_secret: str = "local-development-secret-change-me"
    # How long Register waits to gather a PutRecords batch.
    register_batch_millis: float = 2.0
    # PutRecords calls in flight per stream; while they are busy, records queue up and
    # leave together (group commit), so fewer in flight means bigger batches.
    register_max_in_flight: int = Field(default=1, ge=1, le=32)


class EnrollmentSettings(CommonSettings):
    enrollment_port: int = 50052
    enrollment_database_url: str = "sqlite:///var/enrollment.db"
    # Load the demo catalogue (two campuses, a few courses) when the catalogue is empty.
    seed_demo_catalogue: bool = False


class StatsSettings(CommonSettings):
    stats_port: int = 50053
    stats_database_url: str = "sqlite:///var/stats.db"
    # Key that signs page tokens: the same on every stats instance; changing it makes
    # outstanding tokens INVALID_ARGUMENT.
    stats_page_token_secret: str = "local-development-page-token-secret-change-me"


class NotifierSettings(CommonSettings):
    notifier_port: int = 50054
    notifier_database_url: str = "sqlite:///var/notifier.db"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    # One deadline per message: connect (with STARTTLS and AUTH) and transfer.
    smtp_timeout_seconds: float = Field(default=10.0, gt=0)
    smtp_max_connections: int = Field(default=4, ge=1)
    mail_from: str = "Course Sign-up <no-reply@course-signup.local>"
    # Attempts per email before a transient failure (4xx, timeout, server down) is final.
    notifier_max_attempts: int = Field(default=5, ge=1)
    # Backoff after failed attempt n: base * 2**(n-1), capped, times a jitter of 0.5-1.
    notifier_retry_base_seconds: float = Field(default=1.0, gt=0)
    notifier_retry_max_seconds: float = Field(default=300.0, gt=0)
    # How long a sender holds a claimed email; rows of a crashed sender wait this long.
    # Unset: 2 * SMTP_TIMEOUT_SECONDS + 5. Must exceed SMTP_TIMEOUT_SECONDS.
    notifier_claim_seconds: float | None = Field(default=None, gt=0)
    # Interval of the "notifier metrics" log line.
    notifier_metrics_log_seconds: float = Field(default=60.0, gt=0)
