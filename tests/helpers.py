"""Test helpers: free ports, real local servers (kinesalite, aiosmtpd), PostgreSQL schemas."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pathlib
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

    from libs.grpc_server import ServiceHooks

import sqlalchemy

from dev.ports import listening

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


# The admin token every service started by the tests accepts (tests/conftest.py sets
# ADMIN_TOKENS): catalogue writes and personal-data reads send ADMIN_METADATA.
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
ADMIN_METADATA = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    wait_until(lambda: listening(port), timeout, f"something listening on 127.0.0.1:{port}", interval=0.05)


@contextlib.contextmanager
def kinesalite(path: pathlib.Path | None = None, shard_limit: int = 100_000) -> Iterator[str]:
    """A real kinesalite on 127.0.0.1 (in memory unless path is given); yields its URL.

    Tests share one server and each creates its own streams, so the open-shard limit
    (10 by default in kinesalite, like a new AWS account's) is raised."""
    with kinesalite_process(path, shard_limit) as (url, _process):
        yield url


@contextlib.contextmanager
def kinesalite_process(path: pathlib.Path | None = None, shard_limit: int = 100_000, *, port: int | None = None,
                       log_path: pathlib.Path | None = None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """As `kinesalite`, also yielding the process (for tests that pause or kill it); on
    `port` when given, its output appended to `log_path` when given."""
    port = port or free_port()
    command = ["node", str(ROOT / "dev" / "kinesalite.js"), "--port", str(port), "--shard-limit", str(shard_limit)]
    if path:
        command += ["--path", str(path)]
    if log_path is None:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    else:
        with open(log_path, "ab") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.send_signal(signal.SIGCONT)  # a paused one cannot handle SIGTERM
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition",
               interval: float = 0.2) -> Any:
    """Polls `predicate` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def partition_key_per_shard(client: Any, stream: str) -> dict[str, str]:
    """A partition key landing on each open shard of `stream` (Kinesis and kinesalite put a
    record on the shard whose hash key range holds the MD5 of its key), by shard id: to
    send a marker record down every shard, behind what is already on it."""
    shards = [s for s in client.list_shards(StreamName=stream)["Shards"]
              if "EndingSequenceNumber" not in s["SequenceNumberRange"]]
    keys: dict[str, str] = {}
    for index in itertools.count():
        key = f"marker-{index}"
        hashed = int(hashlib.md5(key.encode()).hexdigest(), 16)  # noqa: S324 - Kinesis's hash, not security
        for shard in shards:
            hash_range = shard["HashKeyRange"]
            if int(hash_range["StartingHashKey"]) <= hashed <= int(hash_range["EndingHashKey"]):
                keys.setdefault(shard["ShardId"], key)
        if len(keys) == len(shards):
            return keys
    raise AssertionError("unreachable")


def wait_serving(port: int, timeout: float, check_alive: Callable[[], None]) -> None:
    """Waits until the gRPC server on `port` reports SERVING; `check_alive` raises if it died."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def serving() -> bool:
            check_alive()
            if not listening(port):
                return False
            try:
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        wait_until(serving, timeout, f"127.0.0.1:{port} SERVING", interval=0.1)


def postgres_url() -> str:
    return os.environ.get("TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)


def postgres_available() -> bool:
    try:
        engine = sqlalchemy.create_engine(postgres_url().replace("postgresql://", "postgresql+psycopg://", 1))
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema; yields a SQLAlchemy URL whose search_path is that schema."""
    base = postgres_url().replace("postgresql://", "postgresql+psycopg://", 1)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
        admin.dispose()


@contextlib.contextmanager
def serve_enrollment(database_url: str, **settings: Any) -> Iterator[str]:
    """A real enrollment server (one shard per stream) in this process; its address.
    Kinesis comes from the environment (the kinesis_env fixture)."""
    from services.enrollment.bootstrap import build_hooks
    from services.enrollment.settings import EnrollmentSettings

    port = free_port()
    configured = EnrollmentSettings(
        enrollment_port=port, enrollment_database_url=database_url, kinesis_shard_count=1, **settings
    )
    with serve_in_thread(build_hooks(configured)):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def serve_in_thread(hooks: ServiceHooks, timeout: float = 60.0) -> Iterator[None]:
    """Runs a service's gRPC server in a background event loop until the block ends."""
    import asyncio
    import threading

    from libs.grpc_server import serve

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(serve(hooks, stop))
        except BaseException as error:  # noqa: BLE001 - reported to the test
            failure.append(error)

    started = threading.Event()
    if hooks.tls is not None:
        # A plaintext health check cannot reach a TLS port: wait for the start-up itself,
        # after which the server serves (readiness is set before the loop runs anything else).
        start = hooks.start

        async def start_then_signal() -> None:
            if start is not None:
                await start()
            started.set()

        hooks.start = start_then_signal

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def check_alive() -> None:
        if failure or not thread.is_alive():
            raise RuntimeError(f"{hooks.name} failed to start: {failure}")

    if hooks.tls is None:
        wait_serving(hooks.port, timeout, check_alive)
    else:
        wait_until(lambda: check_alive() or started.is_set(), timeout, f"{hooks.name} started")
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


class TcpProxy:
    """A loopback TCP proxy that can be cut and restored: a database that goes away.

    While stopped, nothing listens on its port and every connection through it is
    closed, exactly what a client sees when the server host dies or is partitioned.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        import asyncio
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, coroutine: object) -> object:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)  # type: ignore[arg-type]

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import asyncio

        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, upstream_writer}
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}

    async def _start(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _stop(self) -> None:
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples a /metrics endpoint on 127.0.0.1 serves: (name, sorted labels) -> value."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric_sum(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= set(sample_labels))
