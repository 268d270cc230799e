"""What tracing costs (libs.tracing): per call on the server path and per envelope, with tracing
off (no OTEL_EXPORTER_OTLP_ENDPOINT) and on (the SDK with a batch processor whose exporter
drops the spans, so only the instrumentation and the SDK are measured).

Off, the server bootstrap wraps each method without a span (decided once per method), so
the per-call path is the one without tracing; what remains is one `is None` test per
envelope built, per batch dispatched and per email. Run: `python -m benchmarks tracing`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import timeit
import types
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from coursesignup.events.v1 import events_pb2
from libs import tracing
from libs.envelope import new_envelope
from libs.grpc_server import ErrorInterceptor

METHOD = "/bench.v1.Probe/Call"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class DroppingExporter(SpanExporter):
    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class FakeContext:
    """What the wrapped handler asks of a call's context on the success path."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", TRACEPARENT),)

    def code(self) -> None:
        return None


async def _handler_call_seconds(calls: int) -> float:
    """Seconds per call of the bootstrap's wrapped handler (gate, metrics, span if on) around a no-op."""

    async def call(request: bytes, context: Any) -> bytes:
        return b""

    interceptor = ErrorInterceptor("bench")
    interceptor.ready = True
    details: Any = types.SimpleNamespace(method=METHOD, invocation_metadata=())

    async def continuation(_: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(call)

    handler = (await interceptor.intercept_service(continuation, details)).unary_unary
    context = FakeContext()
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            await handler(b"", context)
        rounds.append((time.perf_counter() - started) / calls)
    return statistics.median(rounds)


def _build_before_tracing(correlation_id: str, *, time: Any = None, message_id: str | None = None,
                          **body: Any) -> events_pb2.Envelope:
    """new_envelope as it was before it carried a trace context: the baseline."""
    (field, message), = body.items()
    if time is None:
        time = timestamp_pb2.Timestamp()
        time.GetCurrentTime()
    return events_pb2.Envelope(message_id=message_id or f"{field}:{correlation_id}", time=time,
                               correlation_id=correlation_id, **{field: message})


def _envelope_seconds(number: int) -> tuple[float, float]:
    """Seconds per envelope: new_envelope, and the baseline, measured in alternation (a shared
    machine's noise hits both alike); the best of 9 rounds each."""
    body = events_pb2.RegisterStudent(registration_id="reg-1", course_id="c1")
    now, before = [], []
    for _ in range(9):
        now.append(timeit.timeit(lambda: new_envelope("reg-1", register_student=body), number=number))
        before.append(timeit.timeit(lambda: _build_before_tracing("reg-1", register_student=body), number=number))
    return min(now) / number, min(before) / number


def _check_seconds(number: int) -> float:
    return min(timeit.repeat(tracing.enabled, number=number, repeat=5)) / number


def main(argv: list[str]) -> int:
    calls = 20_000
    assert not tracing.enabled(), "run without OTEL_EXPORTER_OTLP_ENDPOINT"
    off_call = asyncio.run(_handler_call_seconds(calls))
    off_envelope, before_envelope = _envelope_seconds(calls)
    off_check = _check_seconds(calls * 10)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(DroppingExporter()))
    tracing.use(provider)
    try:
        on_call = asyncio.run(_handler_call_seconds(calls))
        on_envelope, _ = _envelope_seconds(calls)
    finally:
        tracing.shutdown()

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:7.2f} µs"

    print(f"wrapped handler per call  off {us(off_call)}   on {us(on_call)}   (span: +{us(on_call - off_call)})")
    print(f"new_envelope              off {us(off_envelope)}   on {us(on_envelope)}   (no span current); "
          f"before tracing existed {us(before_envelope)}")
    print(f"tracing.enabled() check   {off_check * 1e9:.0f} ns (once per envelope, batch and email when off)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
