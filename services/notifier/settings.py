"""The notifier service's settings: the shared `CommonSettings` and its own."""

from __future__ import annotations

from pydantic import Field

from libs.config import CommonSettings


class NotifierSettings(CommonSettings):
    notifier_port: int = 50054
    # Prometheus /metrics over HTTP on BIND_HOST; 0 turns it off.
    notifier_metrics_port: int = Field(default=9454, ge=0, le=65535)
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
