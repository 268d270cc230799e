"""Builds and reads the protobuf Envelope that every Kinesis record carries."""

from __future__ import annotations

import uuid

from google.protobuf import timestamp_pb2
from google.protobuf.message import DecodeError

from coursesignup.events.v1 import events_pb2


class MalformedRecord(ValueError):
    """A stream record that cannot be decoded or lacks its body; it goes to dead letters."""


def new_envelope(correlation_id: str, **body: object) -> events_pb2.Envelope:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    envelope = events_pb2.Envelope(message_id=str(uuid.uuid4()), time=now, correlation_id=correlation_id)
    (field, message), = body.items()
    getattr(envelope, field).CopyFrom(message)
    return envelope


def decode_envelope(data: bytes) -> events_pb2.Envelope:
    envelope = events_pb2.Envelope()
    try:
        envelope.ParseFromString(data)
    except DecodeError as error:
        raise MalformedRecord(f"not an Envelope: {error}") from error
    if envelope.WhichOneof("body") is None:
        raise MalformedRecord("envelope has no body")
    if not envelope.message_id:
        raise MalformedRecord("envelope has no message_id")
    return envelope
