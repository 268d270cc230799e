"""Notifier throughput: emails per second against a real aiosmtpd in another process.

Measured in one run, against the same aiosmtpd process (its Sink handler: 250, discard),
in several rounds (the median is reported; machines shared with other work are noisy):

1. baseline: one new connection per email, sent one at a time (render, compose,
   connect, EHLO, MAIL/RCPT/DATA, QUIT), the way a naive sender would do it; once
   with the notifier's own message builder, once with the standard library's
   EmailMessage and send_message (what the design's ~400/s figure measured);
2. the notifier: pending rows in its database (SQLite file, or --database-url),
   delivered by its Sender over its SmtpMailer pool, outcomes recorded, until every
   row is SENT;
3. the server's own ceiling: pre-built message bytes over persistent connections,
   nothing else on the client, so one can see how close the notifier gets;
4. recording notifications (what the stream consumer does per batch), in batches of
   10, 100 and 500 rows: the repository's add_notifications against the previous way,
   a multi-row INSERT ... VALUES built and compiled by SQLAlchemy for every batch (kept
   here as the baseline), in ms of CPU per 1,000 rows, this process's (getrusage) and,
   on a local PostgreSQL, its backend's (/proc/<backend pid>/stat);
5. the notifier while the stream consumer records: a thread adds notifications at
   --record-rate per second in batches (as the consumer's checkpoint transactions do)
   while the Sender delivers them, once with each way of recording: emails/s while
   recording goes on, seconds until the last one is SENT, and CPU ms per email of the
   whole process (getrusage RUSAGE_SELF: sender, recorder thread, drivers) and of the
   recorder thread alone (time.thread_time).

CPU seconds used by each side are printed too: when the aiosmtpd process uses a whole
core, aiosmtpd is the limit, not the notifier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.policy
import email.utils
import functools
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage

import aiosmtplib
from sqlalchemy import Connection, func, select
from sqlalchemy.dialects import postgresql, sqlite

from dev.ports import listening
from libs.db import make_engine
from services.notifier.adapters import repository
from services.notifier.adapters.repository import NotificationStore
from services.notifier.adapters.smtp import SmtpMailer
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.messages import validate_recipient
from services.notifier.domain.model import DeliveryStatus, Notification, NotificationKind
from services.notifier.service_layer.handlers import message_composer
from services.notifier.service_layer.sender import Sender
from services.notifier.settings import NotifierSettings
from tests.helpers import free_port

MAIL_FROM = "Course Sign-up <no-reply@course-signup.example>"
RECORD_BATCHES = (10, 100, 500)
KINDS = list(NotificationKind)


def _notification(i: int) -> Notification:
    return Notification(
        registration_id=f"bench-{i:07d}",
        kind=KINDS[i % len(KINDS)],
        recipient=f"student{i}@example.com",
        locale="pt-BR" if i % 3 == 0 else "en",
        name=f"Estudante Número {i}",
        course_id=f"course-{i % 50}",
        course_name=f"Física {i % 50} <avançada>",
    )


def _process_cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def aiosmtpd_process() -> Iterator[tuple[int, int]]:
    """A real aiosmtpd in its own process that accepts and discards; yields (port, pid)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-u", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("aiosmtpd did not start")
            time.sleep(0.05)
        yield port, process.pid
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class Figure:
    label: str
    emails: int
    seconds: float
    client_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.emails / self.seconds

    def line(self) -> str:
        return (f"{self.label:<58} {self.rate:8.0f} emails/s  ({self.emails} in {self.seconds:.2f} s; "
                f"CPU notifier {self.client_cpu:.2f} s, aiosmtpd {self.server_cpu:.2f} s)")


class Meter:
    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid

    def __enter__(self) -> Meter:
        self.started = time.perf_counter()
        self.client = _own_cpu_seconds()
        self.server = _process_cpu_seconds(self.server_pid)
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.perf_counter() - self.started
        self.client = _own_cpu_seconds() - self.client
        self.server = _process_cpu_seconds(self.server_pid) - self.server

    def figure(self, label: str, emails: int) -> Figure:
        return Figure(label, emails, self.seconds, self.client, self.server)


def _progress(label: str, done: int, total: int) -> None:
    print(f"  {label}: {done}/{total}", flush=True)


def stdlib_message(renderer: TemplateRenderer, notification: Notification, recipient: str) -> EmailMessage:
    """The same email built the usual way: EmailMessage, its header objects and generator."""
    rendered = renderer.render(notification)
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = MAIL_FROM
    message["To"] = recipient
    message["Subject"] = rendered.subject
    message["Date"] = email.utils.format_datetime(datetime.now(UTC))
    message["Message-ID"] = email.utils.make_msgid(domain="course-signup.example")
    message.set_content(rendered.text)
    message.add_alternative(rendered.html, subtype="html")
    return message


async def one_connection_per_email(port: int, count: int, stdlib: bool = False) -> None:
    """The naive sender: for each email, render and compose it, connect, send, quit."""
    renderer = TemplateRenderer()
    compose = message_composer(renderer, MAIL_FROM)
    envelope_sender = "no-reply@course-signup.example"
    for i in range(count):
        notification = _notification(i)
        recipient = validate_recipient(notification.recipient)
        connection = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench")
        await connection.connect()
        if stdlib:
            await connection.send_message(stdlib_message(renderer, notification, recipient),
                                          sender=envelope_sender, recipients=[recipient])
        else:
            await connection.sendmail(envelope_sender, [recipient], compose(notification, recipient))
        await connection.quit()


def pending_rows(database_url: str, count: int) -> None:
    """`count` PENDING notifications in a fresh notifier database (not timed)."""
    engine = make_engine(database_url)
    try:
        repository.create_tables(engine)
        with engine.begin() as conn:
            repository.add_notifications(conn, [_notification(i) for i in range(count)], datetime.now(UTC))
    finally:
        engine.dispose()


async def notifier_sends(database_url: str, port: int, count: int, settings: NotifierSettings) -> None:
    """The notifier's Sender delivers the pending rows; returns once all are recorded SENT."""
    engine = make_engine(database_url)
    try:
        mailer = SmtpMailer(host="127.0.0.1", port=port, mail_from=MAIL_FROM,
                            timeout_seconds=settings.smtp_timeout_seconds,
                            max_connections=settings.smtp_max_connections, local_hostname="bench")
        sender = Sender(store=NotificationStore(engine), mailer=mailer,
                        compose=message_composer(TemplateRenderer(), MAIL_FROM),
                        send_timeout_seconds=settings.smtp_timeout_seconds)
        table = repository.notifications
        sent_query = select(func.count()).select_from(table).where(table.c.status == DeliveryStatus.SENT.value)
        sender.start()
        last_report = time.monotonic()
        while True:
            await asyncio.sleep(0.02)
            if sender.sent < count:
                if time.monotonic() - last_report >= 1:
                    last_report = time.monotonic()
                    _progress("sent so far", sender.sent, count)
                continue
            with engine.connect() as conn:
                if conn.execute(sent_query).scalar_one() == count:
                    break
        await sender.stop(5.0)
        await mailer.close()
    finally:
        engine.dispose()


async def raw_ceiling(port: int, count: int, connections: int) -> None:
    """Pre-built message bytes over persistent connections: the most aiosmtpd takes from us."""
    compose = message_composer(TemplateRenderer(), MAIL_FROM)
    data = compose(_notification(1), "student1@example.com")

    async def one_connection(share: int) -> None:
        connection = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench")
        await connection.connect()
        for _ in range(share):
            await connection.sendmail("no-reply@course-signup.example", ["student1@example.com"], data)
        await connection.quit()

    await asyncio.gather(*(one_connection(count // connections) for _ in range(connections)))


# --- recording: the stream consumer's side ---------------------------------------------

Recorder = Callable[[Connection, list[Notification], datetime], int]


def multi_values_insert(conn: Connection, batch: list[Notification], now: datetime) -> int:
    """The previous add_notifications (baseline): a multi-row INSERT ... VALUES that
    SQLAlchemy builds and compiles for every batch, 500 rows per statement."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(repository.notifications).on_conflict_do_nothing(
        index_elements=["registration_id", "kind"])
    now = now.astimezone(UTC)
    rows = [{"registration_id": n.registration_id, "kind": n.kind.value, "recipient": n.recipient,
             "locale": n.locale, "name": n.name, "course_id": n.course_id, "course_name": n.course_name,
             "status": DeliveryStatus.PENDING.value, "attempts": 0, "last_error": None, "create_time": now,
             "send_time": None, "next_attempt_at": now.timestamp()} for n in batch]
    inserted = 0
    for start in range(0, len(rows), 500):
        inserted += conn.execute(statement.values(rows[start:start + 500]),
                                 execution_options={"preserve_rowcount": True}).rowcount
    return inserted


RECORDERS: dict[str, Recorder] = {
    "multi-VALUES per batch (before)": multi_values_insert,
    "add_notifications (now)": repository.add_notifications,
}


def _backend_pid(conn: Connection) -> int | None:
    """The PostgreSQL backend serving `conn`, if it runs on this machine and we may read its CPU."""
    if conn.dialect.name != "postgresql":
        return None
    pid = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    conn.commit()
    try:
        _process_cpu_seconds(pid)
    except OSError:
        return None
    return pid


def _clear(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        repository.create_tables(engine)
        with engine.begin() as conn:
            conn.execute(repository.notifications.delete())
    finally:
        engine.dispose()


def recording_cost(database_url: str, batch: int, rows: int, record: Recorder) -> tuple[float, float | None]:
    """ms of CPU per 1,000 rows recorded in batches of `batch`, one transaction each:
    (this process, the PostgreSQL backend or None)."""
    _clear(database_url)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            backend = _backend_pid(conn)
            with conn.begin():  # warm-up: statement caches, prepared statements
                record(conn, [_notification(10_000_000 + i) for i in range(batch)], datetime.now(UTC))
            batches = [[_notification(start + i) for i in range(batch)] for start in range(0, rows, batch)]
            own, server = _own_cpu_seconds(), _process_cpu_seconds(backend) if backend else 0.0
            added = 0
            for notifications in batches:
                with conn.begin():
                    added += record(conn, notifications, datetime.now(UTC))
            own = _own_cpu_seconds() - own
            server = _process_cpu_seconds(backend) - server if backend else 0.0
    finally:
        engine.dispose()
    if added != len(batches) * batch:
        raise AssertionError(f"recorded {added} new rows of {len(batches) * batch}")
    per_thousand = 1000 / (len(batches) * batch)
    return own * 1000 * per_thousand, (server * 1000 * per_thousand if backend else None)


@dataclass
class UnderLoad:
    label: str
    emails: int
    record_seconds: float
    sent_while_recording: int
    drain_seconds: float
    process_cpu: float
    recorder_cpu: float

    def line(self) -> str:
        return (f"  {self.label:<34} {self.sent_while_recording / self.record_seconds:6.0f} emails/s while recording, "
                f"all {self.emails} SENT after {self.drain_seconds:5.2f} s; CPU per email "
                f"{self.process_cpu / self.emails * 1000:.2f} ms (recorder thread "
                f"{self.recorder_cpu / self.emails * 1000:.2f} ms)")


async def sends_while_recording(database_url: str, port: int, settings: NotifierSettings, record: Recorder,
                                rate: int, seconds: float, batch: int, label: str) -> UnderLoad:
    """A thread records `rate` notifications a second, `batch` per transaction, for `seconds`,
    waking the Sender after each commit (as the consumer does), while the Sender delivers them."""
    engine = make_engine(database_url)
    total = int(rate * seconds) // batch * batch
    recorder_cpu = 0.0
    try:
        mailer = SmtpMailer(host="127.0.0.1", port=port, mail_from=MAIL_FROM,
                            timeout_seconds=settings.smtp_timeout_seconds,
                            max_connections=settings.smtp_max_connections, local_hostname="bench")
        sender = Sender(store=NotificationStore(engine), mailer=mailer,
                        compose=message_composer(TemplateRenderer(), MAIL_FROM),
                        send_timeout_seconds=settings.smtp_timeout_seconds)
        sender.start()

        def recorder() -> None:
            nonlocal recorder_cpu
            started_cpu = time.thread_time()
            started = time.monotonic()
            with engine.connect() as conn:
                for number, start in enumerate(range(0, total, batch)):
                    delay = started + number * batch / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    with conn.begin():
                        record(conn, [_notification(start + i) for i in range(batch)], datetime.now(UTC))
                    sender.wake_threadsafe()
            recorder_cpu = time.thread_time() - started_cpu

        started = time.monotonic()
        cpu = _own_cpu_seconds()
        thread = threading.Thread(target=recorder, name="bench-recorder")
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.02)
        record_seconds = time.monotonic() - started
        sent_while_recording = sender.sent
        while sender.sent < total:
            await asyncio.sleep(0.02)
        drain_seconds = time.monotonic() - started
        await sender.stop(5.0)
        cpu = _own_cpu_seconds() - cpu
        await mailer.close()
    finally:
        engine.dispose()
    return UnderLoad(label, total, record_seconds, sent_while_recording, drain_seconds, cpu, recorder_cpu)


def _median_cost(values: list[float | None]) -> str:
    known = [value for value in values if value is not None]
    return f"{statistics.median(known):7.1f}" if known else "    n/a"


def _measure(server_pid: int, label: str, emails: int, run: Callable[[], None]) -> Figure:
    with Meter(server_pid) as meter:
        run()
    figure = meter.figure(label, emails)
    print(figure.line(), flush=True)
    return figure


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks notifier", description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=6000, help="emails through the notifier per round")
    parser.add_argument("--baseline-emails", type=int, default=1000, help="emails sent one connection each")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the median of each figure is reported")
    parser.add_argument("--database-url", default=None, help="notifier database (default: a fresh SQLite file)")
    parser.add_argument("--connections", type=int, default=None, help="SMTP pool size (default: SMTP_MAX_CONNECTIONS)")
    parser.add_argument("--record-rows", type=int, default=4000, help="rows per recording-cost measurement")
    parser.add_argument("--record-rate", type=int, default=400, help="notifications/s recorded while sending")
    parser.add_argument("--record-seconds", type=float, default=5.0, help="how long recording goes on while sending")
    parser.add_argument("--record-batch", type=int, default=40, help="notifications per recording transaction")
    args = parser.parse_args(argv)
    settings = NotifierSettings()
    if args.connections:
        settings.smtp_max_connections = args.connections
    pool = settings.smtp_max_connections
    print(f"{os.cpu_count()} CPUs; aiosmtpd (Sink handler) in its own process; notifier pool of {pool} connections; "
          f"{args.rounds} rounds", flush=True)
    labels = {
        "stdlib": "baseline: new connection per email, EmailMessage",
        "baseline": "baseline: new connection per email, notifier's builder",
        "notifier": f"notifier: DB rows -> Sender -> pool of {pool}, all SENT",
        "ceiling": f"aiosmtpd ceiling: pre-built bytes, {pool} connections",
    }
    figures: dict[str, list[Figure]] = {key: [] for key in labels}
    recording: dict[tuple[str, int], list[tuple[float, float | None]]] = {
        (name, batch): [] for name in RECORDERS for batch in RECORD_BATCHES}
    under_load: dict[str, list[UnderLoad]] = {name: [] for name in RECORDERS}
    with aiosmtpd_process() as (port, server_pid), tempfile.TemporaryDirectory() as scratch:
        asyncio.run(one_connection_per_email(port, 50))  # warm-up: imports, templates, server
        for round_number in range(1, args.rounds + 1):
            print(f"round {round_number}/{args.rounds}", flush=True)
            figures["stdlib"].append(_measure(
                server_pid, labels["stdlib"], args.baseline_emails // 2,
                lambda: asyncio.run(one_connection_per_email(port, args.baseline_emails // 2, stdlib=True))))
            figures["baseline"].append(_measure(
                server_pid, labels["baseline"], args.baseline_emails,
                lambda: asyncio.run(one_connection_per_email(port, args.baseline_emails))))
            database_url = args.database_url or f"sqlite:///{scratch}/notifier-bench-{round_number}.db"
            if args.database_url:
                engine = make_engine(database_url)
                repository.create_tables(engine)  # a database that never had them
                with engine.begin() as conn:
                    conn.execute(repository.notifications.delete())
                engine.dispose()
            pending_rows(database_url, args.emails)
            figures["notifier"].append(_measure(
                server_pid, labels["notifier"], args.emails,
                functools.partial(asyncio.run, notifier_sends(database_url, port, args.emails, settings))))
            figures["ceiling"].append(_measure(
                server_pid, labels["ceiling"], args.emails,
                lambda: asyncio.run(raw_ceiling(port, args.emails, pool))))
            for name, record in RECORDERS.items():
                for batch in RECORD_BATCHES:
                    cost = recording_cost(database_url, batch, args.record_rows, record)
                    recording[(name, batch)].append(cost)
                    backend = f", PostgreSQL backend {cost[1]:.1f}" if cost[1] is not None else ""
                    print(f"recording, {name}, batches of {batch}: {cost[0]:.1f} ms CPU per 1,000 rows{backend}",
                          flush=True)
            for name, record in RECORDERS.items():
                _clear(database_url)
                result = asyncio.run(sends_while_recording(
                    database_url, port, settings, record, args.record_rate, args.record_seconds,
                    args.record_batch, name))
                under_load[name].append(result)
                print(result.line(), flush=True)

    rate = {key: statistics.median(f.rate for f in values) for key, values in figures.items()}
    print("\nmedians:")
    for key, label in labels.items():
        print(f"  {label:<58} {rate[key]:8.0f} emails/s")
    print(f"notifier / baseline with the same message builder: {rate['notifier'] / rate['baseline']:.1f}x "
          f"(design target: at least 5x)")
    print(f"notifier / baseline with EmailMessage:              {rate['notifier'] / rate['stdlib']:.1f}x")
    print(f"aiosmtpd ceiling / baseline, same builder:          {rate['ceiling'] / rate['baseline']:.1f}x "
          f"(the most any client could show against this server)")
    print(f"notifier / aiosmtpd ceiling:                        {rate['notifier'] / rate['ceiling']:.0%}")
    notifier_cpu = statistics.median(f.client_cpu / f.emails * 1000 for f in figures["notifier"])
    print(f"notifier CPU per email (this process, getrusage; sender only, rows recorded beforehand): "
          f"{notifier_cpu:.2f} ms")
    print("\nrecording notifications, ms CPU per 1,000 rows (medians; this process, PostgreSQL backend):")
    for batch in RECORD_BATCHES:
        before, after = (recording[(name, batch)] for name in RECORDERS)
        own_before = statistics.median(cost[0] for cost in before)
        own_after = statistics.median(cost[0] for cost in after)
        print(f"  batches of {batch:<4} before {own_before:7.1f} / {_median_cost([c[1] for c in before])}   "
              f"now {own_after:7.1f} / {_median_cost([c[1] for c in after])}   "
              f"({own_before / own_after:.0f}x less CPU here)")
    print(f"\nsending while {args.record_rate} notifications/s are recorded for {args.record_seconds:g} s, "
          f"{args.record_batch} per transaction (medians):")
    for results in under_load.values():
        middle = sorted(results, key=lambda r: r.drain_seconds)[len(results) // 2]
        print(middle.line())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
