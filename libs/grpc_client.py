"""Channels for the services' own gRPC clients (registration -> enrollment, the stats
rebuild -> enrollment): TLS when configured, and the gRPC service config shipped with
the protos (`protos/coursesignup/service_config.json`: a deadline per call, retries on
UNAVAILABLE with backoff), so every client of this project behaves the same way.

Other clients (any language) can load the same file as their default service config.
With tracing on (libs.tracing), asyncio channels send the current span's W3C trace
context with every call, so the server's span joins the caller's trace.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import grpc

from libs import tracing
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


class _SendTraceContext(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Adds the current span's `traceparent` (and `tracestate`) to each call's metadata."""

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_trace_context(details), request)


def _with_trace_context(details: Any) -> Any:
    carrier = tracing.current_carrier()
    if not carrier:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in carrier.items():
        metadata[key] = value
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


def aio_channel(target: str, settings: CommonSettings) -> grpc.aio.Channel:
    """A channel to `target`; with tracing on (decided now), its calls carry the trace context."""
    creds = credentials(settings)
    interceptors = [_SendTraceContext()] if tracing.enabled() else None
    if creds is None:
        return grpc.aio.insecure_channel(target, options=channel_options(), interceptors=interceptors)
    return grpc.aio.secure_channel(target, creds, options=channel_options(), interceptors=interceptors)


def channel(target: str, settings: CommonSettings) -> grpc.Channel:
    creds = credentials(settings)
    if creds is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, creds, options=channel_options())


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()
