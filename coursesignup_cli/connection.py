"""Where the services answer and how to reach them: one channel per service, TLS when a
CA is given, the service config shipped with the protos (a deadline per call, retries on
UNAVAILABLE), and the admin token sent only to the methods that need it."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.notifier.v1 import notifier_pb2_grpc
from coursesignup.registration.v1 import registration_pb2_grpc
from coursesignup.stats.v1 import stats_pb2_grpc
from libs.grpc_client import channel_options

# `make run` writes its admin token here; used when no token is given otherwise.
DEFAULT_TOKEN_FILE = pathlib.Path("var/admin-token")


class UsageError(Exception):
    """A mistake of the user's (a missing token, an unreadable file): printed, exit code 2."""


@dataclass(frozen=True)
class Targets:
    registration: str
    enrollment: str
    stats: str
    notifier: str


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca_file:
            return None
        root = _read(self.ca_file)
        if self.cert_file and self.key_file:  # mutual TLS
            return grpc.ssl_channel_credentials(
                root_certificates=root, private_key=_read(self.key_file), certificate_chain=_read(self.cert_file)
            )
        return grpc.ssl_channel_credentials(root_certificates=root)


def resolve_token(token: str | None, token_file: str | None) -> str | None:
    """--token / ADMIN_TOKEN, else --token-file, else make run's var/admin-token if present."""
    if token:
        return token.strip()
    path = pathlib.Path(token_file) if token_file else DEFAULT_TOKEN_FILE
    if not path.exists():
        if token_file:
            raise UsageError(f"token file {token_file} does not exist")
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as error:
        raise UsageError(f"cannot read the token file {path}: {error.strerror}") from error


@dataclass
class Clients:
    """Lazily opened stubs of the four services; `admin()` is the metadata of admin calls."""

    targets: Targets
    tls: TlsFiles = field(default_factory=TlsFiles)
    token: str | None = None
    timeout: float = 10.0
    _channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def _channel(self, target: str) -> grpc.Channel:
        if target not in self._channels:
            creds = self.tls.credentials()
            self._channels[target] = (
                grpc.insecure_channel(target, options=channel_options())
                if creds is None
                else grpc.secure_channel(target, creds, options=channel_options())
            )
        return self._channels[target]

    @property
    def registration(self) -> Any:
        return registration_pb2_grpc.RegistrationServiceStub(self._channel(self.targets.registration))

    @property
    def enrollment(self) -> Any:
        return enrollment_pb2_grpc.EnrollmentServiceStub(self._channel(self.targets.enrollment))

    @property
    def stats(self) -> Any:
        return stats_pb2_grpc.StatsServiceStub(self._channel(self.targets.stats))

    @property
    def notifier(self) -> Any:
        return notifier_pb2_grpc.NotifierServiceStub(self._channel(self.targets.notifier))

    def admin(self) -> tuple[tuple[str, str], ...]:
        """Metadata of an admin call. Without a token the call is sent bare: the service
        answers UNAUTHENTICATED (reason ADMIN_TOKEN_REQUIRED), which is printed as any error."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


def pages(call: Callable[..., Any], request: Any, items: str, **options: Any) -> Iterator[Any]:
    """Every item of an AIP-158 paginated list call, page after page."""
    while True:
        reply = call(request, **options)
        yield from getattr(reply, items)
        if not reply.next_page_token:
            return
        request.page_token = reply.next_page_token


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from error
