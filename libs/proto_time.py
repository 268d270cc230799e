"""Conversions between Python dates and times and the protobuf well-known types.

Every database here stores UTC; SQLite hands datetimes back without a zone, so a naive
value is read as UTC (`libs.db.as_utc`).
"""

from __future__ import annotations

import datetime as dt

from google.protobuf import timestamp_pb2
from google.type import date_pb2

from libs.db import as_utc


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(as_utc(value))
    return stamp


def date_message(day: dt.date) -> date_pb2.Date:
    return date_pb2.Date(year=day.year, month=day.month, day=day.day)
