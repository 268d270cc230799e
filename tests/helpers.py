"""Test helpers: free ports, real local servers (kinesalite, aiosmtpd), PostgreSQL schemas."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from libs.grpc_server import ServiceHooks

import sqlalchemy

from dev.ports import listening

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if listening(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextlib.contextmanager
def kinesalite(path: pathlib.Path | None = None) -> Iterator[str]:
    """A real kinesalite on 127.0.0.1 (in memory unless path is given); yields its URL."""
    port = free_port()
    command = ["node", str(ROOT / "dev" / "kinesalite.js"), "--port", str(port)]
    if path:
        command += ["--path", str(path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


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
def serve_in_thread(hooks: ServiceHooks, timeout: float = 60.0) -> Iterator[None]:
    """Runs a service's gRPC server in a background event loop until the block ends."""
    import asyncio
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

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

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for_port(hooks.port, timeout)
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{hooks.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if failure or not thread.is_alive():
                raise RuntimeError(f"{hooks.name} failed to start: {failure}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{hooks.name} not SERVING after {timeout}s")
            time.sleep(0.1)
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
