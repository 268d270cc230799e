"""Starts the four services as separate processes against real local servers, for e2e tests."""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import pathlib
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from typing import Any

from aiosmtpd.controller import Controller

from tests import helpers

SERVICES = ("registration", "enrollment", "stats", "notifier")


class RecordingSmtpHandler:
    """An aiosmtpd handler that keeps every delivered message, parsed."""

    def __init__(self, headers_only: bool = False) -> None:
        self.headers_only = headers_only
        self.messages: list[EmailMessage] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.headers_only:  # enough to count emails by kind and registration, and much faster
            message = BytesHeaderParser(policy=email.policy.default).parsebytes(envelope.content)
        else:
            message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        with self.lock:
            self.messages.append(message)  # type: ignore[arg-type]
            self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


@contextlib.contextmanager
def smtp_server(headers_only: bool = False) -> Iterator[tuple[int, RecordingSmtpHandler]]:
    handler = RecordingSmtpHandler(headers_only)
    port = helpers.free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)  # as make run
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()


@dataclass
class Mesh:
    ports: dict[str, int]
    env: dict[str, str]
    logs: pathlib.Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def target(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"

    def start(self, service: str, name: str | None = None) -> None:
        """Starts `service`; a `name` such as "enrollment-2" starts one more worker of it."""
        name = name or service
        env = dict(self.env)
        if name != service:
            self.ports.setdefault(name, helpers.free_port())
            env[f"{service.upper()}_PORT"] = str(self.ports[name])
            env["WORKER_ID"] = name
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - kept by the process
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            cwd=helpers.ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, service: str, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        process = self.processes.pop(service)
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def wait_healthy(self, services: tuple[str, ...] | list[str] = SERVICES, timeout: float = 60.0) -> None:
        for service in services:
            def check_alive(service: str = service) -> None:
                process = self.processes.get(service)
                if process and process.poll() is not None:
                    raise AssertionError(f"{service} exited: {self.log_tail(service)}")
            try:
                helpers.wait_serving(self.ports[service], timeout, check_alive)
            except AssertionError as error:
                raise AssertionError(f"{error}: {self.log_tail(service)}") from error

    def log_tail(self, service: str, lines: int = 30) -> str:
        path = self.logs / f"{service}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@contextlib.contextmanager
def running_mesh(
    tmp_path: pathlib.Path,
    kinesis_endpoint: str,
    smtp_port: int,
    database_urls: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
    services: tuple[str, ...] = ("enrollment", "stats", "notifier", "registration"),
) -> Iterator[Mesh]:
    ports = {service: helpers.free_port() for service in SERVICES}
    urls = database_urls or {
        service: f"sqlite:///{tmp_path / f'{service}.db'}" for service in ("enrollment", "stats", "notifier")
    }
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_KINESIS": kinesis_endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "local",
        "AWS_SECRET_ACCESS_KEY": "local",
        "KINESIS_STREAM_PREFIX": f"e2e{uuid.uuid4().hex[:8]}-",
        "KINESIS_SHARD_COUNT": "2",
        "LEASE_SECONDS": "3",
        "REGISTRATION_PORT": str(ports["registration"]),
        "ENROLLMENT_PORT": str(ports["enrollment"]),
        "STATS_PORT": str(ports["stats"]),
        "NOTIFIER_PORT": str(ports["notifier"]),
        "ENROLLMENT_TARGET": f"127.0.0.1:{ports['enrollment']}",
        "ENROLLMENT_DATABASE_URL": urls["enrollment"],
        "STATS_DATABASE_URL": urls["stats"],
        "NOTIFIER_DATABASE_URL": urls["notifier"],
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    mesh = Mesh(ports, env, logs)
    try:
        for service in services:
            mesh.start(service)
        mesh.wait_healthy(services)
        yield mesh
    finally:
        for service in list(mesh.processes):
            with contextlib.suppress(Exception):
                mesh.stop(service, timeout=10)
