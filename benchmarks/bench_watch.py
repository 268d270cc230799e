"""Register throughput with and without 1,000 open WatchRegistration streams on the instance.

    python -m benchmarks watch [--seconds 5] [--concurrency 32] [--watches 1000]

One registration process (REGISTRATION_PROCESSES=1) and an enrollment service (SQLite,
the demo catalogue) over kinesalite, both kept running: enrollment decides every
sign-up and publishes its events, which the registration process's tail reads, so the
watched phase pays for the tail, the decoding of every event and the watches' periodic
re-reads. Phases, closed loop as benchmarks/bench_registration.py: Register with no
watch, then with `--watches` streams open (on registration ids issued for sign-ups never
made: PENDING, each re-read every 30 s), then with none again (the drift of the shared
machine). CPU per Register call is the registration process's utime + stime over the
phase divided by the calls answered; RSS is VmRSS of that process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pathlib
import sys
import tempfile
import time
import uuid

import grpc

from benchmarks.bench_registration import Phase, process_tree, rate
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from services.registration.domain.registration_ids import RegistrationIds
from tests import helpers
from tests.mesh import Mesh


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def measure(target: str, args: argparse.Namespace, pids: list[int]) -> list[tuple[str, Phase, float]]:
    from google.type import date_pb2

    opened = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
              for _ in range(4)]
    # Watches on their own channels: at most 1000 streams per HTTP/2 connection.
    watch_channels = [grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
                      for _ in range(max(1, args.watches // 250))]
    results: list[tuple[str, Phase, float]] = []
    try:
        stubs = [registration_pb2_grpc.RegistrationServiceStub(channel) for channel in opened]
        run = uuid.uuid4().hex[:8]

        async def register(index: int) -> object:
            return await stubs[index % len(stubs)].Register(registration_pb2.RegisterRequest(
                name=f"Bench {index}", email=f"watch-{run}-{index}@example.com", course_id="cs101",
                birth_date=date_pb2.Date(year=1990 + index % 20, month=1 + index % 12, day=1 + index % 28)))

        async def phase(label: str) -> None:
            measured = await rate(register, args.seconds, args.concurrency, label, pids)
            results.append((label, measured, rss_mb(pids[0])))
            print(f"  {label}: {measured.calls_per_second:.0f} Register/s, {measured.cpu_ms_per_call:.2f} ms CPU/call, "
                  f"RSS {results[-1][2]:.0f} MB", flush=True)

        await rate(register, 2, args.concurrency, "warm-up Register", pids)
        await phase("0 watches")
        ids = RegistrationIds(os.environ["REGISTRATION_ID_SECRET"])
        watch_stubs = [registration_pb2_grpc.RegistrationServiceStub(channel) for channel in watch_channels]
        calls = []
        first = []
        for index in range(args.watches):
            call = watch_stubs[index % len(watch_stubs)].WatchRegistration(
                registration_pb2.WatchRegistrationRequest(registration_id=ids.issue(f"watch-{run}-{index}")))
            calls.append(call)
            first.append(call.read())
        started = time.perf_counter()
        replies = await asyncio.gather(*first)
        assert all(reply.status == registration_pb2.REGISTRATION_STATUS_PENDING for reply in replies)
        print(f"  {len(calls)} watches open (first messages in {time.perf_counter() - started:.1f} s), "
              f"RSS {rss_mb(pids[0]):.0f} MB", flush=True)
        await phase(f"{args.watches} watches")
        for call in calls:
            call.cancel()
        await asyncio.sleep(1)
        await phase("0 watches again")
    finally:
        for channel in [*opened, *watch_channels]:
            await channel.close()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks watch")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--watches", type=int, default=1000)
    args = parser.parse_args(argv)
    with helpers.kinesalite() as kinesis, tempfile.TemporaryDirectory() as tmp:
        ports = {"registration": helpers.free_port(), "enrollment": helpers.free_port()}
        env = {**os.environ, "AWS_ENDPOINT_URL_KINESIS": kinesis, "AWS_ACCESS_KEY_ID": "local",
               "AWS_SECRET_ACCESS_KEY": "local", "KINESIS_STREAM_PREFIX": f"bench{uuid.uuid4().hex[:6]}-",
               "LOG_LEVEL": "INFO", "REGISTRATION_PROCESSES": "1", "REGISTRATION_METRICS_PORT": "0",
               "ENROLLMENT_METRICS_PORT": "0",
               "REGISTRATION_PORT": str(ports["registration"]), "ENROLLMENT_PORT": str(ports["enrollment"]),
               "ENROLLMENT_TARGET": f"127.0.0.1:{ports['enrollment']}", "SEED_DEMO_CATALOGUE": "true",
               "ENROLLMENT_DATABASE_URL": f"sqlite:///{tmp}/enrollment.db"}
        mesh = Mesh(ports, env, pathlib.Path(tmp))
        try:
            mesh.start("enrollment")
            mesh.start("registration")
            mesh.wait_healthy(("enrollment", "registration"))
            pids = process_tree(mesh.processes["registration"].pid)
            print(f"registration pid {pids}, enrollment running (decides and publishes events)", flush=True)
            results = asyncio.run(measure(mesh.target("registration"), args, pids))
        finally:
            for name in list(mesh.processes):
                mesh.stop(name, timeout=15)
    base = (results[0][1].calls_per_second + results[2][1].calls_per_second) / 2
    print(f"\nresults ({args.concurrency} Register calls in flight, one registration process, shared machine):")
    print(f"  {'phase':<18} {'Register/s':>10} {'vs no watch':>12} {'CPU ms/call':>12} {'RSS MB':>7}  errors")
    for label, phase, rss in results:
        print(f"  {label:<18} {phase.calls_per_second:>10.0f} {phase.calls_per_second / base:>12.1%} "
              f"{phase.cpu_ms_per_call:>12.2f} {rss:>7.0f}  {phase.errors or ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
