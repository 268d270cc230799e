"""The one configuration mechanism: environment variables read by pydantic-settings.

`CommonSettings` holds what every service reads; each service subclasses it in its
own `settings` module with its own names (all documented in the README). Defaults are the
embedded local setup of `make run`: kinesalite on 127.0.0.1:4567, SQLite under var/,
aiosmtpd on 127.0.0.1:1025.
"""

from __future__ import annotations

import sys
from typing import Annotated, TypeVar

from pydantic import AfterValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The development defaults earlier versions shipped: refused like a missing secret.
_RETIRED_DEFAULTS = {"local-development-secret-change-me", "local-development-page-token-secret-change-me"}
MIN_SECRET_CHARS = 16


def _check_secret(value: str, info: ValidationInfo) -> str:
    name = (info.field_name or "secret").upper()
    if not value or value in _RETIRED_DEFAULTS:
        raise ValueError(
            f"{name} is not set{' (it holds a development default from the source)' if value else ''}: "
            f"give every instance of this service the same random value, e.g. from "
            f"`python -c 'import secrets; print(secrets.token_urlsafe(32))'` (make run keeps one in var/secrets.env)")
    if "change-me" in value or "replace-me" in value:
        raise ValueError(f"{name} holds a placeholder (…change-me / replace-me…): set a random value of your own")
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(f"{name} must be at least {MIN_SECRET_CHARS} characters (use a random one)")
    return value


# A key the service signs or hashes with: no default in the source, required at start.
Secret = Annotated[str, AfterValidator(_check_secret), Field(default="", validate_default=True, repr=False)]


class CommonSettings(BaseSettings):
    """Settings every service reads."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    aws_endpoint_url_kinesis: str | None = None
    aws_region: str = "us-east-1"
    kinesis_stream_prefix: str = ""
    kinesis_shard_count: int = Field(default=4, ge=1)
    bind_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # One JSON line per gRPC call answered (method, status code, milliseconds; never the
    # request). Off by default: at a thousand sign-ups a second it is a thousand lines.
    log_calls: bool = False
    # How long a shard lease lasts without a heartbeat before another worker may take it.
    lease_seconds: float = Field(default=10.0, gt=0)
    # A name for this worker in lease tables; defaults to host:pid.
    worker_id: str | None = None
    # How long SIGTERM waits for in-flight calls to finish.
    shutdown_grace_seconds: float = 5.0
    # Bearer tokens the admin methods accept (catalogue writes, personal-data reads),
    # comma-separated so a token can be rotated: add the new one, move the clients, drop
    # the old one. None configured: those methods are refused (secure by default).
    admin_tokens: str = ""
    # TLS: with a certificate and its key every gRPC port serves TLS only; with
    # TLS_CLIENT_CA_FILE too, clients must present a certificate that CA signed (mutual
    # TLS). TLS_CA_FILE is what this service's own clients trust (registration ->
    # enrollment, the stats rebuild); they present TLS_CERT_FILE when it is set.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    tls_ca_file: str | None = None
    # Keys the pseudonyms personal data gets in logs (libs.logs.pseudonym): the same on
    # every instance so lines about one student correlate; without it nobody can
    # recompute a pseudonym from an address.
    log_pseudonym_key: Secret

    @field_validator("admin_tokens")
    @classmethod
    def _long_enough(cls, value: str) -> str:
        if any(len(token.strip()) < 16 for token in value.split(",") if token.strip()):
            raise ValueError("ADMIN_TOKENS: every token must be at least 16 characters (use a random one)")
        return value

    def admin_token_list(self) -> list[str]:
        return [token.strip() for token in self.admin_tokens.split(",") if token.strip()]

    def stream_name(self, base: str) -> str:
        return f"{self.kinesis_stream_prefix}{base}"


S = TypeVar("S", bound=BaseSettings)


def load_settings(settings_class: type[S]) -> S:
    """The settings from the environment, or exit 2 with one line per bad variable
    (named as it is set), not a traceback."""
    try:
        return settings_class()
    except ValidationError as error:
        for problem in error.errors():
            name = "_".join(str(part) for part in problem["loc"]).upper()
            message = problem["msg"].removeprefix("Value error, ")
            sys.stderr.write(f"configuration error: {message if message.startswith(name) else f'{name}: {message}'}\n")
        raise SystemExit(2) from None
