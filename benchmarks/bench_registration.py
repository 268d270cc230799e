"""Register calls per second against the empty-call ceiling of the same server, same run.

    python -m benchmarks registration [--seconds 10] [--concurrency 64]

A registration server runs as its own process against kinesalite (with an enrollment
service for the catalogue). The baseline is grpc.health.v1 Check on that same server:
the cost of a gRPC call that does nothing. Then Register, whose every reply waits for
Kinesis to accept the record (batched into PutRecords). The client is one asyncio
process with many concurrent calls, on the same 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from tests import helpers
from tests.mesh import Mesh


async def rate(call: Callable[[int], Awaitable[object]], seconds: float, concurrency: int, label: str) -> float:
    done = 0
    deadline = time.perf_counter() + seconds
    next_report = time.perf_counter() + 2

    async def worker(offset: int) -> None:
        nonlocal done, next_report
        index = offset
        while time.perf_counter() < deadline:
            await call(index)
            index += concurrency
            done += 1
            if time.perf_counter() > next_report:
                print(f"  {label}: {done} calls", flush=True)
                next_report += 2

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.perf_counter() - started)


async def measure(target: str, seconds: float, concurrency: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        registration = registration_pb2_grpc.RegistrationServiceStub(channel)
        run = uuid.uuid4().hex[:8]

        async def empty(_: int) -> object:
            return await health.Check(health_pb2.HealthCheckRequest())

        async def register(index: int) -> object:
            return await registration.Register(registration_pb2.RegisterRequest(
                name=f"Bench {index}", email=f"bench-{run}-{index}@example.com", course_id="cs101",
                birth_date=date_pb2.Date(year=1990 + index % 20, month=1 + index % 12, day=1 + index % 28)))

        await rate(empty, 2, concurrency, "warm-up")
        return {
            "empty call (health Check)": await rate(empty, seconds, concurrency, "empty calls"),
            "Register": await rate(register, seconds, concurrency, "Register"),
        }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks registration")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    with helpers.kinesalite() as kinesis, tempfile.TemporaryDirectory() as tmp:
        ports = {"registration": helpers.free_port(), "enrollment": helpers.free_port()}
        env = {**os.environ, "AWS_ENDPOINT_URL_KINESIS": kinesis, "AWS_ACCESS_KEY_ID": "local",
               "AWS_SECRET_ACCESS_KEY": "local", "KINESIS_STREAM_PREFIX": "bench-", "LOG_LEVEL": "WARNING",
               "REGISTRATION_PORT": str(ports["registration"]), "ENROLLMENT_PORT": str(ports["enrollment"]),
               "ENROLLMENT_TARGET": f"127.0.0.1:{ports['enrollment']}", "SEED_DEMO_CATALOGUE": "true",
               "ENROLLMENT_DATABASE_URL": f"sqlite:///{tmp}/enrollment.db"}
        mesh = Mesh(ports, env, helpers.pathlib.Path(tmp))
        try:
            mesh.start("enrollment")
            mesh.start("registration")
            mesh.wait_healthy(("enrollment", "registration"))
            # The catalogue is cached now; stop enrollment so its consumer doesn't share the 2 cores.
            time.sleep(1)
            mesh.stop("enrollment")
            results = asyncio.run(measure(mesh.target("registration"), args.seconds, args.concurrency))
        finally:
            for name in list(mesh.processes):
                mesh.stop(name, timeout=10)
    baseline = results["empty call (health Check)"]
    print(f"\nresults ({args.concurrency} concurrent calls, one client process):")
    for label, value in results.items():
        print(f"  {label:<28} {value:>8.0f} calls/s   {value / baseline:.0%} of the empty-call ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
