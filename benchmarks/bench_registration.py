"""Register calls per second against the empty-call ceiling of the same server, same run.

    python -m benchmarks registration [--seconds 5] [--concurrency 32] [--processes 1,2] [--channels 4]

A registration service runs as its own process tree against kinesalite (with an
enrollment service for the catalogue, stopped once the catalogue is cached), once per
`--processes` value (REGISTRATION_PROCESSES: workers sharing the port with SO_REUSEPORT).
The baseline is grpc.health.v1 Check on that same server: the cost of a gRPC call that
does nothing. Then Register, whose every reply waits for Kinesis to accept the record
(batched into PutRecords). The client is one asyncio process keeping `--concurrency`
calls in flight (closed loop) over `--channels` channels, each its own TCP connection
(a local subchannel pool), so the kernel can spread them over the workers; one
connection always sticks to one worker. CPU per call is the registration processes'
utime + stime from /proc/<pid>/stat over the phase, divided by the calls answered.
Everything shares the same 2-core machine, the client included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from tests import helpers
from tests.mesh import Mesh

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PROC = pathlib.Path("/proc")


def _stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # comm may hold spaces and parentheses


def process_tree(root: int) -> list[int]:
    """`root` and its descendants (found by parent pid in /proc)."""
    parents: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields:
                parents[int(entry.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def tree_cpu_seconds(pids: list[int]) -> float:
    """utime + stime of each process still alive."""
    ticks = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


@dataclass
class Phase:
    calls_per_second: float
    cpu_ms_per_call: float
    errors: dict[str, int]


async def rate(call: Callable[[int], Awaitable[object]], seconds: float, concurrency: int, label: str,
               pids: list[int]) -> Phase:
    done = 0
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds
    next_report = time.perf_counter() + 2

    async def worker(offset: int) -> None:
        nonlocal done, next_report
        index = offset
        while time.perf_counter() < deadline:
            try:
                await call(index)
                done += 1
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] = errors.get(error.code().name, 0) + 1
            index += concurrency
            if time.perf_counter() > next_report:
                print(f"  {label}: {done} calls", flush=True)
                next_report += 2

    cpu_before = tree_cpu_seconds(pids)
    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu = tree_cpu_seconds(pids) - cpu_before
    return Phase(done / elapsed, cpu * 1000 / max(done, 1), errors)


async def measure(target: str, seconds: float, concurrency: int, channels: int, pids: list[int]) -> dict[str, Phase]:
    # A local subchannel pool gives each channel its own TCP connection (channels with
    # equal arguments otherwise share one), so SO_REUSEPORT can spread them.
    opened = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(channels)]
    try:
        health = [health_pb2_grpc.HealthStub(channel) for channel in opened]
        registration = [registration_pb2_grpc.RegistrationServiceStub(channel) for channel in opened]
        run = uuid.uuid4().hex[:8]

        async def empty(index: int) -> object:
            return await health[index % channels].Check(health_pb2.HealthCheckRequest())

        async def register(index: int) -> object:
            return await registration[index % channels].Register(registration_pb2.RegisterRequest(
                name=f"Bench {index}", email=f"bench-{run}-{index}@example.com", course_id="cs101",
                birth_date=date_pb2.Date(year=1990 + index % 20, month=1 + index % 12, day=1 + index % 28)))

        await rate(empty, 2, concurrency, "warm-up", pids)
        await rate(register, 1, concurrency, "warm-up Register", pids)
        return {
            "empty call (health Check)": await rate(empty, seconds, concurrency, "empty calls", pids),
            "Register": await rate(register, seconds, concurrency, "Register", pids),
        }
    finally:
        for channel in opened:
            await channel.close()


def run_one(processes: int, args: argparse.Namespace, kinesis: str) -> dict[str, Phase]:
    with tempfile.TemporaryDirectory() as tmp:
        ports = {"registration": helpers.free_port(), "enrollment": helpers.free_port()}
        env = {**os.environ, "AWS_ENDPOINT_URL_KINESIS": kinesis, "AWS_ACCESS_KEY_ID": "local",
               "AWS_SECRET_ACCESS_KEY": "local", "KINESIS_STREAM_PREFIX": f"bench{uuid.uuid4().hex[:6]}-",
               "LOG_LEVEL": "INFO", "REGISTRATION_PROCESSES": str(processes),
               "REGISTRATION_PORT": str(ports["registration"]), "ENROLLMENT_PORT": str(ports["enrollment"]),
               "ENROLLMENT_TARGET": f"127.0.0.1:{ports['enrollment']}", "SEED_DEMO_CATALOGUE": "true",
               "ENROLLMENT_DATABASE_URL": f"sqlite:///{tmp}/enrollment.db"}
        mesh = Mesh(ports, env, pathlib.Path(tmp))
        try:
            mesh.start("enrollment")
            mesh.start("registration")
            mesh.wait_healthy(("enrollment", "registration"))
            # The catalogue is cached now; stop enrollment so its consumer doesn't share the 2 cores.
            time.sleep(1.5)
            mesh.stop("enrollment")
            pids = process_tree(mesh.processes["registration"].pid)
            print(f"registration: {processes} worker process(es), pids {pids}", flush=True)
            results = asyncio.run(measure(mesh.target("registration"), args.seconds, args.concurrency,
                                          args.channels, pids))
        finally:
            for name in list(mesh.processes):
                mesh.stop(name, timeout=10)
        for line in (pathlib.Path(tmp) / "registration.log").read_text(errors="replace").splitlines():
            if '"registration worker stopped"' in line:
                entry = json.loads(line)
                print(f"  worker pid {entry['pid']}: {entry['register_accepted']} Register accepted, "
                      f"{entry['records_per_put']} records per PutRecords", flush=True)
        return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks registration")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--processes", default="1,2", help="REGISTRATION_PROCESSES values to measure")
    args = parser.parse_args(argv)
    results: dict[int, dict[str, Phase]] = {}
    with helpers.kinesalite() as kinesis:
        for processes in (int(p) for p in args.processes.split(",")):
            print(f"\n--- REGISTRATION_PROCESSES={processes}", flush=True)
            results[processes] = run_one(processes, args, kinesis)
    print(f"\nresults ({args.concurrency} calls in flight over {args.channels} channels, one client process):")
    print(f"  {'processes':<10} {'call':<28} {'calls/s':>8} {'of ceiling':>11} {'CPU ms/call':>12}  errors")
    for processes, phases in results.items():
        baseline = phases["empty call (health Check)"].calls_per_second
        for label, phase in phases.items():
            print(f"  {processes:<10} {label:<28} {phase.calls_per_second:>8.0f} "
                  f"{phase.calls_per_second / baseline:>11.0%} {phase.cpu_ms_per_call:>12.2f}  {phase.errors or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
