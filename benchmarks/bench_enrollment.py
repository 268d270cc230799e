"""Enrollment decisions per second on PostgreSQL: batches against one transaction per record,
and 1 against 3 worker processes on a 4-shard stream, all measured in the same run.

    python -m benchmarks enrollment [--records 20000]

1. The decider alone: the same commands decided one per transaction, then in batches of
   500 (what a worker does with one GetRecords page), against fresh schemas.
2. Worker processes end to end: the commands are put on a fresh 4-shard kinesalite stream
   first, then `python -m services.enrollment` workers consume them (and publish their
   events through the outbox); the rate is taken between 10% and 90% decided.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import subprocess
import sys
import time
import uuid

from sqlalchemy import Engine, func, select

from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.kinesis import OutgoingRecord, ensure_stream, kinesis_client, put_records
from libs.worker import dispatch
from services.enrollment.adapters.tables import decisions, metadata
from services.enrollment.service_layer import catalogue
from services.enrollment.service_layer.deciding import REGISTRATIONS
from tests import helpers
from tests.faults import command_bytes, make_applicants

COURSES = 50


def progress(label: str, done: int, total: int) -> None:
    print(f"  {label}: {done}/{total}", flush=True)


def prepared_engine(url: str, capacities: dict[str, int]) -> Engine:
    engine = make_engine(url)
    for meta in (metadata, consumer_lib.metadata, outbox_lib.metadata):
        meta.create_all(engine)
    catalogue.create_campus(engine, "bench", "Bench")
    for course_id, capacity in capacities.items():
        catalogue.create_course(engine, course_id, "bench", course_id, capacity)
    return engine


def time_decider(url: str, capacities: dict[str, int], payloads: list[tuple[str, bytes]], batch: int) -> float:
    engine = prepared_engine(url, capacities)
    now = dt.datetime.now(dt.UTC)
    records = [StreamRecord("bench", "shardId-0", str(i), key, data, now) for i, (key, data) in enumerate(payloads)]
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        with engine.begin() as conn:
            dispatch(conn, records[start:start + batch], REGISTRATIONS, lambda base: "bench-events")
        if (start // batch) % max(1, len(records) // batch // 5) == 0:
            progress(f"batch={batch}", start + batch, len(records))
    elapsed = time.perf_counter() - started
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar_one() == len(records)
    engine.dispose()
    return len(records) / elapsed


def time_workers(url: str, capacities: dict[str, int], payloads: list[tuple[str, bytes]], workers: int,
                 kinesis: str) -> float:
    engine = prepared_engine(url, capacities)
    prefix = f"bench{uuid.uuid4().hex[:6]}-"
    os.environ["AWS_ENDPOINT_URL_KINESIS"] = kinesis
    client = kinesis_client("us-east-1", endpoint_url=kinesis)
    stream = f"{prefix}registrations"
    ensure_stream(client, stream, 4)
    assert all(put_records(client, stream, [OutgoingRecord(k, d) for k, d in payloads]))
    env = {**os.environ, "AWS_ENDPOINT_URL_KINESIS": kinesis, "KINESIS_STREAM_PREFIX": prefix,
           "KINESIS_SHARD_COUNT": "4", "ENROLLMENT_DATABASE_URL": url, "LEASE_SECONDS": "3", "LOG_LEVEL": "WARNING",
           "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local"}
    processes = []
    started = time.perf_counter()
    for index in range(workers):
        env_i = {**env, "ENROLLMENT_PORT": str(helpers.free_port()), "WORKER_ID": f"bench-{index}"}
        processes.append(subprocess.Popen([sys.executable, "-m", "services.enrollment"], env=env_i,
                                          cwd=helpers.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        decided = 0
        last_report = 0.0
        crossed: dict[float, tuple[float, int]] = {}
        while decided < len(payloads):
            time.sleep(0.05)
            with engine.connect() as conn:
                decided = conn.execute(select(func.count()).select_from(decisions)).scalar_one()
            for mark in (0.1, 0.9):
                if decided >= mark * len(payloads) and mark not in crossed:
                    crossed[mark] = (time.perf_counter(), decided)
            if time.perf_counter() - last_report > 2:
                progress(f"{workers} worker(s)", decided, len(payloads))
                last_report = time.perf_counter()
            if time.perf_counter() - started > 600:
                raise TimeoutError("workers did not finish in 10 minutes")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    # Steady state: from 10% to 90% decided, leaving out process start-up and the tail.
    (t1, n1), (t2, n2) = crossed[0.1], crossed[0.9]
    engine.dispose()
    return (n2 - n1) / (t2 - t1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks enrollment")
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args(argv)
    if not helpers.postgres_available():
        print(f"PostgreSQL not reachable at {helpers.postgres_url()}; set TEST_DATABASE_URL")
        return 1
    rng = random.Random(1)
    capacities = {f"c{i:02d}": rng.randint(50, 600) for i in range(COURSES)}
    applicants = make_applicants(rng, sorted(capacities), args.records, retry_share=0)
    payloads = [(a.course_id, command_bytes(a, f"reg_{uuid.uuid4().hex}")) for a in applicants]
    per_record_sample = payloads[: min(len(payloads), 3000)]

    results: dict[str, float] = {}
    print(f"decider alone, PostgreSQL, {len(per_record_sample)} records:", flush=True)
    with helpers.postgres_schema() as url:
        results["one transaction per record"] = time_decider(url, capacities, per_record_sample, 1)
    with helpers.postgres_schema() as url:
        results["batches of 500"] = time_decider(url, capacities, per_record_sample, 500)
    print(f"worker processes, 4-shard kinesalite stream, {len(payloads)} records:", flush=True)
    with helpers.kinesalite() as kinesis:
        for workers in (1, 3):
            with helpers.postgres_schema() as url:
                results[f"{workers} worker process(es), end to end"] = time_workers(
                    url, capacities, payloads, workers, kinesis)

    baseline = results["one transaction per record"]
    print("\nresults (decisions per second; ratio against one transaction per record):")
    for label, rate in results.items():
        print(f"  {label:<40} {rate:>9.0f}/s   x{rate / baseline:.1f}")
    one = results["1 worker process(es), end to end"]
    print(f"  3 workers against 1 worker: x{results['3 worker process(es), end to end'] / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
