"""The one service runtime: a service declares what it is, this runs it.

A service module builds a `Service`: its settings, port and gRPC servicers, its
database and schema, the streams it consumes (one `Handle` per envelope message type)
and the streams it publishes to. `Service.hooks()` gives the shared server bootstrap
(`libs.grpc_server.serve`) the whole start-up and shutdown, written once here for
every service:

start   engine → wait for the database → its migrations to head (the service's tables,
        plus the lease and dead-letter tables when it consumes, the outbox when it
        publishes events; libs.migrations) →
        `prepare` (seeds, read-model upgrades) → Kinesis client → wait for Kinesis →
        every stream it reads or writes exists → outbox relay → the service's own
        parts (`Runtime.on_start`) → the stream tails (`Runtime.tail`: read-only,
        every shard from LATEST, records handed to the event loop; libs.stream_tail)
        → one lease consumer per consumed stream → ready
        (health SERVING, and the server's readiness gate opens for every method);
        /metrics is served from the first step (libs.metrics)
stop    (after the server stopped taking calls) consumers finish and checkpoint their
        batch and hand back their leases → tails → the service's parts, in reverse → relay →
        engine closed. A stop during start-up stops what was started.

Consumption: each record's envelope is decoded once, here. What does not decode, or
whose message type the service did not declare for that stream, or whose `Handle.parse`
raises `MalformedRecord`, goes to dead letters in the batch's transaction; message types
declared in `Consume.ignore` are skipped. The rest is dispatched in stream order as
runs of messages with one handler, each run to that handler with the batch's transaction (the
unit of work: the handler's writes commit with the shard checkpoint, under the lease's
fencing token). A handler returns the domain events its decisions produced; they are
written to the outbox in the same transaction and published by the relay after commit.

Tracing (on when OTEL_EXPORTER_OTLP_ENDPOINT is set, libs.tracing): each dispatched
record gets a consumer span, child of the context its envelope carries, lasting its
run's handler call; the events a handler returns carry the span of the record with the
same correlation id (the registration that caused them), through the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import Connection, Engine, MetaData, func, select

from coursesignup.events.v1 import events_pb2
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs import tracing
from libs.config import CommonSettings
from libs.consumer import StreamRecord, decode_or_dead_letter
from libs.db import after_commit, make_engine, wait_for_database
from libs.envelope import MalformedRecord, decode_envelope
from libs.grpc_server import ServiceHooks, in_daemon_thread
from libs.kinesis import ensure_stream, kinesis_client, wait_for_kinesis
from libs.metrics import BATCH_RECORDS, RECORDS_CONSUMED, GaugesAtScrape, MetricsEndpoint
from libs.migrations import Migrations, upgrade_to_head
from libs.stream_tail import StreamTail

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)
T = TypeVar("T")


@dataclass(frozen=True)
class Message(Generic[T]):
    """One record of a consumed stream, decoded: what a handler receives."""

    record: StreamRecord
    envelope: events_pb2.Envelope
    body: T
    # The W3C carrier (traceparent) of this record's consumer span: what a handler stores
    # with work it leaves for later (the notifier's emails). Empty when tracing is off.
    trace_context: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """A domain event a handler produced: published to `stream` (its base name) after commit."""

    stream: str
    partition_key: str
    envelope: events_pb2.Envelope


BatchHandler = Callable[[Connection, list[Message[Any]]], Iterable[Event] | None]


def _body(kind: str) -> Callable[[events_pb2.Envelope], Any]:
    return lambda envelope: getattr(envelope, kind)


@dataclass(frozen=True)
class Handle:
    """What a service does with one message type: `parse` checks and converts the body
    (raise MalformedRecord: the record goes to dead letters; default: the protobuf body
    as it is), then `handler` gets the batch's run of such messages."""

    handler: BatchHandler
    parse: Callable[[events_pb2.Envelope], Any] | None = None


@dataclass(frozen=True)
class Consume:
    """A stream a service reads (base name), with one Handle per envelope message type."""

    stream: str
    handlers: Mapping[str, Handle]
    # Message types that belong on the stream but mean nothing to this service.
    ignore: frozenset[str] = frozenset()
    batch_size: int = 1000


def dispatch(conn: Connection, records: list[StreamRecord], consume: Consume,
             stream_name: Callable[[str], str] = str, *, publish: bool = True) -> None:
    """Decodes a batch once, dead-letters what cannot be handled, and hands the rest to the
    handlers in stream order; the events they return go to the outbox in `conn`."""

    def decode(data: bytes) -> tuple[str, events_pb2.Envelope, Any] | None:
        envelope = decode_envelope(data)
        kind = envelope.WhichOneof("body") or ""  # decode_envelope refuses an envelope without one
        if kind in consume.ignore:
            return None
        handle = consume.handlers.get(kind)
        if handle is None:
            raise MalformedRecord(f"a {kind} message does not belong on the {consume.stream} stream")
        return kind, envelope, (handle.parse or _body(kind))(envelope)

    # Consecutive messages with the same handler form one run (one call, one set of
    # statements), so runs keep the stream order even across message types.
    stream = stream_name(consume.stream)
    counted = len(records)

    def count() -> None:
        RECORDS_CONSUMED.labels(stream).inc(counted)
        BATCH_RECORDS.labels(stream).observe(counted)

    after_commit(conn, count)
    traced = tracing.enabled()
    runs: list[tuple[BatchHandler, list[Message[Any]]]] = []
    spans: dict[int, Any] = {}  # id(message) -> its consumer span, when traced
    for record, decoded in decode_or_dead_letter(conn, records, decode):
        if decoded is None:
            continue
        kind, envelope, body = decoded
        handler = consume.handlers[kind].handler
        if traced:
            span = tracing.consumer_span(consume.stream, stream, envelope, record.shard_id,
                                         getattr(handler, "__name__", "handler"))
            message = Message(record, envelope, body, tracing.carrier_of(span))
            spans[id(message)] = span
        else:
            message = Message(record, envelope, body)
        if runs and runs[-1][0] is handler:
            runs[-1][1].append(message)
        else:
            runs.append((handler, [message]))
    events: list[Event] = []
    for handler, messages in runs:
        if traced:
            events.extend(_traced_run(handler, conn, messages, spans))
        else:
            events.extend(handler(conn, messages) or ())
    if events:
        if not publish:
            raise RuntimeError(f"a handler of {consume.stream} returned events, but the service publishes none")
        outbox_lib.enqueue(conn, [(stream_name(e.stream), e.partition_key, e.envelope.SerializeToString())
                                  for e in events])


def _traced_run(handler: BatchHandler, conn: Connection, messages: list[Message[Any]],
                spans: Mapping[int, Any]) -> list[Event]:
    """Calls `handler` for a run, ending each message's span after it; the events it returns
    carry the span of the message they belong to (same correlation id)."""
    error = None
    try:
        produced = list(handler(conn, messages) or ())
    except BaseException as raised:
        error = type(raised).__name__
        raise
    finally:
        for message in messages:
            span = spans.get(id(message))
            if span is not None:
                tracing.end_span(span, error)
    causes = {message.envelope.correlation_id: message for message in messages}
    for event in produced:
        cause = causes.get(event.envelope.correlation_id)
        if cause is not None and cause.trace_context:
            event.envelope.trace_context.clear()
            event.envelope.trace_context.update(cause.trace_context)
    return produced


@dataclass(frozen=True)
class Servicer:
    """A gRPC servicer and the generated function that adds it to a server."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    # Full proto service name, for health and reflection.
    name: str
    # Methods that need `authorization: Bearer <one of ADMIN_TOKENS>`: catalogue writes
    # and reads of personal data. Checked against the proto, so a typo fails at start.
    admin_methods: tuple[str, ...] = ()

    def admin_paths(self) -> list[str]:
        declared = descriptor_pool.Default().FindServiceByName(self.name).methods_by_name
        unknown = sorted(set(self.admin_methods) - set(declared))
        if unknown:
            raise ValueError(f"{self.name} has no methods {unknown}")
        return [f"/{self.name}/{method}" for method in self.admin_methods]


@dataclass
class Runtime(Generic[S]):
    """What a running service holds; the service's builders receive it."""

    settings: S
    engine: Engine | None
    kinesis: Any
    relay: outbox_lib.OutboxRelay | None = None
    consumers: list[consumer_lib.StreamConsumer] = field(default_factory=list)
    _tails: list[tuple[str, Callable[[list[StreamRecord]], None]]] = field(default_factory=list)
    tails: list[StreamTail] = field(default_factory=list)
    _starts: list[Callable[[], Any]] = field(default_factory=list)
    _stops: list[Callable[[], Any]] = field(default_factory=list)
    _after_commit: list[Callable[[], None]] = field(default_factory=list)
    _gauges: list[GaugesAtScrape] = field(default_factory=list)
    _dependencies: dict[str, Callable[[], bool]] = field(default_factory=dict)

    def stream_name(self, base: str) -> str:
        return self.settings.stream_name(base)

    def on_start(self, start: Callable[[], Any]) -> None:
        """Runs `start` (sync or async) once the streams exist, before the consumers start."""
        self._starts.append(start)

    def on_stop(self, stop: Callable[[], Any]) -> None:
        """Runs `stop` (sync or async) after the consumers stopped; stops run in reverse order."""
        self._stops.append(stop)

    def tail(self, stream: str, on_records: Callable[[list[StreamRecord]], None]) -> None:
        """Follows `stream` (base name) read-only in this process, without leases or
        checkpoints, from the end of start-up on: `on_records` runs on the server's event
        loop with each shard's new records. For noticing records cheaply in every process
        (a record missed while Kinesis is unreachable is not delivered again); work that
        must see every record once is a `Consume`."""
        self._tails.append((stream, on_records))

    def dependency(self, name: str, healthy: Callable[[], bool]) -> None:
        """A dependency the service works without, but worse: its state is served as the
        health of "dependency:<name>" (the service itself stays SERVING)."""
        self._dependencies[name] = healthy

    def gauges(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        """Adds gauges computed when Prometheus scrapes (registered while the service runs)."""
        self._gauges.append(GaugesAtScrape(collect))

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Calls `callback` (from a consumer thread) after each batch commits."""
        self._after_commit.append(callback)

    def _committed(self) -> None:
        for callback in self._after_commit:
            callback()


@dataclass
class Service(Generic[S]):
    """A service, declared."""

    name: str
    settings: S
    port: int
    # Builds the servicers, inside the server's event loop (asyncio channels can be made
    # there); may register the service's own parts with runtime.on_start / on_stop.
    servicers: Callable[[Runtime[S]], Sequence[Servicer]]
    database_url: str | None = None
    # The models (the runtime's own tables are added: see `tables`), and the migration
    # history that brings the database to them at start (libs.migrations).
    schema: Sequence[MetaData] = ()
    migrations: Migrations | None = None
    # Blocking work after the schema, before Kinesis (seed data, read-model upgrades).
    prepare: Callable[[Engine], None] | None = None
    consumes: Sequence[Consume] = ()
    # Streams written to: created at start; events returned by handlers go through the outbox.
    publishes: Sequence[str] = ()
    kinesis_connections: int = 20
    # SO_REUSEPORT, for several processes of one service on one port.
    reuse_port: bool = False
    # Where /metrics is served (on BIND_HOST); 0: not served by this process.
    metrics_port: int = 0

    def tables(self) -> list[MetaData]:
        """Every table of the service's database: its models, the lease and dead-letter
        tables when it consumes, the outbox when it publishes events. Its migrations'
        head must agree with these."""
        return [*self.schema, *([consumer_lib.metadata] if self.consumes else []),
                *([outbox_lib.metadata] if self.publishes and self.database_url is not None else [])]

    def hooks(self) -> ServiceHooks:
        settings = self.settings
        engine = None
        if self.database_url is not None:
            engine = make_engine(self.database_url, idle_in_transaction_seconds=2 * settings.lease_seconds)
        runtime = Runtime(settings, engine,
                          kinesis_client(settings.aws_region, settings.aws_endpoint_url_kinesis,
                                         max_pool_connections=self.kinesis_connections))
        names: list[str] = []
        admin_methods: set[str] = set()
        runner = _Runner(self, runtime)

        def register(server: grpc.aio.Server) -> None:
            for servicer in self.servicers(runtime):
                servicer.add_to_server(servicer.servicer, server)
                names.append(servicer.name)
                admin_methods.update(servicer.admin_paths())
            hooks.admin_methods = frozenset(admin_methods)

        hooks = ServiceHooks(name=self.name, port=self.port, bind_host=settings.bind_host, register=register,
                             service_names=names, start=runner.start, stop=runner.stop,
                             grace_seconds=settings.shutdown_grace_seconds, reuse_port=self.reuse_port,
                             admin_tokens=settings.admin_token_list(), tls=ServiceHooks.tls_from(settings),
                             dependencies=runtime._dependencies, log_calls=settings.log_calls)
        return hooks


class _Runner:
    """Starts and stops one service's runtime in the documented order."""

    def __init__(self, service: Service[Any], runtime: Runtime[Any]) -> None:
        self.service = service
        self.runtime = runtime
        self._started_parts = 0
        self._metrics: MetricsEndpoint | None = None

    def _scrape(self) -> list[GaugeMetricFamily]:
        """Consumer lag and leases per stream, outbox depth: read when Prometheus scrapes."""
        runtime = self.runtime
        lag = GaugeMetricFamily("coursesignup_stream_consumer_lag_seconds",
                                "Per held shard: age of the newest record of the last batch when it committed "
                                "(0 once the shard is caught up).", labels=["stream", "shard"])
        leases = GaugeMetricFamily("coursesignup_stream_leases_held", "Shards this process holds the lease of.",
                                   labels=["stream"])
        for consumer in runtime.consumers:
            held = consumer.held_shards()
            leases.add_metric([consumer.stream_name], len(held))
            for shard, seconds in consumer.lag_seconds().items():
                if shard in held:
                    lag.add_metric([consumer.stream_name, shard], seconds)
        families = [lag, leases]
        if runtime.relay is not None and runtime.engine is not None:
            with runtime.engine.connect() as conn:
                depth = conn.execute(select(func.count()).select_from(outbox_lib.outbox)).scalar_one()
            families.append(GaugeMetricFamily("coursesignup_outbox_depth",
                                              "Outbox rows not yet published.", value=depth))
        return families

    async def start(self) -> None:
        service, runtime = self.service, self.runtime
        engine = runtime.engine
        runtime._gauges.insert(0, GaugesAtScrape(self._scrape))
        for gauges in runtime._gauges:
            REGISTRY.register(gauges)
        if service.metrics_port:
            self._metrics = MetricsEndpoint(runtime.settings.bind_host, service.metrics_port)
            await in_daemon_thread(self._metrics.start)
        if engine is not None:
            if service.migrations is None:
                raise TypeError(f"the {service.name} service has a database but declares no migrations")
            await in_daemon_thread(wait_for_database, engine)
            await in_daemon_thread(upgrade_to_head, engine, service.migrations)
            if service.prepare is not None:
                await in_daemon_thread(service.prepare, engine)
        kinesis = runtime.kinesis
        await in_daemon_thread(wait_for_kinesis, kinesis)
        streams = dict.fromkeys([*(c.stream for c in service.consumes), *service.publishes,
                                 *(stream for stream, _ in runtime._tails)])
        for base in streams:
            await in_daemon_thread(ensure_stream, kinesis, runtime.stream_name(base),
                                   runtime.settings.kinesis_shard_count)
        if engine is not None and service.publishes:
            runtime.relay = outbox_lib.OutboxRelay(engine, kinesis)
            runtime.relay.start()
            runtime._after_commit.insert(0, runtime.relay.wake)
        for start in runtime._starts:
            await _call(start)
            self._started_parts += 1
        loop = asyncio.get_running_loop()
        for stream, on_records in runtime._tails:
            def on_loop(records: list[StreamRecord], on_records: Callable[..., None] = on_records) -> None:
                loop.call_soon_threadsafe(on_records, records)

            tail = StreamTail(kinesis, runtime.stream_name(stream), on_loop)
            await in_daemon_thread(tail.start)
            runtime.tails.append(tail)
        for consume in service.consumes:
            assert engine is not None, "a service that consumes a stream needs a database"
            handler = functools.partial(dispatch, consume=consume, stream_name=runtime.stream_name,
                                        publish=bool(service.publishes))
            consumer = consumer_lib.StreamConsumer(
                engine=engine, kinesis=kinesis, stream_name=runtime.stream_name(consume.stream), handler=handler,
                worker_id=runtime.settings.worker_id, lease_seconds=runtime.settings.lease_seconds,
                batch_size=consume.batch_size, on_commit=runtime._committed,
            )
            await asyncio.to_thread(consumer.start)
            runtime.consumers.append(consumer)
        # Polled, not waited in a thread, so a stop during start-up is not stuck behind it.
        while not all(consumer.ready.is_set() for consumer in runtime.consumers):
            await asyncio.sleep(0.05)
        log.info("started", extra={"service": service.name,
                                   "consumes": [runtime.stream_name(c.stream) for c in service.consumes],
                                   "publishes": [runtime.stream_name(s) for s in service.publishes]})

    async def stop(self) -> None:
        runtime = self.runtime
        for consumer in runtime.consumers:
            await asyncio.to_thread(consumer.stop)
        for tail in runtime.tails:
            await asyncio.to_thread(tail.stop)
        for stop in reversed(runtime._stops):
            try:
                await _call(stop)
            except Exception:  # noqa: BLE001 - the other parts still stop
                log.exception("a part failed to stop", extra={"service": self.service.name})
        if runtime.relay is not None:
            await asyncio.to_thread(runtime.relay.stop)
        if self._metrics is not None:
            self._metrics.stop()
        for gauges in runtime._gauges:
            with contextlib.suppress(KeyError):
                REGISTRY.unregister(gauges)
        if runtime.engine is not None:
            runtime.engine.dispose()


async def _call(function: Callable[[], Any]) -> None:
    result = function()
    if inspect.isawaitable(result):
        await result

