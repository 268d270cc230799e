"""Kinesis coming and going: the local kinesalite outlives clients that hang up mid-request,
and a consumer started before Kinesis waits for it the way it waits for its database."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
from datetime import datetime

from libs.kinesis import kinesis_client
from tests import helpers


def half_a_post(port: int, reset: bool) -> None:
    """The headers of a PutRecord and part of its body, then the connection is dropped
    (with a reset, as a killed client's kernel does, or with a plain close)."""
    body = json.dumps({"StreamName": "s", "Data": "aGVsbG8=", "PartitionKey": "k"}).encode()
    head = (
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-amz-json-1.1\r\n"
        "X-Amz-Target: Kinesis_20131202.PutRecord\r\n"
        "Authorization: AWS4-HMAC-SHA256 Credential=local/20260101/us-east-1/kinesis/aws4_request, "
        "SignedHeaders=host, Signature=0\r\nX-Amz-Date: 20260101T000000Z\r\n"
        f"Content-Length: {len(body) * 10}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + body[: len(body) // 2])
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_kinesalite_outlives_clients_that_hang_up_in_the_middle_of_a_request(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local")
    port = helpers.free_port()
    with helpers.kinesalite_process(shard_limit=100, port=port, log_path=tmp_path / "kinesalite.log") as (
            _url, process):
        client = kinesis_client("us-east-1", f"http://127.0.0.1:{port}")
        client.create_stream(StreamName="after-aborts", ShardCount=1)
        for attempt in range(6):
            half_a_post(port, reset=attempt % 2 == 0)
            # The marker: a whole request on a new connection, answered after the
            # aborted one was dropped (kinesalite died at that moment, before the fix).
            client.put_record(StreamName="after-aborts", Data=f"record {attempt}".encode(), PartitionKey="k")
        assert client.list_streams()["StreamNames"] == ["after-aborts"]
        shard = client.list_shards(StreamName="after-aborts")["Shards"][0]["ShardId"]
        iterator = client.get_shard_iterator(StreamName="after-aborts", ShardId=shard,
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        records = client.get_records(ShardIterator=iterator)["Records"]
        assert [r["Data"] for r in records] == [f"record {n}".encode() for n in range(6)]
        assert process.poll() is None, (tmp_path / "kinesalite.log").read_text()


def retry_lines(log_path: pathlib.Path, message: str) -> list[datetime]:
    times = []
    for line in log_path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if entry.get("message") == message:
                times.append(datetime.fromisoformat(entry["time"].replace("Z", "+00:00")))
    return times


def test_stats_started_before_kinesis_waits_past_a_minute_logging_each_retry_then_serves(tmp_path):
    """Before, the wait for Kinesis gave up after 60 s and the service exited; for its
    database it waited. Kinesis starts here once the service has logged retries over more
    than 65 s (its own clock), and the service must then turn SERVING."""
    kinesis_port, stats_port = helpers.free_port(), helpers.free_port()
    log_path = tmp_path / "stats.log"
    env = {**os.environ, "STATS_PORT": str(stats_port), "BIND_HOST": "127.0.0.1",
           "STATS_DATABASE_URL": f"sqlite:///{tmp_path / 'stats.db'}",
           "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{kinesis_port}", "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
           "KINESIS_STREAM_PREFIX": "late-", "KINESIS_SHARD_COUNT": "1", "LOG_LEVEL": "INFO"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.stats"], cwd=helpers.ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        def check_alive() -> None:
            if process.poll() is not None:
                raise AssertionError(f"stats exited with {process.returncode}: "
                                     f"{log_path.read_text(errors='replace')[-2000:]}")

        def retried_for_65_seconds() -> bool:
            check_alive()
            times = retry_lines(log_path, "Kinesis not reachable; retrying")
            return len(times) >= 2 and (times[-1] - times[0]).total_seconds() > 65

        helpers.wait_until(retried_for_65_seconds, timeout=150, what="65 s of logged Kinesis retries",
                           interval=1.0)
        with helpers.kinesalite_process(shard_limit=100, port=kinesis_port, log_path=tmp_path / "kinesalite.log"):
            helpers.wait_serving(stats_port, timeout=60, check_alive=check_alive)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
