"""Kinesis coming and going: the local kinesalite outlives clients that hang up mid-request,
and a consumer started before Kinesis waits for it the way it waits for its database."""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import struct
import subprocess
from collections.abc import Iterator

from libs.kinesis import kinesis_client
from tests import helpers


@contextlib.contextmanager
def kinesalite_process(port: int, log_path: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    """dev/kinesalite.js (what `make run` starts) on `port`, in memory; the process itself."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            ["node", str(helpers.ROOT / "dev" / "kinesalite.js"), "--port", str(port), "--shard-limit", "100"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        helpers.wait_for_port(port)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    with kinesalite_process(port, tmp_path / "kinesalite.log") as process:
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
