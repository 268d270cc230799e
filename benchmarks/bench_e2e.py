"""End to end: the whole mesh under open-loop load, against a synchronous baseline, same run.

    make bench BENCH=e2e
    E2E_PHASE_SECONDS=5 E2E_DATABASES=sqlite make bench BENCH=e2e     # a short smoke run

For each database (PostgreSQL: one fresh database per service, created and dropped here;
SQLite: one file per service in a temporary directory, as `make run` does):

1. kinesalite on disk, a real SMTP server (aiosmtpd's Sink) as its own process, and the
   four services as separate processes (tests.mesh.running_mesh; LOG_LEVEL=WARNING,
   KINESIS_SHARD_COUNT=4, LEASE_SECONDS=10 as in production rather than the tests' 3).
2. The load client, its own process (benchmarks/e2e_client.py):
   a. the empty-call ceiling: closed-loop Health/Check on registration, 64 in flight,
      8 s after a 2 s warm-up;
   b. a closed-loop Register burst, 32 in flight, 10 s: calls/s against the ceiling;
   c. open-loop Register phases at E2E_RATES calls/s (250, 500, 1000: the rates of
      issue 8's table; E2E_PHASES=0.25,0.5 gives fractions of the ceiling instead),
      E2E_PHASE_SECONDS each: call i is due at t0 + i/rate whatever happened before.
   The catalogue (E2E_COURSES courses on 3 campuses) is created through the enrollment
   gRPC API once the ceiling is known: every fifth course gets about 15% of its expected
   sign-ups as capacity (it fills up: declines), the others three times (they never do).
   After each burst or phase the backlog is drained (every accepted registration decided,
   every email out) or E2E_DRAIN_SECONDS pass.
3. Per phase: offered and accepted rates, refusals by gRPC code, Register latency from the
   due time, decision lag (decide_time in enrollment's `decisions` minus the client's OK
   time), email lag (send_time in the notifier's `notifications` minus the same), the
   accepted-but-undecided backlog sampled every second, how long after the burst the
   last email went out, peak RSS and CPU milliseconds per accepted sign-up of every
   process (phase start to drained): the four services, kinesalite, PostgreSQL (all its
   processes, without our monitoring connections), the SMTP sink and the load client.
   "mesh" is registration + enrollment + stats + notifier + kinesalite + PostgreSQL.
4. The synchronous baseline (benchmarks/sync_register.py: one transaction per Register)
   in its own database, at the same offered rates.

"All emails out" is: no notification PENDING, the number of rows stable for 3 s, and as
many rows as the burst's drain showed per sign-up (calibrated there: at least one row per
accepted registration and stable) times the registrations accepted so far; if rows stay
short but stable for 15 s the drain ends and the shortfall is reported.

Writes bench/results/<date>-e2e.json, <date>-e2e.md and <date>-e2e-<db>-{latency,
throughput,cpu}.png (E2E_RESULTS_DIR to write elsewhere). Other settings: E2E_BURST_SECONDS
(10), E2E_CEILING_SECONDS (8), E2E_CHANNELS (4 client connections), E2E_REGISTRATION_PROCESSES
(2), E2E_CALL_TIMEOUT (10 s deadline per call), ADMIN_TOKEN (the bearer token catalogue writes send;
one is made for the run if unset).
"""

from __future__ import annotations

import bisect
import contextlib
import datetime as dt
import json
import math
import os
import pathlib
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import sqlalchemy
from sqlalchemy.engine import make_url

from benchmarks import e2e_report
from benchmarks.e2e_probe import (
    Database,
    MeshDatabases,
    Processes,
    Sample,
    Sampler,
    Snapshot,
    cpu_delta,
    find_child,
    other_backends,
    sqlalchemy_url,
)
from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from tests import helpers
from tests.mesh import running_mesh

ROOT = helpers.ROOT
DATABASES = ("postgresql", "sqlite")
DATA_SERVICES = ("enrollment", "stats", "notifier")
MESH_PROCESSES = ("registration", "enrollment", "stats", "notifier", "kinesalite", "postgresql")
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
CODE_NAMES[-1] = "NO_REPLY"


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Config:
    phase_seconds: float = 60.0
    databases: list[str] = field(default_factory=lambda: list(DATABASES))
    courses: int = 100
    drain_seconds: float = 240.0
    rates: list[float] = field(default_factory=lambda: [250.0, 500.0, 1000.0])
    phases: list[float] = field(default_factory=list)   # fractions of the ceiling, instead of rates
    burst_seconds: float = 10.0
    ceiling_seconds: float = 8.0
    channels: int = 4
    registration_processes: int = 2   # as in make run and compose
    call_timeout: float = 10.0
    results_dir: str = "bench/results"

    @classmethod
    def from_env(cls) -> Config:
        env = os.environ
        databases = [d.strip() for d in env.get("E2E_DATABASES", ",".join(DATABASES)).split(",") if d.strip()]
        unknown = set(databases) - set(DATABASES)
        if unknown:
            raise SystemExit(f"E2E_DATABASES: unknown {sorted(unknown)}; use {', '.join(DATABASES)}")
        return cls(
            phase_seconds=float(env.get("E2E_PHASE_SECONDS", 60)),
            databases=databases,
            courses=int(env.get("E2E_COURSES", 100)),
            drain_seconds=float(env.get("E2E_DRAIN_SECONDS", 240)),
            rates=[float(r) for r in env.get("E2E_RATES", "250,500,1000").split(",") if r.strip()],
            phases=[float(f) for f in env.get("E2E_PHASES", "").split(",") if f.strip()],
            burst_seconds=float(env.get("E2E_BURST_SECONDS", 10)),
            ceiling_seconds=float(env.get("E2E_CEILING_SECONDS", 8)),
            channels=int(env.get("E2E_CHANNELS", 4)),
            registration_processes=int(env.get("E2E_REGISTRATION_PROCESSES", 2)),
            call_timeout=float(env.get("E2E_CALL_TIMEOUT", 10)),
            results_dir=env.get("E2E_RESULTS_DIR", "bench/results"),
        )


# ---------------------------------------------------------------- statistics

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of unsorted `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]


def spread(values: list[float], scale: float = 1.0, digits: int = 3) -> dict[str, float | int | None]:
    def scaled(v: float | None) -> float | None:
        return None if v is None else round(v * scale, digits)
    return {"p50": scaled(percentile(values, 50)), "p99": scaled(percentile(values, 99)),
            "max": scaled(max(values) if values else None), "count": len(values)}


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else None


def buckets(times: list[float], length: int) -> list[int]:
    counts = [0] * length
    for t in times:
        b = int(t)
        if 0 <= b < length:
            counts[b] += 1
    return counts


def bucket_quantiles(pairs: list[tuple[float, float]], length: int, scale: float) -> dict[str, list[float | None]]:
    """Per-second p50/p99 of the values of (time, value) pairs."""
    grouped: list[list[float]] = [[] for _ in range(length)]
    for t, v in pairs:
        b = int(t)
        if 0 <= b < length:
            grouped[b].append(v)
    def q(values: list[float], p: float) -> float | None:
        value = percentile(values, p)
        return None if value is None else round(value * scale, 3)
    return {"p50": [q(g, 50) for g in grouped], "p99": [q(g, 99) for g in grouped]}


def ms_per_signup(cpu_seconds: dict[str, float], accepted: int) -> dict[str, float | None]:
    return {name: (round(value * 1000 / accepted, 3) if accepted else None) for name, value in cpu_seconds.items()}


# ---------------------------------------------------------------- infrastructure

@contextlib.contextmanager
def postgres_databases(names: list[str]) -> Iterator[dict[str, str]]:
    """A fresh PostgreSQL database per name (dropped at the end); yields name -> postgresql:// URL."""
    base = make_url(helpers.postgres_url())
    admin = sqlalchemy.create_engine(sqlalchemy_url(helpers.postgres_url()), isolation_level="AUTOCOMMIT")
    run = uuid.uuid4().hex[:8]
    databases = {name: f"e2e_{run}_{name.replace('-', '_')}" for name in names}
    created: list[str] = []
    try:
        with admin.connect() as conn:
            for database in databases.values():
                conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
                created.append(database)
        yield {name: base.set(database=database).render_as_string(hide_password=False)
               for name, database in databases.items()}
    finally:
        with admin.connect() as conn:
            for database in created:
                with contextlib.suppress(Exception):
                    conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.dispose()


@contextlib.contextmanager
def database_urls(kind: str, tmp: pathlib.Path, names: list[str]) -> Iterator[dict[str, str]]:
    if kind == "postgresql":
        with postgres_databases(names) as urls:
            yield urls
    else:
        yield {name: f"sqlite:///{tmp / f'{name}.db'}" for name in names}


def database_name(url: str) -> str:
    return make_url(url).database or ""


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def smtp_sink(logs: pathlib.Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """aiosmtpd with its Sink handler (250, discard) as its own process on 127.0.0.1."""
    port = helpers.free_port()
    with open(logs / "smtp.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        helpers.wait_for_port(port)
        yield port, process
    finally:
        stop_process(process)


@contextlib.contextmanager
def sync_server(url: str, courses_file: pathlib.Path,
                logs: pathlib.Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = helpers.free_port()
    env = {**os.environ, "SYNC_DATABASE_URL": url, "SYNC_PORT": str(port), "SYNC_COURSES_FILE": str(courses_file),
           "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    with open(logs / "sync-register.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks.sync_register"], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    def check_alive() -> None:
        if process.poll() is not None:
            raise RuntimeError(f"sync_register exited: {(logs / 'sync-register.log').read_text()[-2000:]}")
    try:
        helpers.wait_serving(port, 60, check_alive)
        yield f"127.0.0.1:{port}", process
    finally:
        stop_process(process)


def admin_metadata() -> list[tuple[str, str]]:
    """The bearer token catalogue writes send: ADMIN_TOKEN, else one made for this run
    (and given to the services it starts as their ADMIN_TOKENS)."""
    token = os.environ.setdefault("ADMIN_TOKEN", secrets.token_urlsafe(24))
    os.environ.setdefault("ADMIN_TOKENS", token)
    return [("authorization", f"Bearer {token}")]


def create_catalogue(target: str, courses: list[dict[str, Any]]) -> None:
    metadata = admin_metadata()
    with grpc.insecure_channel(target) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        for campus in sorted({c["campus_id"] for c in courses}):
            stub.CreateCampus(enrollment_pb2.CreateCampusRequest(
                campus=enrollment_pb2.Campus(campus_id=campus, name=f"Campus {campus}")), metadata=metadata, timeout=10)
        for course in courses:
            stub.CreateCourse(enrollment_pb2.CreateCourseRequest(course=enrollment_pb2.Course(
                course_id=course["course_id"], campus_id=course["campus_id"], name=course["name"],
                capacity=course["capacity"])), metadata=metadata, timeout=10)


def planned_phases(config: Config, ceiling: float) -> list[tuple[str, float, float]]:
    """(label, fraction of the ceiling, offered rate) of each open-loop phase."""
    if config.phases:
        return [(f"p{round(f * 100)}", f, f * ceiling) for f in config.phases]
    return [(f"{rate:g}/s", rate / ceiling, rate) for rate in config.rates]


def plan_catalogue(config: Config, ceiling: float) -> list[dict[str, Any]]:
    """Capacities from the sign-ups expected (every offered call, a burst at 60% of the ceiling)."""
    expected = 0.6 * ceiling * config.burst_seconds + sum(
        rate * config.phase_seconds for _, _, rate in planned_phases(config, ceiling))
    per_course = expected / config.courses
    campuses = ("north", "south", "east")
    courses = []
    for k in range(config.courses):
        small = k % 5 == 0
        capacity = max(5, int(per_course * 0.15)) if small else int(per_course * 3) + 10
        courses.append({"course_id": f"e2e-{k:03d}", "campus_id": campuses[k % len(campuses)],
                        "name": f"Course {k:03d}", "capacity": min(capacity, 2**31 - 1)})
    return courses


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "memory_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20),
            "git_commit": commit}


def log_summary(logs: pathlib.Path) -> dict[str, Any]:
    """Lines by level in each service log (JSON lines), with the first distinct warnings and errors."""
    summary: dict[str, Any] = {}
    for path in sorted(logs.glob("*.log")):
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
                level, message = str(entry.get("level", "?")), str(entry.get("message", ""))
                detail = entry.get("code") or entry.get("error") or ""
            except (json.JSONDecodeError, AttributeError):
                level, message, detail = "text", line[:200], ""
            levels[level] += 1
            if level in ("warning", "error", "critical", "text"):
                messages[f"{level}: {message}{f' ({detail})' if detail else ''}"[:300]] += 1
        summary[path.stem] = {"lines_by_level": dict(levels), "top_messages": dict(messages.most_common(8))}
    return summary


# ---------------------------------------------------------------- the load client

class ClientFailed(RuntimeError):
    pass


def run_client(mode: str, target: str, out: pathlib.Path, extra: list[str], limit: float,
               on_ready: Callable[[], None] | None = None,
               on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.e2e_client", mode, "--target", target, "--out", str(out), *extra]
    err_path = out.with_suffix(".stderr")
    with open(err_path, "wb") as err:
        process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                   text=True, bufsize=1)
    timer = threading.Timer(limit, process.kill)
    timer.start()
    try:
        assert process.stdout is not None and process.stdin is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue
            if message.get("ready"):
                if on_ready:
                    on_ready()
                process.stdin.write(f"{time.time() + 0.2:.6f}\n")
                process.stdin.flush()
            elif "progress" in message and on_progress:
                on_progress(message)
        code = process.wait()
    finally:
        timer.cancel()
        stop_process(process, 5)
    if code != 0 or not out.exists():
        raise ClientFailed(f"load client {mode} exited {code}: {err_path.read_text(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


@dataclass
class Calls:
    """A client result, analysed."""

    origin: float
    seconds: float
    ok: int
    refusals: dict[str, int]
    accept_times: dict[str, float]     # registration id -> epoch of the OK reply
    ok_ends: list[float]               # sorted epochs of OK replies
    summary: dict[str, Any]
    raw: dict[str, Any]


def analyse_calls(result: dict[str, Any]) -> Calls:
    origin, seconds = result["origin"], result["seconds"]
    due, start, end, codes, rids = (result[k] for k in ("due", "start", "end", "code", "registration_id"))
    ok_latency = [e - d for d, e, c in zip(due, end, codes) if c == 0]
    lateness = [s - d for d, s, c in zip(due, start, codes) if c != -1]
    refusals = Counter(CODE_NAMES.get(c, str(c)) for c in codes if c != 0)
    accept_times = {rid: origin + e for rid, e, c in zip(rids, end, codes) if c == 0}
    ok = len(accept_times)
    summary = {
        "calls": len(codes), "ok": ok, "offered_rate": round(len(codes) / seconds, 1) if seconds else None,
        "accepted_rate": round(ok / seconds, 1) if seconds else None, "refusals": dict(refusals),
        "latency_ms": spread(ok_latency, 1000, 2), "client_lateness_ms": spread(lateness, 1000, 2),
        "error_samples": result.get("error_samples", {}),
        "refusal_latency_ms": spread([e - d for d, e, c in zip(due, end, codes) if c not in (0, -1)], 1000, 2),
    }
    return Calls(origin, seconds, ok, dict(refusals), accept_times, sorted(accept_times.values()), summary, result)


def call_series(calls: Calls, length: int) -> dict[str, Any]:
    r = calls.raw
    ok = [(d, e) for d, e, c in zip(r["due"], r["end"], r["code"]) if c == 0]
    latency = bucket_quantiles([(d, e - d) for d, e in ok], length, 1000)
    return {
        "offered": buckets(r["due"], length),
        "accepted": buckets([e for _, e in ok], length),
        "refused": buckets([e for e, c in zip(r["end"], r["code"]) if c != 0], length),
        "latency_p50_ms": latency["p50"], "latency_p99_ms": latency["p99"],
    }


# ---------------------------------------------------------------- the mesh

@dataclass
class Drain:
    drained: bool
    end_sample: Sample | None
    seconds_after_burst: float
    emails_short: int = 0
    note: str = ""


class MeshBench:
    def __init__(self, config: Config, kind: str, work: pathlib.Path, target: str, processes: Processes,
                 sampler: Sampler, databases: MeshDatabases, courses_file: pathlib.Path) -> None:
        self.config = config
        self.kind = kind
        self.work = work
        self.target = target
        self.processes = processes
        self.sampler = sampler
        self.databases = databases
        self.courses_file = courses_file
        self.accepted_total = 0
        self.emails_per_signup: int | None = None

    def _progress_printer(self, label: str, accepted_before: int) -> Callable[[dict[str, Any]], None]:
        last = [0.0]

        def show(progress: dict[str, Any]) -> None:
            now = time.time()
            if now - last[0] < 3:
                return
            last[0] = now
            sample = self.sampler.latest()
            extra = ""
            if sample and sample.counts:
                undecided = accepted_before + progress["ok"] - sample.counts["decided"]
                extra = f" | undecided {undecided}, emails pending {sample.counts['emails_pending']}"
            say(f"  {self.kind} {label}: sent {progress['sent']}, accepted {progress['ok']}, "
                f"refused {progress['refused']}, in flight {progress['in_flight']}{extra}")
        return show

    def wait_drained(self, label: str, burst_end: float, calibrate: bool) -> Drain:
        deadline = burst_end + self.config.drain_seconds
        quiet_since: Sample | None = None
        quiet_total = -1
        next_print = time.time()
        while True:
            time.sleep(0.5)
            sample = self.sampler.latest()
            now = time.time()
            if sample is None or not sample.counts:
                if now > deadline:
                    return Drain(False, sample, now - burst_end, note="no samples")
                continue
            c = sample.counts
            undecided = self.accepted_total - c["decided"]
            quiet = undecided <= 0 and c["emails_pending"] == 0
            if not quiet or c["emails_total"] != quiet_total:
                quiet_since = sample if quiet else None
                quiet_total = c["emails_total"] if quiet else -1
            if now >= next_print:
                say(f"  drain {label}: {now - burst_end:.0f} s after the burst, undecided {undecided}, "
                    f"emails pending {c['emails_pending']}, sent {c['emails_sent']}, failed {c['emails_failed']}")
                next_print = now + 3
            if quiet_since is not None and sample.time - quiet_since.time >= 3:
                done = c["emails_sent"] + c["emails_failed"]
                stable = sample.time - quiet_since.time
                if self.emails_per_signup is not None:
                    expected = self.emails_per_signup * self.accepted_total
                    if done >= expected:
                        return Drain(True, quiet_since, quiet_since.time - burst_end)
                    if stable >= 15:
                        return Drain(True, quiet_since, quiet_since.time - burst_end, emails_short=expected - done,
                                     note=f"{expected - done} emails fewer than {self.emails_per_signup} per sign-up")
                elif calibrate and self.databases.distinct_notified() >= self.accepted_total:
                    if self.accepted_total:
                        self.emails_per_signup = max(1, round(done / self.accepted_total))
                    return Drain(True, quiet_since, quiet_since.time - burst_end)
                elif stable >= 15:
                    return Drain(True, quiet_since, quiet_since.time - burst_end,
                                 note="drained without a calibrated email count")
            if now > deadline:
                return Drain(False, sample, now - burst_end)

    def phase(self, label: str, mode: str, extra: list[str], fraction: float | None, seconds: float) -> dict[str, Any]:
        accepted_before = self.accepted_total
        decided_before = (self.sampler.latest() or Sample(0, Snapshot(0, {}, {}, 0), {}, {})).counts.get("decided", 0)
        last_id = self.databases.last_notification_id()
        start: list[Snapshot] = []
        say(f"  {self.kind} {label}: starting ({mode}{f', {fraction:.0%} of the ceiling' if fraction else ''}, "
            f"{seconds:g} s)")
        result = run_client(mode, self.target, self.work / f"{self.kind}-{label.replace('/', '-per-')}.json",
                            ["--courses-file", str(self.courses_file), "--label", label, "--seconds", str(seconds),
                             "--channels", str(self.config.channels), "--timeout", str(self.config.call_timeout),
                             *extra],
                            limit=seconds + self.config.call_timeout + 120,
                            on_ready=lambda: start.append(self.processes.snapshot()),
                            on_progress=self._progress_printer(label, accepted_before))
        calls = analyse_calls(result)
        self.accepted_total += calls.ok
        burst_end = calls.origin + calls.seconds
        say(f"  {self.kind} {label}: {calls.summary['calls']} calls, {calls.ok} accepted "
            f"({calls.summary['accepted_rate']}/s), refusals {calls.refusals or 'none'}; draining")
        drain = self.wait_drained(label, burst_end, calibrate=self.emails_per_signup is None)
        end_snapshot = drain.end_sample.snapshot if drain.end_sample else self.processes.snapshot()
        window_end = drain.end_sample.time if drain.end_sample else time.time()
        say(f"  {self.kind} {label}: {'drained' if drain.drained else 'NOT drained'} "
            f"{drain.seconds_after_burst:.1f} s after the burst {drain.note}")
        return self._report(label, fraction, calls, start[0] if start else end_snapshot, end_snapshot,
                            window_end, drain, accepted_before, decided_before, last_id, result)

    def _report(self, label: str, fraction: float | None, calls: Calls, start: Snapshot, end: Snapshot,
                window_end: float, drain: Drain, accepted_before: int, decided_before: int, last_id: int,
                result: dict[str, Any]) -> dict[str, Any]:
        origin = calls.origin
        decisions = [d for d in self.databases.decisions_since(origin - 5) if d[0] in calls.accept_times]
        notes = [n for n in self.databases.notifications_after(last_id) if n[0] in calls.accept_times]
        decision_lag = [(calls.accept_times[rid] - origin, when - calls.accept_times[rid])
                        for rid, _, when in decisions]
        sent = [(rid, kind, when) for rid, kind, status, when in notes if status == "SENT" and when is not None]
        email_lag = [when - calls.accept_times[rid] for rid, _, when in sent]
        by_kind: dict[str, list[float]] = {}
        for rid, kind, when in sent:
            by_kind.setdefault(kind, []).append(when - calls.accept_times[rid])
        last_email = max((when for _, _, when in sent), default=None)

        samples = self.sampler.between(origin - 1, window_end + 0.5)
        backlog_points = []
        for s in samples:
            if s.counts:
                accepted = accepted_before + bisect.bisect_right(calls.ok_ends, s.time)
                # Clamped at 0: a decision can land before the client, short of CPU, reads its OK.
                backlog_points.append((s.time - origin, max(0, accepted - s.counts["decided"]),
                                       s.counts["emails_pending"]))
        during = [(t, b) for t, b, _ in backlog_points if 0 <= t <= calls.seconds]
        at_burst_end = min(backlog_points, key=lambda p: abs(p[0] - calls.seconds))[1] if backlog_points else None
        length = max(1, math.ceil(window_end - origin) + 1)
        series = call_series(calls, length)
        lag_q = bucket_quantiles(decision_lag, length, 1)
        series.update({
            "decided": buckets([when - origin for _, _, when in decisions], length),
            "emails_sent": buckets([when - origin for _, _, when in sent], length),
            "decision_lag_p50_s": lag_q["p50"], "decision_lag_p99_s": lag_q["p99"],
            "backlog": [[round(t, 2), b] for t, b, _ in backlog_points],
            "emails_pending": [[round(t, 2), p] for t, _, p in backlog_points],
        })
        cpu = cpu_delta(start, end, self.sampler.other_backends)
        cpu["load client"] = result["client_cpu_seconds"]
        cpu["mesh"] = sum(cpu.get(name, 0.0) for name in MESH_PROCESSES)
        if "postgresql" in cpu:
            cpu["mesh without other databases"] = cpu["mesh"] - cpu.get("postgresql other databases", 0.0)
        peak: dict[str, float] = {}
        for s in samples:
            for name, kb in s.memory.items():
                peak[name] = max(peak.get(name, 0.0), round(kb / 1024, 1))
        peak["load client"] = round(result["client_peak_rss_kb"] / 1024, 1)
        outcomes = Counter(outcome for _, outcome, _ in decisions)
        emails_expected = (self.emails_per_signup or 0) * calls.ok
        return {
            "label": label, "fraction_of_ceiling": fraction, "seconds": calls.seconds, **calls.summary,
            "calls_per_second": result.get("calls_per_second"), "concurrency": result.get("concurrency"),
            "decided": len(decisions), "outcomes": dict(outcomes),
            "decision_lag_s": spread([lag for _, lag in decision_lag]),
            "email_lag_s": spread(email_lag), "email_lag_by_kind_s": {k: spread(v) for k, v in sorted(by_kind.items())},
            "emails": {"sent": len(sent), "failed": sum(1 for n in notes if n[2] == "FAILED"),
                       "pending": sum(1 for n in notes if n[2] == "PENDING"), "rows": len(notes),
                       "expected": emails_expected or None, "per_signup_calibrated": self.emails_per_signup},
            "backlog": {
                "carried_over_at_start": accepted_before - decided_before,
                "max": max((b for _, b, _ in backlog_points), default=None),
                "at_end_of_burst": at_burst_end,
                "growth_per_second_during_burst": (round(g, 1) if (g := slope(during)) is not None else None),
                "at_end": backlog_points[-1][1] if backlog_points else None,
                "drained": drain.drained, "drain_note": drain.note, "emails_short": drain.emails_short,
            },
            "drain_limit_s": self.config.drain_seconds,
            "drained_after_burst_s": round(drain.seconds_after_burst, 2) if drain.drained else None,
            "last_email_after_burst_s": (round(last_email - (origin + calls.seconds), 2)
                                         if drain.drained and last_email is not None else None),
            "window_s": round(window_end - origin, 2),
            "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
            "cpu_ms_per_signup": ms_per_signup(cpu, calls.ok),
            "peak_rss_mb": peak,
            "series": series,
        }


def run_mesh(config: Config, kind: str, work: pathlib.Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        urls = stack.enter_context(database_urls(kind, work, list(DATA_SERVICES)))
        say(f"[{kind}] starting kinesalite (on disk), the SMTP sink and the four services")
        kinesis = stack.enter_context(helpers.kinesalite(path=work / "kinesis"))
        kinesalite_pid = find_child(os.getpid(), f"--port {kinesis.rsplit(':', 1)[1]}")
        smtp_port, smtp = stack.enter_context(smtp_sink(logs))
        mesh = stack.enter_context(running_mesh(
            work, kinesis, smtp_port, database_urls=urls,
            extra_env={"LOG_LEVEL": "WARNING", "KINESIS_SHARD_COUNT": "4", "LEASE_SECONDS": "10",
                       "REGISTRATION_PROCESSES": str(config.registration_processes)}))
        databases = MeshDatabases(urls["enrollment"], urls["notifier"])
        stack.callback(databases.close)
        named = {name: mesh.processes[name].pid for name in ("registration", "enrollment", "stats", "notifier")}
        if kinesalite_pid:
            named["kinesalite"] = kinesalite_pid
        named["smtp sink"] = smtp.pid
        # With several registration processes the one started is their parent: the
        # workers' CPU counts as registration's, their RSS each (the largest is shown).
        workers = [find_child(named["registration"], f"--worker {i}") for i in range(config.registration_processes)]
        group = [pid for pid in workers if pid] if config.registration_processes > 1 else []
        if config.registration_processes > 1 and len(group) != config.registration_processes:
            raise RuntimeError(f"found {len(group)} of {config.registration_processes} registration workers")
        processes = Processes(named, postgres=kind == "postgresql", excluded=databases.backend_pids,
                              workers={"registration": group} if group else {})
        own = {database_name(u) for u in urls.values()}
        sampler = Sampler(processes, databases.counts,
                          (lambda: other_backends(databases.enrollment, own)) if kind == "postgresql" else None)
        stack.enter_context(sampler.running())
        out["processes"] = {name: pid for name, pid in named.items()}

        idle_start = processes.snapshot()
        time.sleep(5)
        idle_end = processes.snapshot()
        out["idle_cpu_percent"] = {k: round(v * 100 / (idle_end.time - idle_start.time), 1)
                                   for k, v in cpu_delta(idle_start, idle_end, sampler.other_backends).items()}
        say(f"[{kind}] idle CPU %, 5 s before any load: {out['idle_cpu_percent']}")

        say(f"[{kind}] empty-call ceiling: Health/Check, 64 in flight, 2 s warm-up + {config.ceiling_seconds:g} s")
        ceiling = run_client("ceiling", mesh.target("registration"), work / f"{kind}-ceiling.json",
                             ["--seconds", str(config.ceiling_seconds), "--concurrency", "64",
                              "--channels", str(config.channels)], limit=config.ceiling_seconds + 60)
        out["ceiling"] = {k: ceiling[k] for k in ("calls_per_second", "calls", "seconds", "concurrency",
                                                  "client_cpu_seconds")}
        say(f"[{kind}] ceiling: {ceiling['calls_per_second']:.0f} calls/s")

        courses = plan_catalogue(config, ceiling["calls_per_second"])
        create_catalogue(mesh.target("enrollment"), courses)
        courses_file = work / "courses.json"
        courses_file.write_text(json.dumps([c["course_id"] for c in courses]))
        (work / "capacities.json").write_text(json.dumps({c["course_id"]: c["capacity"] for c in courses}))
        capacities = sorted({c["capacity"] for c in courses})
        out["catalogue"] = {"courses": len(courses), "campuses": len({c["campus_id"] for c in courses}),
                            "capacities": capacities, "small_courses": sum(1 for c in courses if c["course_id"]
                                                                            and c["capacity"] == capacities[0])}
        say(f"[{kind}] catalogue: {len(courses)} courses, capacities {capacities}")

        bench = MeshBench(config, kind, work, mesh.target("registration"), processes, sampler, databases,
                          courses_file)
        burst = bench.phase("burst", "closed", ["--concurrency", "32"], None, config.burst_seconds)
        burst["ratio_to_ceiling"] = round(burst["calls_per_second"] / ceiling["calls_per_second"], 3)
        out["closed_loop"] = burst
        say(f"[{kind}] closed-loop Register: {burst['calls_per_second']:.0f} calls/s "
            f"= {burst['ratio_to_ceiling']:.0%} of the ceiling (target >= 60%)")
        out["phases"] = []
        for label, fraction, rate in planned_phases(config, ceiling["calls_per_second"]):
            out["phases"].append(bench.phase(label, "open", ["--rate", f"{rate:.1f}"], fraction,
                                             config.phase_seconds))
        out["exit_codes_before_stop"] = {name: p.poll() for name, p in mesh.processes.items()}
        out["high_water_rss_mb"] = {k: round(v / 1024, 1) for k, v in processes.high_water_marks().items()}
        out["kinesalite_disk_mb"] = round(sum(f.stat().st_size for f in (work / "kinesis").rglob("*")
                                              if f.is_file()) / 2**20, 1)
        out["sampler_errors"] = sampler.errors
    out["logs"] = log_summary(logs)
    return out


# ---------------------------------------------------------------- the synchronous baseline

def run_sync(config: Config, kind: str, work: pathlib.Path, rates: list[tuple[str, float, float]],
             capacities_file: pathlib.Path, courses_file: pathlib.Path) -> dict[str, Any]:
    out: dict[str, Any] = {"phases": []}
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(database_urls(kind, work, ["sync"]))["sync"]
        say(f"[{kind}] synchronous baseline: one transaction per Register")
        target, server = stack.enter_context(sync_server(url, capacities_file, logs))
        monitor = Database(url)
        stack.callback(monitor.close)
        processes = Processes({"sync register": server.pid}, postgres=kind == "postgresql",
                              excluded={monitor.backend_pid} if monitor.backend_pid else set())
        own = {database_name(url)}
        sampler = Sampler(processes, None, (lambda: other_backends(monitor, own)) if kind == "postgresql" else None)
        stack.enter_context(sampler.running())

        def one(label: str, mode: str, extra: list[str], fraction: float | None, seconds: float) -> dict[str, Any]:
            start: list[Snapshot] = []
            last = [0.0]

            def show(progress: dict[str, Any]) -> None:
                if time.time() - last[0] >= 3:
                    last[0] = time.time()
                    say(f"  sync {label}: sent {progress['sent']}, accepted {progress['ok']}, "
                        f"refused {progress['refused']}, in flight {progress['in_flight']}")
            result = run_client(mode, target, work / f"sync-{label.replace('/', '-per-')}.json",
                                ["--courses-file", str(courses_file), "--label", f"sync-{label}", "--seconds",
                                 str(seconds), "--channels", str(config.channels), "--timeout",
                                 str(config.call_timeout), *extra], limit=seconds + config.call_timeout + 120,
                                on_ready=lambda: start.append(processes.snapshot()), on_progress=show)
            end = processes.snapshot()
            calls = analyse_calls(result)
            cpu = cpu_delta(start[0] if start else end, end, sampler.other_backends)
            cpu["load client"] = result["client_cpu_seconds"]
            cpu["baseline"] = cpu.get("sync register", 0.0) + cpu.get("postgresql", 0.0)
            peak: dict[str, float] = {}
            for s in sampler.between(calls.origin - 1, end.time + 0.5):
                for name, kb in s.memory.items():
                    peak[name] = max(peak.get(name, 0.0), round(kb / 1024, 1))
            peak["load client"] = round(result["client_peak_rss_kb"] / 1024, 1)
            length = max(1, math.ceil(end.time - calls.origin) + 1)
            say(f"  sync {label}: {calls.summary['calls']} calls, {calls.ok} accepted "
                f"({calls.summary['accepted_rate']}/s), refusals {calls.refusals or 'none'}, "
                f"p99 {calls.summary['latency_ms']['p99']} ms")
            return {"label": label, "fraction_of_ceiling": fraction, "seconds": calls.seconds, **calls.summary,
                    "calls_per_second": result.get("calls_per_second"),
                    "cpu_seconds": {k: round(v, 3) for k, v in cpu.items()},
                    "cpu_ms_per_signup": ms_per_signup(cpu, calls.ok), "peak_rss_mb": peak,
                    "series": call_series(calls, length)}

        out["closed_loop"] = one("burst", "closed", ["--concurrency", "32"], None, config.burst_seconds)
        for label, fraction, rate in rates:
            out["phases"].append(one(label, "open", ["--rate", f"{rate:.1f}"], fraction, config.phase_seconds))
        out["outcomes"] = {status: count for status, count in
                           monitor.rows("SELECT status, count(*) FROM sync_registrations GROUP BY status")}
        out["sampler_errors"] = sampler.errors
    return out


# ---------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    config = Config.from_env()
    admin_metadata()  # before any service starts: they accept the token this run sends
    today = dt.date.today().isoformat()
    results_dir = ROOT / config.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join([*(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("E2E_")),
                        "make bench BENCH=e2e"])
    results: dict[str, Any] = {"benchmark": "e2e", "date": today, "started": dt.datetime.now().isoformat(
        timespec="seconds"), "command": command, "machine": machine_info(), "config": asdict(config),
        "databases": {}}
    planned = f"{config.phases} of the ceiling" if config.phases else f"{config.rates} calls/s"
    say(f"e2e: {config.databases}, phases at {planned} x {config.phase_seconds:g} s, "
        f"drain up to {config.drain_seconds:g} s, {config.courses} courses")
    failures = 0
    json_path = results_dir / f"{today}-e2e.json"
    for kind in config.databases:
        entry: dict[str, Any] = {}
        results["databases"][kind] = entry
        if kind == "postgresql" and not helpers.postgres_available():
            entry["error"] = f"PostgreSQL not reachable at {helpers.postgres_url()}"
            say(entry["error"])
            failures += 1
            continue
        work = pathlib.Path(tempfile.mkdtemp(prefix=f"e2e-{kind}-"))
        try:
            entry["mesh"] = run_mesh(config, kind, work)
            mesh = entry["mesh"]
            rates = [(p["label"], p["fraction_of_ceiling"], p["offered_rate"]) for p in mesh["phases"]]
            entry["sync"] = run_sync(config, kind, work, rates, work / "capacities.json", work / "courses.json")
        except Exception as error:  # noqa: BLE001 - recorded, the next database still runs
            failures += 1
            entry["error"] = f"{error!r}"[:4000]
            entry["traceback"] = traceback.format_exc()[-8000:]
            say(f"[{kind}] FAILED: {error!r}"[:2000])
            for log in sorted((work / "logs").glob("*.log")) if (work / "logs").exists() else []:
                tail = log.read_text(errors="replace").splitlines()[-5:]
                if tail:
                    say(f"  {log.name}: " + "\n    ".join(tail)[:2000])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        json_path.write_text(json.dumps(results, indent=1))
    results["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    json_path.write_text(json.dumps(results, indent=1))
    markdown = e2e_report.markdown(results)
    (results_dir / f"{today}-e2e.md").write_text(markdown)
    plots = e2e_report.plots(results, results_dir, f"{today}-e2e")
    say("\n" + markdown)
    say(f"wrote {json_path}, {today}-e2e.md and {len(plots)} plots in {config.results_dir}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
