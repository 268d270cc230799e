"""The one server bootstrap used by all four services.

An asyncio gRPC server with: the error interceptor (domain errors become clear
statuses with rich details, anything unexpected becomes INTERNAL and is logged),
grpc.health.v1 (NOT_SERVING until the service's start-up finished), server
reflection (so grpcurl works without proto files), and graceful shutdown on SIGTERM
or SIGINT (in-flight calls get a grace period, then the service's own stop hook runs,
e.g. consumers finish their batch and checkpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from sqlalchemy.exc import OperationalError

from libs import tracing
from libs.config import CommonSettings
from libs.errors import ServiceError, Unauthenticated, Unavailable, status_for
from libs.logs import configure_logging
from libs.metrics import RpcMetrics

log = logging.getLogger(__name__)
S = TypeVar("S", bound=CommonSettings)


# Served while a service starts: health says NOT_SERVING, reflection describes the API.
_ALWAYS_OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# What every server enforces. A request over 1 MiB is refused (RESOURCE_EXHAUSTED) before
# it is parsed: no message of this API comes near it. Idle clients are pinged so dead
# connections are found; clients may ping no more often than every 10 s (more is answered
# with GOAWAY). A connection lives at most 30 minutes (then a GOAWAY and 30 s to finish),
# so clients reconnect and new processes behind the port, or a load balancer, get a share.
MAX_MESSAGE_BYTES = 1024 * 1024
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_concurrent_streams", 1000),
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
    ("grpc.max_connection_age_ms", 30 * 60_000),
    ("grpc.max_connection_age_grace_ms", 30_000),
]

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass(frozen=True)
class _Undecodable:
    """What a request deserializer returns for bytes that are not the method's message."""

    error: str


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as error:
            return _Undecodable(str(error))

    return deserialize


class AdminTokens:
    """The bearer tokens admin methods accept, compared in constant time."""

    def __init__(self, tokens: Sequence[str]) -> None:
        # Digests, so that every comparison is between equal lengths.
        self._digests = [hashlib.sha256(token.encode()).digest() for token in tokens]

    def check(self, context: grpc.aio.ServicerContext) -> None:
        """Raises Unauthenticated unless the call carries `authorization: Bearer <a token>`."""
        if not self._digests:
            raise Unauthenticated("this method needs an admin token and none is configured on this service "
                                  "(ADMIN_TOKENS): it is refused", reason="ADMIN_TOKEN_REQUIRED")
        presented = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                presented = value if isinstance(value, str) else value.decode(errors="replace")
        scheme, _, token = presented.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("this method needs the metadata `authorization: Bearer <admin token>`",
                                  reason="ADMIN_TOKEN_REQUIRED")
        digest = hashlib.sha256(token.strip().encode()).digest()
        valid = False
        for known in self._digests:  # every one compared: the time does not tell which matched
            valid |= hmac.compare_digest(digest, known)
        if not valid:
            raise Unauthenticated("the admin token is not valid", reason="ADMIN_TOKEN_INVALID")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError into its status; wraps each method's handler once, then reuses it.

    It is also the readiness gate of every service: until `ready` is set (the service's
    start-up finished), every method but health and reflection answers UNAVAILABLE, so no
    servicer has to guard against parts that do not exist yet. Unary and
    server-streaming methods are wrapped (the ones the protos declare)."""

    def __init__(self, service: str = "service", admin_methods: frozenset[str] = frozenset(),
                 admin_tokens: AdminTokens | None = None) -> None:
        self.ready = False
        # One JSON line per call answered (method, code, milliseconds): LOG_CALLS.
        self.log_calls = False
        self.admin_methods = admin_methods
        self.admin_tokens = admin_tokens or AdminTokens([])
        self.starting_message = f"the {service} service is starting; retry shortly"
        # Method name -> handler (wrapped when unary-unary). Only methods the server
        # actually serves get here (unknown names resolve to None and are not kept), so
        # the map is bounded by the registered methods.
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = self._handlers.get(details.method)
        if handler is None:
            handler = await continuation(details)
            if handler is None:
                return None
            gate = None if details.method.startswith(_ALWAYS_OPEN) else self
            admin = self.admin_tokens if details.method in self.admin_methods else None
            if handler.unary_unary is not None:
                handler = _wrap_unary_unary(handler, details.method, gate, admin)
            elif handler.unary_stream is not None:
                handler = _wrap_unary_stream(handler, details.method, gate, admin)
            elif admin is not None:
                raise RuntimeError(f"{details.method}: only unary and server-streaming methods can be admin methods")
            if gate is not None and tracing.enabled():  # decided once per method: no cost per call when off
                handler = _traced(handler, details.method)
            self._handlers[details.method] = handler
        return handler


def _wrap_unary_unary(handler: Any, method: str, gate: ErrorInterceptor | None, admin: AdminTokens | None) -> Any:
    inner = handler.unary_unary

    metrics = RpcMetrics(method, "unary")

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = metrics.started()
        cancelled = False
        try:
            if gate is not None and not gate.ready:
                raise Unavailable(gate.starting_message, reason="SERVICE_STARTING")
            if isinstance(request, _Undecodable):
                await _abort_undecodable(request, context, method)
            if admin is not None:
                admin.check(context)
            return await inner(request, context)
        except asyncio.CancelledError:
            cancelled = True
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort_for(error, context, method, started)
        finally:
            code = "CANCELLED" if cancelled else _code_name(context)
            metrics.handled(started, code)
            if gate is not None and gate.log_calls:
                _log_call(method, code, started)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary,
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _wrap_unary_stream(handler: Any, method: str, gate: ErrorInterceptor | None, admin: AdminTokens | None) -> Any:
    inner = handler.unary_stream

    metrics = RpcMetrics(method, "server_stream")

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = metrics.started()
        cancelled = False
        try:
            if gate is not None and not gate.ready:
                raise Unavailable(gate.starting_message, reason="SERVICE_STARTING")
            if isinstance(request, _Undecodable):
                await _abort_undecodable(request, context, method)
            if admin is not None:
                admin.check(context)
            async for response in inner(request, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = True
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort_for(error, context, method, started)
        finally:
            code = "CANCELLED" if cancelled else _code_name(context)
            metrics.handled(started, code)
            if gate is not None and gate.log_calls:
                _log_call(method, code, started)

    return grpc.unary_stream_rpc_method_handler(
        unary_stream,
        request_deserializer=_lenient(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


def _traced(handler: Any, method: str) -> Any:
    """`handler` inside the call's server span, which continues the caller's `traceparent`.

    The span wraps the error mapping too, so it ends with the status the caller gets.
    Health and reflection are not traced (probes would drown the traces)."""
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = tracing.server_span(method, context.invocation_metadata())
            assert span is not None
            code = None
            try:
                with tracing.current(span):
                    return await inner(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            finally:
                tracing.end_server_span(span, code or _code_name(context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = tracing.server_span(method, context.invocation_metadata())
            assert span is not None
            code = None
            try:
                with tracing.current(span):
                    async for response in inner_stream(request, context):
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                code = "CANCELLED"
                raise
            finally:
                tracing.end_server_span(span, code or _code_name(context))

        return grpc.unary_stream_rpc_method_handler(unary_stream, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)
    return handler


def _log_call(method: str, code: str, started: float) -> None:
    """The access log line of one call: what and how, never the request (personal data)."""
    log.info("rpc", extra={"method": method, "code": code, "millis": round((time.perf_counter() - started) * 1000, 2)})


def _code_name(context: grpc.aio.ServicerContext) -> str:
    """The status the call ended with: OK unless the handler set or aborted with another."""
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


async def _abort_undecodable(request: _Undecodable, context: grpc.aio.ServicerContext, method: str) -> None:
    log.info("rpc rejected", extra={"method": method, "code": "INVALID_ARGUMENT", "reason": "undecodable request"})
    await _abort_with(context, status_for(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request bytes are not a valid {method.rsplit('/', 1)[-1]} request message ({request.error})",
        "REQUEST_UNDECODABLE"))


async def _abort_with(context: grpc.aio.ServicerContext, status_proto: Any) -> None:
    status = rpc_status.to_status(status_proto)
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, method: str, started: float) -> None:
    """Ends a call that raised with its status: a ServiceError's own, UNAVAILABLE for a
    database that cannot be reached, INTERNAL (logged with its traceback) otherwise."""
    if isinstance(error, ServiceError):
        if error.code is not grpc.StatusCode.RESOURCE_EXHAUSTED:  # load shedding: counted, not logged per call
            log.info("rpc rejected", extra={"method": method, "code": error.code.name, "reason": error.reason,
                                            "millis": round((time.perf_counter() - started) * 1000, 2)})
        await _abort_with(context, error.to_status_proto())
    elif isinstance(error, NotImplementedError):
        # A method the proto declares but this server does not implement (the generated
        # base class raises this), e.g. grpc.health.v1.Health/List.
        await _abort_with(context, status_for(grpc.StatusCode.UNIMPLEMENTED,
                                              f"{method} is not implemented by this server", "METHOD_NOT_IMPLEMENTED"))
    elif isinstance(error, OperationalError):
        log.warning("database unavailable", extra={"method": method})
        await _abort_with(context, Unavailable("database unavailable; retry later",
                                               reason="DATABASE_UNAVAILABLE").to_status_proto())
    else:
        log.error("rpc failed", extra={"method": method}, exc_info=error)
        await _abort_with(context, status_for(grpc.StatusCode.INTERNAL, "internal error; see the service log",
                                              "INTERNAL_ERROR"))


@dataclass
class ServiceHooks:
    """What a service plugs into the bootstrap."""

    name: str
    port: int
    bind_host: str
    # Adds the service's servicers to the server.
    register: Callable[[grpc.aio.Server], None]
    # Full proto service names served (for health and reflection).
    service_names: Sequence[str]
    # Runs after the port is open; health turns SERVING when it returns.
    start: Callable[[], Awaitable[None]] | None = None
    # Runs after the server stopped taking calls (flush, checkpoint, close).
    stop: Callable[[], Awaitable[None]] | None = None
    grace_seconds: float = 5.0
    # SO_REUSEPORT: several worker processes of one service listen on the same port and
    # the kernel spreads new connections over them. Off by default, so a second copy of
    # a service started by mistake fails to bind instead of silently taking a share.
    reuse_port: bool = False
    # Full method names ("/package.Service/Method") that need an admin token, and the tokens.
    admin_methods: frozenset[str] = frozenset()
    admin_tokens: Sequence[str] = ()
    # TLS (certificate chain, private key, and the CA client certificates must chain to
    # for mutual TLS), as PEM bytes; None: plaintext.
    tls: tuple[bytes, bytes, bytes | None] | None = None
    # Dependencies the service works without but worse (registration without the
    # catalogue): health answers for each as the service name "dependency:<name>",
    # SERVING while the check returns True, while "" stays SERVING. Checked every few seconds.
    dependencies: dict[str, Callable[[], bool]] = field(default_factory=dict)
    # An access log: one line per call answered (health and reflection excepted).
    log_calls: bool = False

    @staticmethod
    def tls_from(settings: CommonSettings) -> tuple[bytes, bytes, bytes | None] | None:
        if not (settings.tls_cert_file or settings.tls_key_file):
            if settings.tls_client_ca_file:
                raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
            return None
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise ValueError("TLS needs both TLS_CERT_FILE and TLS_KEY_FILE")
        client_ca = _read(settings.tls_client_ca_file) if settings.tls_client_ca_file else None
        return _read(settings.tls_cert_file), _read(settings.tls_key_file), client_ca


async def serve(hooks: ServiceHooks, stop_event: asyncio.Event | None = None) -> int:
    """Serves until SIGTERM/SIGINT (or stop_event); returns the process exit code."""
    gate = ErrorInterceptor(hooks.name, admin_tokens=AdminTokens(hooks.admin_tokens))
    gate.log_calls = hooks.log_calls
    server = grpc.aio.server(
        interceptors=[gate],
        options=[("grpc.so_reuseport", 1 if hooks.reuse_port else 0), *SERVER_OPTIONS],
    )
    hooks.register(server)
    gate.admin_methods = frozenset(hooks.admin_methods)  # known once the servicers are registered
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    _add_reflection(server, [*hooks.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    address = f"{hooks.bind_host}:{hooks.port}"
    if hooks.tls is None:
        server.add_insecure_port(address)
    else:
        chain, key, client_ca = hooks.tls
        server.add_secure_port(address, grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None))
    for service in ("", *hooks.service_names):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("listening", extra={"address": address, "pid": os.getpid(),
                                 "tls": "off" if hooks.tls is None else "mutual" if hooks.tls[2] else "on"})

    stop_event = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)

    async def start_up() -> None:
        if hooks.start:
            await hooks.start()
        gate.ready = True
        for service in ("", *hooks.service_names):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"address": address})
        await _watch_dependencies(hooks.dependencies, health_servicer)

    starting = asyncio.create_task(start_up())
    stopping = asyncio.create_task(stop_event.wait())
    done, _ = await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    start_failed = starting in done and starting.exception() is not None
    if start_failed:
        log.error("start-up failed", exc_info=starting.exception())
        stop_event.set()
    await stop_event.wait()
    starting.cancel()
    log.info("stopping", extra={"grace_seconds": hooks.grace_seconds})
    for service in ("", *hooks.service_names):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(hooks.grace_seconds)
    gate.ready = False
    if hooks.stop:
        await hooks.stop()
    log.info("stopped")
    return 1 if start_failed else 0


def _add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Server reflection, v1 and v1alpha. grpcio-reflection serves only v1alpha
    (grpc/grpc#38576), while buf curl, grpcurl 1.9+, Postman and grpc-java ask for v1 first.
    The two protocols have the same messages on the wire under another package name, so
    the same servicer answers both; the v1 descriptor (v1alpha's under the v1 package) is
    added to the pool so reflection can describe itself."""
    _register_reflection_v1_descriptor()
    servicer = reflection.aio.ReflectionServicer([*service_names, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    })])


def _register_reflection_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file.name, file.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    for message in file.message_type:
        for proto_field in message.field:
            if proto_field.HasField("type_name"):
                proto_field.type_name = proto_field.type_name.replace(old, new)
    for service in file.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new)
            method.output_type = method.output_type.replace(old, new)
    pool.Add(file)


def _read(path: str) -> bytes:
    with open(path, "rb") as file:
        return file.read()


DEPENDENCY_CHECK_SECONDS = 2.0


async def _watch_dependencies(checks: dict[str, Callable[[], bool]], health_servicer: Any) -> None:
    """Keeps the health of each "dependency:<name>" up to date, logging each change."""
    if not checks:
        return
    last: dict[str, bool] = {}
    while True:
        for name, check in checks.items():
            try:
                healthy = bool(check())
            except Exception:  # noqa: BLE001 - a failing check is an unhealthy dependency
                log.exception("dependency check failed", extra={"dependency": name})
                healthy = False
            if last.get(name) != healthy:
                if name in last:
                    (log.info if healthy else log.warning)(
                        "dependency " + ("reachable again" if healthy else "unreachable: serving degraded"),
                        extra={"dependency": name})
                last[name] = healthy
                await health_servicer.set(f"dependency:{name}", health_pb2.HealthCheckResponse.SERVING if healthy
                                          else health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(DEPENDENCY_CHECK_SECONDS)


def run(hooks: ServiceHooks) -> None:
    """Serves `hooks` in this process, traced when OTEL_EXPORTER_OTLP_ENDPOINT is set (libs.tracing)."""
    tracing.setup(hooks.name)
    try:
        code = asyncio.run(serve(hooks))
    finally:
        tracing.shutdown()  # exports the spans still buffered
    sys.exit(code)


def run_service(name: str, settings: S, build_hooks: Callable[[S], ServiceHooks]) -> None:
    """A service's main(): JSON logs, then serve until SIGTERM; exits non-zero if start-up failed."""
    configure_logging(name, settings.log_level, settings.log_pseudonym_key)
    run(build_hooks(settings))


T = TypeVar("T")


async def in_daemon_thread(function: Callable[..., T], *args: Any) -> T:
    """Runs blocking start-up work (waiting for Kinesis, a database) off the event loop.

    Unlike asyncio.to_thread, the thread is a daemon: a SIGTERM during a start-up that
    waits on an unreachable dependency stops the process at once instead of waiting for
    that call to give up.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def target() -> None:
        try:
            result = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting task
            captured = error
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(settle, lambda: future.set_exception(captured))
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=target, name=getattr(function, "__name__", "start-up"), daemon=True).start()
    return await future
