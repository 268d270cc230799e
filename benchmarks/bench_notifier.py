"""Notifier throughput: emails per second against a real aiosmtpd in another process.

Measured in one run, against the same aiosmtpd process (its Sink handler: 250, discard):

1. baseline: one new connection per email, sent one at a time (render, compose,
   connect, MAIL/RCPT/DATA, QUIT), the way a naive sender would do it;
2. the notifier: pending rows in its database (SQLite file, or --database-url),
   delivered by its Sender over its SmtpMailer pool, outcomes recorded, until every
   row is SENT;
3. the server's own ceiling: pre-built message bytes over persistent connections,
   nothing else on the client, so an operator can see how close the notifier gets.

CPU seconds used by each side are printed too: when the server process uses a whole
core, aiosmtpd is the limit, not the notifier.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import aiosmtplib
from sqlalchemy import func, select

from libs.config import NotifierSettings
from libs.db import make_engine
from services.notifier.adapters import repository
from services.notifier.adapters.repository import NotificationStore
from services.notifier.adapters.smtp import SmtpMailer
from services.notifier.adapters.templates import TemplateRenderer
from services.notifier.domain.messages import validate_recipient
from services.notifier.domain.model import DeliveryStatus, Notification, NotificationKind
from services.notifier.service_layer.handlers import message_composer
from services.notifier.service_layer.sender import Sender

MAIL_FROM = "Course Sign-up <no-reply@course-signup.example>"
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _process_cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def aiosmtpd_process() -> Iterator[tuple[int, int]]:
    """A real aiosmtpd in its own process that accepts and discards; yields (port, pid)."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "aiosmtpd", "-n", "-u", "-l", f"127.0.0.1:{port}", "-c", "aiosmtpd.handlers.Sink"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
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


async def one_connection_per_email(port: int, count: int) -> None:
    """The naive sender: for each email, render and compose it, connect, send, quit."""
    compose = message_composer(TemplateRenderer(), MAIL_FROM)
    envelope_sender = "no-reply@course-signup.example"
    for i in range(count):
        notification = _notification(i)
        recipient = validate_recipient(notification.recipient)
        message = compose(notification, recipient)
        connection = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench")
        await connection.connect()
        await connection.sendmail(envelope_sender, [recipient], message)
        await connection.quit()
        if (i + 1) % 500 == 0:
            _progress("one connection per email", i + 1, count)


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
                    _progress("notifier", sender.sent, count)
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks notifier", description=__doc__.split("\n")[0])
    parser.add_argument("--emails", type=int, default=6000, help="emails through the notifier")
    parser.add_argument("--baseline-emails", type=int, default=1000, help="emails sent one connection each")
    parser.add_argument("--database-url", default=None, help="notifier database (default: a fresh SQLite file)")
    parser.add_argument("--connections", type=int, default=None, help="SMTP pool size (default: SMTP_MAX_CONNECTIONS)")
    args = parser.parse_args(argv)
    settings = NotifierSettings()
    if args.connections:
        settings.smtp_max_connections = args.connections
    cpus = os.cpu_count()
    print(f"{cpus} CPUs; aiosmtpd {aiosmtplib.__name__ and ''}in its own process; "
          f"notifier pool of {settings.smtp_max_connections} connections", flush=True)
    figures: list[Figure] = []
    with aiosmtpd_process() as (port, server_pid), tempfile.TemporaryDirectory() as scratch:
        database_url = args.database_url or f"sqlite:///{scratch}/notifier-bench.db"
        asyncio.run(one_connection_per_email(port, 50))  # warm-up: imports, templates, server
        with Meter(server_pid) as meter:
            asyncio.run(one_connection_per_email(port, args.baseline_emails))
        figures.append(meter.figure("baseline: one new connection per email, one at a time", args.baseline_emails))
        print(figures[-1].line(), flush=True)

        pending_rows(database_url, args.emails)
        with Meter(server_pid) as meter:
            asyncio.run(notifier_sends(database_url, port, args.emails, settings))
        figures.append(meter.figure(
            f"notifier: DB rows -> Sender -> pool of {settings.smtp_max_connections}, all SENT", args.emails))
        print(figures[-1].line(), flush=True)

        with Meter(server_pid) as meter:
            asyncio.run(raw_ceiling(port, args.emails, settings.smtp_max_connections))
        figures.append(meter.figure(
            f"ceiling: pre-built bytes, {settings.smtp_max_connections} persistent connections", args.emails))
        print(figures[-1].line(), flush=True)

    baseline, notifier, ceiling = figures
    print()
    print(f"notifier / baseline: {notifier.rate / baseline.rate:.1f}x (design target: at least 5x)")
    print(f"notifier / aiosmtpd ceiling: {notifier.rate / ceiling.rate:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
