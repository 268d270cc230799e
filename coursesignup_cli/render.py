"""What the commands print: rich tables, and the age histogram as a bar chart."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from rich.table import Table
from rich.text import Text

from coursesignup.events.v1 import events_pb2
from coursesignup.notifier.v1 import notifier_pb2
from coursesignup.registration.v1 import registration_pb2

BAR_WIDTH = 40
STATUS_STYLES = {"PENDING": "yellow", "ENROLLED": "green"}


def registration_status(status: registration_pb2.RegistrationStatus.ValueType) -> Text:
    name = registration_pb2.RegistrationStatus.Name(status).removeprefix("REGISTRATION_STATUS_")
    return Text(name, style=STATUS_STYLES.get(name, "red"))


def date_text(date: Any) -> str:
    return f"{date.year:04d}-{date.month:02d}-{date.day:02d}" if date.year else ""


def time_text(timestamp: Any, has: bool = True) -> str:
    if not has or (timestamp.seconds == 0 and timestamp.nanos == 0):
        return ""
    return timestamp.ToDatetime(tzinfo=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def stats_table(stats: Any) -> Table:
    table = Table(title=f"{stats.scope} on {date_text(stats.as_of)}", show_header=True)
    for column in ("students", "min age", "max age", "average age", "median age"):
        table.add_column(column, justify="right")
    table.add_row(str(stats.student_count), str(stats.min_age), str(stats.max_age),
                  f"{stats.average_age:.2f}", f"{stats.median_age:g}")
    return table


def histogram(buckets: Iterable[Any]) -> Table:
    """One bar per age from the youngest to the oldest, ages without students included (the
    API leaves them out) so the shape of the distribution shows."""
    counts = {bucket.age: bucket.student_count for bucket in buckets}
    table = Table(title="students per age", show_header=True, box=None, pad_edge=False)
    table.add_column("age", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("students", justify="right")
    if not counts:
        return table
    largest = max(counts.values())
    for age in range(min(counts), max(counts) + 1):
        count = counts.get(age, 0)
        width = count * BAR_WIDTH / largest
        bar = "█" * int(width) + (_EIGHTHS[int((width - int(width)) * 8)] if width < BAR_WIDTH else "")
        table.add_row(str(age), Text(bar, style="cyan"), str(count))
    return table


# Partial blocks, so a bar's length is exact to an eighth of a character.
_EIGHTHS = ["", "▏", "▎", "▍", "▌", "▋", "▊", "▉"]


def roster_table(course_id: str, enrollments: Iterable[Any], as_of: Any) -> Table:
    table = Table(title=f"roster of {course_id} (ages on {date_text(as_of)})")
    for column in ("name", "email", "age", "birth date", "enrolled (UTC)", "registration id"):
        table.add_column(column, justify="right" if column == "age" else "left", overflow="fold")
    for enrollment in enrollments:
        table.add_row(enrollment.name, enrollment.email, str(enrollment.age), date_text(enrollment.birth_date),
                      time_text(enrollment.enroll_time), enrollment.registration_id)
    return table


def notifications_table(registration_id: str, notifications: Iterable[Any]) -> Table:
    table = Table(title=f"notifications of {registration_id}")
    for column in ("kind", "recipient", "status", "attempts", "created (UTC)", "sent (UTC)", "last error"):
        table.add_column(column, justify="right" if column == "attempts" else "left", overflow="fold")
    for notification in notifications:
        status = notifier_pb2.DeliveryStatus.Name(notification.status).removeprefix("DELIVERY_STATUS_")
        table.add_row(
            events_pb2.NotificationKind.Name(notification.kind).removeprefix("NOTIFICATION_KIND_"),
            notification.recipient,
            Text(status, style={"SENT": "green", "PENDING": "yellow"}.get(status, "red")),
            str(notification.attempts),
            time_text(notification.create_time),
            time_text(notification.send_time, notification.HasField("send_time")),
            notification.last_error,
        )
    return table
