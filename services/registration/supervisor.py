"""`python -m services.registration`: one server process, or a parent of several sharing the port.

Registration is stateless and one Python process uses at most one core (the GIL), so
with REGISTRATION_PROCESSES > 1 this process becomes a small parent, like gunicorn's
arbiter: it starts that many workers (`python -m services.registration --worker i`),
each a normal server with its own health and readiness, listening on the same port
with SO_REUSEPORT, so the kernel spreads new TCP connections over them (one connection,
hence one client channel, stays on one worker). The parent forwards SIGTERM/SIGINT,
waits for the workers to finish their calls and exits 0 when they all did; a worker
that dies on its own is started again, with a backoff. Workers get SIGTERM should the
parent itself die (PR_SET_PDEATHSIG). Make run, compose and Kubernetes see one process,
and one /metrics: the workers write prometheus_client's multiprocess files and the
parent serves their sum.

This module imports no gRPC, boto3 or SQLAlchemy: the parent stays small.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType

from libs.backoff import Backoff
from libs.config import load_settings
from libs.logs import configure_logging
from libs.metrics import MetricsEndpoint, registry_for_scrape
from services.registration.settings import RegistrationSettings

log = logging.getLogger("services.registration.supervisor")

_PR_SET_PDEATHSIG = 1
# A worker that keeps dying is restarted after 0.5 s, 1 s, 2 s ... up to 30 s.
RESTART_BACKOFF = Backoff(base_seconds=0.5, cap_seconds=30.0)
STABLE_SECONDS = 60.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def port_is_free(host: str, port: int) -> bool:
    """False when something already listens there (e.g. another copy of this service)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Supervisor:
    def __init__(self, count: int, settings: RegistrationSettings) -> None:
        self.count = count
        self.settings = settings
        self.workers: dict[int, tuple[subprocess.Popen[bytes], float]] = {}  # index -> (process, started)
        self.failures: dict[int, int] = {}
        self.restart_at: dict[int, float] = {}
        self.stopping: float | None = None
        self.exit_code = 0

    def spawn(self, index: int) -> None:
        process = subprocess.Popen([sys.executable, "-m", "services.registration", "--worker", str(index)],
                                   preexec_fn=_die_with_parent)  # safe: the parent runs no threads
        self.workers[index] = (process, time.monotonic())
        log.info("worker started", extra={"worker": index, "pid": process.pid})

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping is None:
            self.stopping = time.monotonic()
            log.info("stopping workers", extra={"signal": signal.Signals(signum).name})
        for process, _ in self.workers.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def reap(self) -> None:
        now = time.monotonic()
        for index, (process, started) in list(self.workers.items()):
            code = process.poll()
            if code is None:
                continue
            del self.workers[index]
            if self.stopping is not None:
                self.exit_code = max(self.exit_code, code if code >= 0 else 1)
                log.info("worker stopped", extra={"worker": index, "pid": process.pid, "exit_code": code})
                continue
            self.failures[index] = 0 if now - started > STABLE_SECONDS else self.failures.get(index, 0) + 1
            # A worker that ran stably has 0 failures: restarted after the first delay.
            delay = RESTART_BACKOFF.delay(self.failures[index] + 1)
            log.error("worker exited; starting it again",
                      extra={"worker": index, "pid": process.pid, "exit_code": code,
                             "restart_in_seconds": round(delay, 2)})
            self.restart_at[index] = now + delay

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        with tempfile.TemporaryDirectory(prefix="registration-metrics-") as directory:
            # The workers inherit it: each writes its metrics there, and this process
            # serves their sum on REGISTRATION_METRICS_PORT.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            endpoint = None
            if self.settings.registration_metrics_port:
                endpoint = MetricsEndpoint(self.settings.bind_host, self.settings.registration_metrics_port,
                                           registry_for_scrape())
                endpoint.start()
            try:
                return self._supervise()
            finally:
                if endpoint is not None:
                    endpoint.stop()

    def _supervise(self) -> int:
        for index in range(self.count):
            self.spawn(index)
        # Workers finish in-flight calls within the grace period, then flush; past a
        # generous margin they are killed so the parent never hangs.
        kill_after = self.settings.shutdown_grace_seconds + 20
        while self.workers or (self.stopping is None and self.restart_at):
            time.sleep(0.1)
            self.reap()
            now = time.monotonic()
            if self.stopping is None:
                for index, when in list(self.restart_at.items()):
                    if now >= when:
                        del self.restart_at[index]
                        self.spawn(index)
            elif now - self.stopping > kill_after:
                for index, (process, _) in self.workers.items():
                    log.error("worker did not stop; killing it", extra={"worker": index, "pid": process.pid})
                    process.kill()
                self.exit_code = 1
        log.info("stopped", extra={"exit_code": self.exit_code})
        return self.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.registration")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    settings = load_settings(RegistrationSettings)
    count = settings.worker_processes()
    if args.worker is None and count > 1:
        configure_logging("registration", settings.log_level, settings.log_pseudonym_key)
        if not port_is_free(settings.bind_host, settings.registration_port):
            log.error("port already in use", extra={"address": f"{settings.bind_host}:{settings.registration_port}"})
            return 1
        log.info("starting worker processes", extra={"processes": count, "port": settings.registration_port})
        return Supervisor(count, settings).run()
    from services.registration.bootstrap import serve_worker  # the heavy imports, in workers only

    serve_worker(settings, args.worker)
    return 0
