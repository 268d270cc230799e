"""Process and database probes of the end-to-end benchmark: CPU and RSS from /proc, backlog from SQL.

CPU of a process is utime + stime (+ cutime + cstime: children it reaped) from
/proc/<pid>/stat. PostgreSQL is every process whose comm is `postgres`, plus the CPU
of backends that exited meanwhile (the postmaster reaps them: its cutime + cstime); the
benchmark's own monitoring connections are left out and backends of other databases
(other people's tests on a shared server) are counted apart so they can be subtracted.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy
from sqlalchemy.engine import make_url

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = pathlib.Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2:].split()


def process_cpu(pid: int, children: bool = True) -> float | None:
    """CPU seconds used by `pid` (and by the children it reaped), None if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    if children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssShmem of `pid` in kB (empty if it is gone)."""
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssShmem")
    values: dict[str, int] = {}
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        key, _, rest = line.partition(":")
        if key in wanted:
            values[key] = int(rest.split()[0])
    return values


def _comm(pid: str) -> str:
    try:
        return (PROC / pid / "comm").read_text().strip()
    except OSError:
        return ""


def postgres_pids() -> dict[int, int]:
    """pid -> parent pid of every process named postgres."""
    found: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and _comm(entry.name) == "postgres":
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                found[int(entry.name)] = int(fields[1])
    return found


def find_child(parent: int, needle: str) -> int | None:
    """The pid of a child of `parent` whose command line contains `needle`."""
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            return int(entry.name)
    return None


@dataclass
class Snapshot:
    time: float
    cpu: dict[str, float]            # named processes: CPU seconds
    postgres: dict[int, float]       # postgres pid -> CPU seconds (without monitor backends)
    postgres_reaped: float           # postmaster's cutime + cstime: backends that exited


@dataclass
class Processes:
    """The processes measured: fixed pids by name, plus PostgreSQL's when `postgres`."""

    named: dict[str, int]
    postgres: bool = False
    excluded: set[int] = field(default_factory=set)   # our own monitoring backends
    workers: dict[str, list[int]] = field(default_factory=dict)   # name -> its worker processes' pids

    def snapshot(self) -> Snapshot:
        cpu = {}
        for name, pid in self.named.items():
            value = process_cpu(pid)
            if value is not None:
                cpu[name] = value + sum(process_cpu(w) or 0.0 for w in self.workers.get(name, ()))
        pg: dict[int, float] = {}
        reaped = 0.0
        if self.postgres:
            pids = postgres_pids()
            for pid, parent in pids.items():
                if pid in self.excluded:
                    continue
                own = process_cpu(pid, children=False)
                if own is None:
                    continue
                pg[pid] = own
                if parent not in pids:  # the postmaster
                    reaped = (process_cpu(pid) or 0.0) - own
        return Snapshot(time.time(), cpu, pg, reaped)

    def memory(self) -> dict[str, int]:
        """VmRSS in kB by name; PostgreSQL: the sum of private memory plus the largest shared part."""
        rss = {name: max(process_memory(p).get("VmRSS", 0) for p in (pid, *self.workers.get(name, ())))
               for name, pid in self.named.items()}
        if self.postgres:
            anon, shmem = 0, 0
            for pid in postgres_pids():
                memory = process_memory(pid)
                anon += memory.get("RssAnon", 0)
                shmem = max(shmem, memory.get("RssShmem", 0))
            rss["postgresql"] = anon + shmem
        return rss

    def high_water_marks(self) -> dict[str, int]:
        return {name: max(process_memory(p).get("VmHWM", 0) for p in (pid, *self.workers.get(name, ())))
                for name, pid in self.named.items()}


def cpu_delta(start: Snapshot, end: Snapshot, other_backends: set[int]) -> dict[str, float]:
    """CPU seconds by name between two snapshots; 'postgresql' includes everything Postgres did
    (its own processes, exited backends) except our monitor, and 'postgresql other databases'
    is the part of it spent by backends of databases that are not the benchmark's."""
    delta = {name: end.cpu[name] - start.cpu.get(name, end.cpu[name])
             for name in end.cpu if name in start.cpu}
    if end.postgres or start.postgres:
        per_pid = {pid: value - start.postgres.get(pid, 0.0) for pid, value in end.postgres.items()}
        delta["postgresql"] = sum(per_pid.values()) + max(0.0, end.postgres_reaped - start.postgres_reaped)
        delta["postgresql other databases"] = sum(v for pid, v in per_pid.items() if pid in other_backends)
    return delta


def epoch(value: dt.datetime | str | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):  # SQLite through a text() query: ISO text
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:  # SQLite hands back naive UTC
        value = value.replace(tzinfo=dt.UTC)
    return value.timestamp()


def sqlalchemy_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    """One persistent autocommit connection, shared by threads under a lock."""

    def __init__(self, url: str) -> None:
        self.engine = sqlalchemy.create_engine(sqlalchemy_url(url), poolclass=sqlalchemy.pool.StaticPool)
        self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.lock = threading.Lock()
        self.postgres = self.engine.dialect.name == "postgresql"
        self.backend_pid = self.scalar("SELECT pg_backend_pid()") if self.postgres else None

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.lock:
            return list(self.connection.execute(sqlalchemy.text(sql), params))

    def scalar(self, sql: str, **params: Any) -> Any:
        rows = self.rows(sql, **params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()
        self.engine.dispose()


def other_backends(database: Database, own_databases: set[str]) -> set[int]:
    """Client backends of databases that are not ours (other people's work on a shared server)."""
    if not database.postgres:
        return set()
    rows = database.rows("SELECT pid, datname FROM pg_stat_activity WHERE backend_type = 'client backend'")
    return {pid for pid, datname in rows if datname not in own_databases}


class MeshDatabases:
    """What the benchmark reads from the services' databases (tables decisions, notifications)."""

    def __init__(self, enrollment_url: str, notifier_url: str) -> None:
        self.enrollment = Database(enrollment_url)
        self.notifier = Database(notifier_url)

    @property
    def backend_pids(self) -> set[int]:
        return {pid for pid in (self.enrollment.backend_pid, self.notifier.backend_pid) if pid}

    def counts(self) -> dict[str, int]:
        decided = self.enrollment.scalar("SELECT count(*) FROM decisions")
        rows = self.notifier.rows("SELECT status, count(*) FROM notifications GROUP BY status")
        by_status = {status: count for status, count in rows}
        return {"decided": int(decided or 0), "emails_pending": by_status.get("PENDING", 0),
                "emails_sent": by_status.get("SENT", 0), "emails_failed": by_status.get("FAILED", 0),
                "emails_total": sum(by_status.values())}

    def distinct_notified(self) -> int:
        return int(self.notifier.scalar("SELECT count(DISTINCT registration_id) FROM notifications") or 0)

    def last_notification_id(self) -> int:
        return int(self.notifier.scalar("SELECT coalesce(max(id), 0) FROM notifications") or 0)

    def decisions_since(self, since: float) -> list[tuple[str, str, float]]:
        moment = dt.datetime.fromtimestamp(since, dt.UTC)
        if not self.enrollment.postgres:
            moment = moment.replace(tzinfo=None)
        rows = self.enrollment.rows(
            "SELECT registration_id, outcome, decide_time FROM decisions WHERE decide_time >= :since", since=moment)
        return [(rid, outcome, epoch(when) or 0.0) for rid, outcome, when in rows]

    def notifications_after(self, last_id: int) -> list[tuple[str, str, str, float | None]]:
        rows = self.notifier.rows(
            "SELECT registration_id, kind, status, send_time FROM notifications WHERE id > :last", last=last_id)
        return [(rid, kind, status, epoch(when)) for rid, kind, status, when in rows]

    def close(self) -> None:
        self.enrollment.close()
        self.notifier.close()


@dataclass
class Sample:
    time: float
    snapshot: Snapshot
    memory: dict[str, int]
    counts: dict[str, int]


class Sampler:
    """Samples processes (and database counts) about every second, in a thread."""

    def __init__(self, processes: Processes, counts: Callable[[], dict[str, int]] | None = None,
                 others: Callable[[], set[int]] | None = None, interval: float = 1.0) -> None:
        self.processes = processes
        self.counts = counts
        self.others = others
        self.interval = interval
        self.samples: list[Sample] = []
        self.other_backends: set[int] = set()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.time()
            try:
                counts = self.counts() if self.counts else {}
                if self.others:
                    self.other_backends |= self.others()
                self.samples.append(Sample(time.time(), self.processes.snapshot(), self.processes.memory(), counts))
            except Exception as error:  # noqa: BLE001 - kept and reported, sampling goes on
                if len(self.errors) < 20:
                    self.errors.append(f"{time.strftime('%H:%M:%S')} {error!r}"[:500])
            self._stop.wait(max(0.05, self.interval - (time.time() - started)))

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.time <= end]

    @contextlib.contextmanager
    def running(self) -> Iterator[Sampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(10)
