"""Conversions between Python dates and times and the protobuf well-known types.

Every database here stores UTC; SQLite hands datetimes back without a zone, so a naive
value is read as UTC.
"""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from google.type import date_pb2


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def date_message(day: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)
