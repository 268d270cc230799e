"""Channels for the services' own gRPC clients (registration -> enrollment, the stats
rebuild -> enrollment): TLS when configured, and the gRPC service config shipped with
the protos (`protos/coursesignup/service_config.json`: a deadline per call, retries on
UNAVAILABLE with backoff), so every client of this project behaves the same way.

Other clients (any language) can load the same file as their default service config.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import grpc

from libs.config import CommonSettings


def service_config() -> str:
    """The service config JSON (copied next to the generated code by scripts/gen_protos.py)."""
    text = resources.files("coursesignup").joinpath("service_config.json").read_text()
    json.loads(text)  # fail here, not in grpc's C core, if it is not JSON
    return text


def channel_options() -> list[tuple[str, Any]]:
    return [("grpc.service_config", service_config()), ("grpc.enable_retries", 1)]


def credentials(settings: CommonSettings) -> grpc.ChannelCredentials | None:
    """TLS credentials when TLS_CA_FILE is set (with this service's own certificate as the
    client certificate when TLS_CERT_FILE and TLS_KEY_FILE are set: mutual TLS)."""
    if not settings.tls_ca_file:
        return None
    root = _read(settings.tls_ca_file)
    if settings.tls_cert_file and settings.tls_key_file:
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=_read(settings.tls_key_file),
                                            certificate_chain=_read(settings.tls_cert_file))
    return grpc.ssl_channel_credentials(root_certificates=root)


def aio_channel(target: str, settings: CommonSettings) -> grpc.aio.Channel:
    creds = credentials(settings)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=channel_options())
    return grpc.aio.secure_channel(target, creds, options=channel_options())


def channel(target: str, settings: CommonSettings) -> grpc.Channel:
    creds = credentials(settings)
    if creds is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, creds, options=channel_options())


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()
