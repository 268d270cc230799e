"""The load client of the end-to-end benchmark, run as its own process (its CPU is not the mesh's).

    python -m benchmarks.e2e_client ceiling --target 127.0.0.1:50051 --out ceiling.json
    python -m benchmarks.e2e_client closed  --target ... --out burst.json --seconds 10 --concurrency 32 \
        --courses-file courses.json --label burst [--start-at <epoch>]
    python -m benchmarks.e2e_client open    --target ... --out phase.json --rate 1000 --seconds 60 \
        --courses-file courses.json --label p25 [--start-at <epoch>]

- ceiling: closed-loop grpc.health.v1.Health/Check, `--concurrency` (64) in flight, a 2 s
  warm-up then `--seconds` (8): the empty-call ceiling of the server, in calls/s.
- closed: closed-loop Register, `--concurrency` (32) in flight, for `--seconds`.
- open: open-loop Register: call i is due at start_at + i/rate and is sent then, whatever
  happened to earlier calls (no waiting on replies, so a slow server cannot slow the
  arrivals down: no coordinated omission). Latency is measured from the due time.

Calls go round-robin over `--channels` channels, each its own HTTP/2 connection (a local
subchannel pool), so one connection's stream limit does not cap concurrency. Every
Register has a unique email and request_id; courses are spread over the given list and
birth dates over 1950-2007. Without --start-at, the client connects and warms up its
channels, prints {"ready": true} and starts at the epoch time read from stdin, so the
parent can take its CPU snapshot right before the load starts.

Progress goes to stdout as one JSON object a line, about every second
({"progress": ..., "sent", "ok", "refused", "in_flight"}); the results go to `--out` as
one JSON object with per-call columns (times relative to start_at, in seconds): due,
start, end, code (gRPC status code number, 0 = OK), registration_id; plus the client's own
CPU seconds over the measured window and its peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import resource
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_kb() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class Calls:
    """Per-call columns, filled by index."""

    def __init__(self, size: int = 0) -> None:
        self.due: list[float] = [0.0] * size
        self.start: list[float] = [0.0] * size
        self.end: list[float] = [0.0] * size
        self.code: list[int] = [-1] * size
        self.rid: list[str] = [""] * size
        self.sent = 0
        self.ok = 0
        self.refused = 0
        self.error_samples: dict[str, list[str]] = {}   # a few details per status code

    def grow(self, index: int) -> None:
        while len(self.due) <= index:
            self.due.append(0.0)
            self.start.append(0.0)
            self.end.append(0.0)
            self.code.append(-1)
            self.rid.append("")

    def columns(self, origin: float, count: int) -> dict[str, Any]:
        def rel(values: list[float]) -> list[float]:
            return [round(v - origin, 6) for v in values[:count]]

        return {"due": rel(self.due), "start": rel(self.start), "end": rel(self.end),
                "code": self.code[:count], "registration_id": self.rid[:count], "error_samples": self.error_samples}


def make_channels(target: str, count: int) -> list[grpc.aio.Channel]:
    # A local subchannel pool gives every channel its own TCP connection.
    return [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)]


class Registrar:
    def __init__(self, channels: list[grpc.aio.Channel], courses: list[str], label: str, timeout: float) -> None:
        self.stubs = [registration_pb2_grpc.RegistrationServiceStub(c) for c in channels]
        self.courses = courses
        self.tag = f"{label}-{uuid.uuid4().hex[:6]}"
        self.timeout = timeout

    def request(self, index: int) -> Any:
        # A multiplicative hash spreads consecutive calls over the courses and birth dates.
        spread = (index * 2654435761) & 0xFFFFFFFF
        return registration_pb2.RegisterRequest(
            name=f"Student {self.tag} {index}",
            email=f"s-{self.tag}-{index}@example.com",
            request_id=f"{self.tag}-{index}",
            course_id=self.courses[spread % len(self.courses)],
            birth_date=date_pb2.Date(year=1950 + (spread >> 8) % 58, month=1 + (spread >> 14) % 12,
                                     day=1 + (spread >> 18) % 28),
        )

    async def call(self, index: int, calls: Calls) -> None:
        stub = self.stubs[index % len(self.stubs)]
        request = self.request(index)
        calls.start[index] = time.time()
        calls.sent += 1
        try:
            reply = await stub.Register(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            calls.end[index] = time.time()
            calls.code[index] = error.code().value[0]
            calls.refused += 1
            samples = calls.error_samples.setdefault(error.code().name, [])
            if len(samples) < 3:
                samples.append(f"{error.details()} | {error.debug_error_string()}"[:600])
            return
        calls.end[index] = time.time()
        calls.code[index] = 0
        calls.rid[index] = reply.registration_id
        calls.ok += 1


async def report_progress(calls: Calls, in_flight: Callable[[], int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        print(json.dumps({"progress": round(time.time(), 3), "sent": calls.sent, "ok": calls.ok,
                          "refused": calls.refused, "in_flight": in_flight()}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


async def closed_loop(call: Callable[[int], Awaitable[None]], seconds: float, concurrency: int) -> tuple[int, float]:
    """Runs `concurrency` workers for `seconds`; returns (calls made, elapsed seconds)."""
    counter = 0
    deadline = time.time() + seconds

    async def worker() -> None:
        nonlocal counter
        while time.time() < deadline:
            index = counter
            counter += 1
            await call(index)

    started = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counter, time.time() - started


async def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    channels = make_channels(args.target, args.channels)
    stubs = [health_pb2_grpc.HealthStub(c) for c in channels]
    calls = Calls()
    request = health_pb2.HealthCheckRequest()

    async def check(index: int) -> None:
        await stubs[index % len(stubs)].Check(request, timeout=args.timeout)
        calls.sent += 1
        calls.ok += 1

    stop = asyncio.Event()
    progress = asyncio.create_task(report_progress(calls, lambda: args.concurrency, stop))
    await closed_loop(check, args.warmup, args.concurrency)
    cpu0 = cpu_seconds()
    calls.sent = calls.ok = 0
    count, elapsed = await closed_loop(check, args.seconds, args.concurrency)
    cpu = cpu_seconds() - cpu0
    stop.set()
    await progress
    for channel in channels:
        await channel.close()
    return {"mode": "ceiling", "calls": count, "seconds": elapsed, "calls_per_second": count / elapsed,
            "concurrency": args.concurrency, "client_cpu_seconds": cpu, "client_peak_rss_kb": peak_rss_kb()}


async def warm_up(channels: list[grpc.aio.Channel]) -> None:
    for channel in channels:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


async def start_time(args: argparse.Namespace) -> float:
    """--start-at, or else: say {"ready": true} and read the start time (epoch seconds) from stdin."""
    if args.start_at:
        return float(args.start_at)
    print(json.dumps({"ready": True}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return float(line.strip() or time.time())


async def run_closed(args: argparse.Namespace, courses: list[str]) -> dict[str, Any]:
    channels = make_channels(args.target, args.channels)
    await warm_up(channels)
    registrar = Registrar(channels, courses, args.label, args.timeout)
    calls = Calls()

    async def register(index: int) -> None:
        calls.grow(index)
        calls.due[index] = time.time()
        await registrar.call(index, calls)

    await sleep_until(await start_time(args))
    origin = time.time()
    stop = asyncio.Event()
    progress = asyncio.create_task(report_progress(calls, lambda: args.concurrency, stop))
    cpu0 = cpu_seconds()
    count, elapsed = await closed_loop(register, args.seconds, args.concurrency)
    cpu = cpu_seconds() - cpu0
    stop.set()
    await progress
    for channel in channels:
        await channel.close()
    return {"mode": "closed", "label": args.label, "origin": origin, "seconds": elapsed, "calls": count,
            "calls_per_second": count / elapsed, "ok_per_second": calls.ok / elapsed,
            "concurrency": args.concurrency, "client_cpu_seconds": cpu, "client_peak_rss_kb": peak_rss_kb(),
            **calls.columns(origin, count)}


async def run_open(args: argparse.Namespace, courses: list[str]) -> dict[str, Any]:
    channels = make_channels(args.target, args.channels)
    await warm_up(channels)
    registrar = Registrar(channels, courses, args.label, args.timeout)
    total = int(args.rate * args.seconds)
    calls = Calls(total)
    origin = await start_time(args)
    interval = 1.0 / args.rate
    for index in range(total):
        calls.due[index] = origin + index * interval
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    await sleep_until(origin)
    progress = asyncio.create_task(report_progress(calls, lambda: len(tasks), stop))
    cpu0 = cpu_seconds()
    index = 0
    while index < total:
        now = time.time()
        while index < total and calls.due[index] <= now:
            task = asyncio.create_task(registrar.call(index, calls))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
        if index < total:
            await sleep_until(calls.due[index])
            await asyncio.sleep(0)
    if tasks:
        await asyncio.wait(set(tasks))
    cpu = cpu_seconds() - cpu0
    stop.set()
    await progress
    for channel in channels:
        await channel.close()
    return {"mode": "open", "label": args.label, "origin": origin, "seconds": args.seconds, "rate": args.rate,
            "calls": total, "client_cpu_seconds": cpu, "client_peak_rss_kb": peak_rss_kb(),
            "channels": args.channels, "timeout": args.timeout, **calls.columns(origin, total)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e_client")
    parser.add_argument("mode", choices=["ceiling", "closed", "open"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline of each call, seconds")
    parser.add_argument("--courses-file", type=pathlib.Path)
    parser.add_argument("--label", default="run")
    parser.add_argument("--start-at", type=float, default=0.0,
                        help="epoch seconds; default: print {\"ready\": true} and read it from stdin")
    args = parser.parse_args(argv)
    courses = json.loads(args.courses_file.read_text()) if args.courses_file else []
    if args.mode == "ceiling":
        result = asyncio.run(run_ceiling(args))
    elif args.mode == "closed":
        result = asyncio.run(run_closed(args, courses))
    else:
        result = asyncio.run(run_open(args, courses))
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, separators=(",", ":")))
    tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
