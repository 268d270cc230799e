"""Prometheus metrics every service exports, and the HTTP endpoint that serves them.

RPC metrics use the names dashboards already know from grpc-ecosystem's
go-grpc-prometheus (`grpc_server_started_total`, `grpc_server_handled_total`,
`grpc_server_handling_seconds`); the server bootstrap records them for every method.
The service runtime records the stream metrics (records consumed, batch sizes, dead
letters; consumer lag, leases held and outbox depth are read when scraped); services
add their own domain metrics with prometheus_client directly. Counters that describe
committed work are moved only once the transaction commits (`libs.db.after_commit`), so a batch
rolled back and retried is counted once. This module imports no SQLAlchemy or gRPC, so
registration's small supervisor process can serve its workers' metrics.

Each service serves `/metrics` on its own port (`<SERVICE>_METRICS_PORT`, 0 turns it
off) on BIND_HOST. Several processes behind one port (registration's
REGISTRATION_PROCESSES) use prometheus_client's multiprocess mode: the supervisor
serves the sum of its workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Lags run from milliseconds (idle) to minutes (a backlog being drained).
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

_RPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
RPC_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", _RPC_LABELS)
RPC_HANDLED = Counter("grpc_server_handled_total", "RPCs completed on the server, whatever their status.",
                      [*_RPC_LABELS, "grpc_code"])
RPC_SECONDS = Histogram("grpc_server_handling_seconds",
                        "Time from the start of an RPC to its end (its status sent), seconds.", _RPC_LABELS,
                        buckets=_LATENCY_BUCKETS)

RECORDS_CONSUMED = Counter("coursesignup_stream_records_consumed_total",
                           "Stream records whose batch committed (dead letters included).", ["stream"])
BATCH_RECORDS = Histogram("coursesignup_stream_batch_records", "Records per committed batch.", ["stream"],
                          buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 10000))
DEAD_LETTERS = Counter("coursesignup_stream_dead_letters_total",
                       "Records that could not be handled and went to the dead_letters table.", ["stream"])
OUTBOX_PUBLISHED = Counter("coursesignup_outbox_published_total", "Outbox rows published to their stream.")
OUTBOX_PUBLISH_SECONDS = Histogram("coursesignup_outbox_publish_seconds",
                                   "Time from an outbox row's commit to its publication (PutRecords acknowledged).",
                                   buckets=LAG_BUCKETS)


class RpcMetrics:
    """The three RPC metrics of one method, with their labels bound once."""

    def __init__(self, method: str, grpc_type: str) -> None:
        _, service, name = method.split("/", 2) if method.count("/") >= 2 else ("", "unknown", method)
        labels = (grpc_type, service, name)
        self._labels = labels
        self._started = RPC_STARTED.labels(*labels)
        self._seconds = RPC_SECONDS.labels(*labels)
        self._handled: dict[str, Any] = {}

    def started(self) -> float:
        self._started.inc()
        return time.perf_counter()

    def handled(self, started: float, code: str) -> None:
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = RPC_HANDLED.labels(*self._labels, code)
        counter.inc()
        self._seconds.observe(time.perf_counter() - started)


class GaugesAtScrape(Collector):
    """Gauges computed when Prometheus scrapes (no cost between scrapes)."""

    def __init__(self, collect: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            yield from self._collect()
        except Exception:  # noqa: BLE001 - a scrape must not fail because one source is down
            log.warning("a metrics source failed during a scrape", exc_info=True)

    def describe(self) -> list[Any]:
        return []  # computed at scrape: nothing to check at registration


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def registry_for_scrape() -> CollectorRegistry:
    """The default registry, or in multiprocess mode one that sums every worker's files."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry


class MetricsEndpoint:
    """`/metrics` over HTTP on host:port, in a daemon thread, until `stop`."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry | None = None) -> None:
        self.host, self.port = host, port
        self._registry = registry or REGISTRY
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self._registry)
        self.port = self._server.server_port
        log.info("metrics", extra={"address": f"http://{self.host}:{self.port}/metrics"})

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
