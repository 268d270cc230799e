"""Kinesis writes retry in our loops with the one backoff, and botocore does not retry under them."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from libs import kinesis
from libs.kinesis import KinesisUnavailable, OutgoingRecord, RecordBatcher, kinesis_client, put_records


class RejectingKinesis:
    """Answers PutRecords, rejecting each record its first `rejections[data]` times."""

    def __init__(self, rejections: dict[bytes, int], raise_first: int = 0) -> None:
        self.rejections = dict(rejections)
        self.raise_first = raise_first
        self.calls: list[list[bytes]] = []

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:  # noqa: N803
        self.calls.append([r["Data"] for r in Records])
        if self.raise_first:
            self.raise_first -= 1
            raise EndpointConnectionError(endpoint_url="http://kinesis.invalid")
        answers = []
        for record in Records:
            left = self.rejections.get(record["Data"], 0)
            if left:
                self.rejections[record["Data"]] = left - 1
                answers.append({"ErrorCode": "ProvisionedThroughputExceededException", "ErrorMessage": "slow down"})
            else:
                answers.append({"SequenceNumber": f"seq-{record['Data'].decode()}", "ShardId": "shardId-0"})
        return {"FailedRecordCount": sum("ErrorCode" in a for a in answers), "Records": answers}


@pytest.fixture(autouse=True)
def no_sleeping(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr("tenacity.nap.time.sleep", slept.append)
    return slept


def test_put_records_retries_only_the_rejected_entries_with_the_backoff(no_sleeping: list[float]) -> None:
    client = RejectingKinesis({b"b": 2}, raise_first=1)
    records = [OutgoingRecord("k", b"a"), OutgoingRecord("k", b"b"), OutgoingRecord("k", b"c")]
    assert put_records(client, "s", records) == ["seq-a", "seq-b", "seq-c"]
    assert client.calls == [[b"a", b"b", b"c"], [b"a", b"b", b"c"], [b"b"], [b"b"]]
    backoff = kinesis.PUT_RECORDS_BACKOFF
    assert len(no_sleeping) == 3
    for attempt, delay in enumerate(no_sleeping, start=1):
        assert backoff.ceiling(attempt) / 2 <= delay <= backoff.ceiling(attempt)


def test_put_records_out_of_attempts_reports_the_unaccepted_records_as_none(no_sleeping: list[float]) -> None:
    client = RejectingKinesis({b"b": 100})
    assert put_records(client, "s", [OutgoingRecord("k", b"a"), OutgoingRecord("k", b"b")], attempts=3) == [
        "seq-a", None]
    assert len(client.calls) == 3
    assert len(no_sleeping) == 2, "no pause after the last attempt"


def test_the_kinesis_client_makes_each_call_once_because_our_loops_retry() -> None:
    client = kinesis_client("us-east-1", endpoint_url="http://127.0.0.1:1")  # nothing listens there
    sent: list[str] = []
    client.meta.events.register("before-send.kinesis", lambda request, **_: sent.append(request.url))
    with pytest.raises(EndpointConnectionError):
        client.list_streams(Limit=1)
    assert len(sent) == 1


def test_the_batcher_retries_a_rejected_record_then_gives_up_within_its_deadline() -> None:
    async def scenario() -> tuple[str, BaseException | None, int]:
        client = RejectingKinesis({b"once": 1, b"never": 1000})
        batcher = RecordBatcher(client, "s", max_wait_seconds=0, deadline_seconds=0.2)
        batcher.start()
        retried = batcher.put(b"once", "k")
        doomed = batcher.put(b"never", "k")
        sequence_number = await asyncio.wait_for(retried, 5)
        error = None
        try:
            await asyncio.wait_for(doomed, 10)
        except KinesisUnavailable as failure:
            error = failure
        await batcher.close()
        return sequence_number, error, sum(b"never" in call for call in client.calls)

    sequence_number, error, attempts = asyncio.run(scenario())
    assert sequence_number == "seq-once"
    assert isinstance(error, KinesisUnavailable)
    # attempts * 0.05 > deadline ends it: 0.2 s of deadline allows 4 attempts, the 5th fails it.
    assert attempts == 5
