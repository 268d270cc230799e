"""Shared fixtures: a real kinesalite, a unique stream prefix, and both databases."""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Iterator

import pytest

from dev.secrets import setdefault_environ
from tests import helpers

# Services started by tests (in this process or as child processes) serve no /metrics
# unless a test gives them a port of its own: several copies of one service run at once.
for _service in ("REGISTRATION", "ENROLLMENT", "STATS", "NOTIFIER"):
    os.environ[f"{_service}_METRICS_PORT"] = "0"
# ... and accept the tests' admin token; clients of the tests (the stats rebuild) send it.
os.environ["ADMIN_TOKENS"] = helpers.ADMIN_TOKEN
os.environ["ADMIN_TOKEN"] = helpers.ADMIN_TOKEN
# ... and have the secrets make run keeps in var/secrets.env (random, per test run).
setdefault_environ()


@pytest.fixture(scope="session")
def kinesis_endpoint() -> Iterator[str]:
    with helpers.kinesalite() as url:
        yield url


@pytest.fixture
def kinesis_env(kinesis_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Points boto3 at kinesalite with a stream prefix of this test's own."""
    env = {
        "AWS_ENDPOINT_URL_KINESIS": kinesis_endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "KINESIS_STREAM_PREFIX": f"t{uuid.uuid4().hex[:8]}-",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[str]:
    """The same test against SQLite (a file) and PostgreSQL (a fresh schema)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'service.db'}"
        return
    if not helpers.postgres_available():
        message = f"PostgreSQL not reachable at {helpers.postgres_url()} (set TEST_DATABASE_URL)"
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.fail(message + "; REQUIRE_POSTGRES=1 forbids skipping")
        pytest.skip(message)
    with helpers.postgres_schema() as url:
        yield url
