"""OpenTelemetry traces: one registration's trace from `Register` to every email.

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set;
`OTEL_SDK_DISABLED=true` turns it off too. When on, `setup` builds an SDK TracerProvider
(resource `service.name` = the service, unless `OTEL_SERVICE_NAME` says otherwise) with a
batch processor and the OTLP/gRPC exporter; the exporter, the batch processor and the
sampler read their own standard variables (`OTEL_EXPORTER_OTLP_*`, `OTEL_BSP_*`,
`OTEL_TRACES_SAMPLER`). Off, nothing of the SDK is imported and every instrumented place
costs one `is None` test (the server bootstrap decides once per method, not per call).

How the context travels (W3C trace context, never baggage):
- gRPC: the server span of each call (libs.grpc_server) continues the caller's
  `traceparent` metadata;
- streams: `new_envelope` (libs.envelope) writes the current span's context into the
  envelope's `trace_context`; the runtime (libs.worker) starts one consumer span per
  record as a child of that context, and the events a handler returns carry the span of
  the record that caused them (through the outbox, inside the stored envelope);
- emails: the notifier stores the `traceparent` of its consumer span with the
  notification, and the sender's span for each attempt is a child of it.

Span attributes carry ids, kinds and statuses only: never an email address, a name or
a birth date, and no error messages (they may quote what the caller sent).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACER_NAME = "course-signup"

_PROPAGATOR = TraceContextTextMapPropagator()
_CARRIER_KEYS = frozenset(_PROPAGATOR.fields)  # traceparent, tracestate

# How long a stopping process waits for its last spans to be exported.
SHUTDOWN_SECONDS = 3.0

# None: tracing is off in this process.
_tracer: Tracer | None = None
_provider: Any = None

# gRPC codes that are the server's fault (OpenTelemetry's semantic conventions for gRPC
# servers): the span's status is ERROR for these only; NOT_FOUND and the like are answers.
_SERVER_ERROR_CODES = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
                                 "DATA_LOSS"})


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces: an OTLP endpoint, and the SDK not disabled."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def setup(service_name: str) -> bool:
    """Turns tracing on for this process if the environment asks for it; returns whether it is on.

    A process already set up (or given a provider by `use`) is left as it is."""
    if _tracer is not None:
        return True
    if not wanted(os.environ):
        return False
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # Shut down by `shutdown` (bounded), not by the SDK's own exit hook (which would wait for
    # an unreachable collector as long as the exporter retries).
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME")
                                                        or service_name}), shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use(provider)
    return True


def use(provider: Any) -> None:
    """Traces this process's work with `provider` (an SDK TracerProvider): `setup`, and tests."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(TRACER_NAME)


def enabled() -> bool:
    return _tracer is not None


def shutdown(timeout_seconds: float = SHUTDOWN_SECONDS) -> None:
    """Turns tracing off and exports what is buffered, waiting at most `timeout_seconds`
    (at the end of the process: a collector that does not answer must not hold up a stop)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        flushing = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
        flushing.start()
        flushing.join(timeout_seconds)


# --- context carriers -----------------------------------------------------------------------


def context_from(carrier: Mapping[str, str]) -> Context:
    """The context a W3C carrier (`traceparent`, `tracestate`) describes; empty if none or invalid."""
    return _PROPAGATOR.extract(carrier)


def carrier_of(span: Span | None = None) -> dict[str, str]:
    """The W3C carrier of `span` (default: the current span); empty when it is not a valid span."""
    span = span if span is not None else trace.get_current_span()
    if not span.get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return carrier


def current_carrier() -> dict[str, str]:
    """The current span's carrier, for a message about to be produced; empty when off."""
    if _tracer is None:
        return {}
    return carrier_of()


def carrier_from_metadata(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    """The trace context headers of a gRPC call's metadata."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if key in _CARRIER_KEYS:
            carrier[key] = value if isinstance(value, str) else value.decode(errors="replace")
    return carrier


# --- spans ------------------------------------------------------------------------------------


def start_span(name: str, parent: Mapping[str, str] | None, kind: SpanKind,
               attributes: Mapping[str, str | int] | None = None) -> Span | None:
    """A span, child of the context in the `parent` carrier (a root span without one); None when off.

    The caller ends it (`end_span`)."""
    tracer = _tracer
    if tracer is None:
        return None
    context = context_from(parent) if parent else None
    return tracer.start_span(name, context=context, kind=kind, attributes=attributes,
                             record_exception=False, set_status_on_exception=False)


def end_span(span: Span, error: str | None = None, **attributes: str | int) -> None:
    """Ends `span`; `error` (a kind of failure, never a message with data in it) marks it failed."""
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def server_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> Span | None:
    """The span of one gRPC call to `method` ("/package.Service/Method"), continuing the caller's trace."""
    service, _, name = method.lstrip("/").partition("/")
    return start_span(method.lstrip("/"), carrier_from_metadata(metadata), SpanKind.SERVER,
                      {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})


def end_server_span(span: Span, code: str) -> None:
    """Ends a call's span with its gRPC status (a code name such as "OK", "NOT_FOUND")."""
    end_span(span, code if code in _SERVER_ERROR_CODES else None,
             **{"rpc.grpc.status_code": _CODE_NUMBERS.get(code, 2)})


def consumer_span(stream: str, stream_name: str, envelope: Any, shard_id: str, handler: str) -> Span | None:
    """The span of one stream record handled by `handler`, child of the context its envelope carries."""
    return start_span(f"process {stream}", envelope.trace_context, SpanKind.CONSUMER, {
        "messaging.system": "aws_kinesis",
        "messaging.operation.type": "process",
        "messaging.destination.name": stream_name,
        "messaging.destination.partition.id": shard_id,
        "messaging.message.id": envelope.message_id,
        "messaging.message.conversation_id": envelope.correlation_id,
        "coursesignup.handler": handler,
    })


_CODE_NUMBERS = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def current(span: Span) -> Any:
    """A context manager making `span` the current span (what `new_envelope` and child spans see)."""
    return trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False)
