"""The open WatchRegistration calls of this process, and what wakes them.

Each registration process follows `enrollment-events` with one read-only tail
(`Runtime.tail`); every event names its registration and its course. A watch is woken by
an event of its registration (decided, waitlisted, promoted, cancelled) and by any event
of its course, since a registration's waitlist position moves when someone else in the
same course is cancelled or promoted and no event names the ones who move up. A woken
watch asks enrollment for the registration again (the source of truth, positions
included) and sends it if it differs from what it sent last. Wakes only set an event, so
a burst of a course's events costs each of its watches one look-up, and a process with
no open watch does not even decode the records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import Gauge

from libs.consumer import StreamRecord
from libs.envelope import MalformedRecord, decode_envelope

log = logging.getLogger(__name__)

# Summed over REGISTRATION_PROCESSES workers by the parent's /metrics (multiprocess mode).
OPEN_WATCHES = Gauge("coursesignup_registration_watches", "WatchRegistration calls open in this process.",
                     multiprocess_mode="livesum")


@dataclass(eq=False)
class Watch:
    """One open WatchRegistration call: `woken` is set by each event that may concern it."""

    registration_id: str
    course_id: str = ""
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class WatchHub:
    """Open watches, indexed by registration id and by course id."""

    def __init__(self) -> None:
        self._by_registration: dict[str, set[Watch]] = {}
        self._by_course: dict[str, set[Watch]] = {}
        self.count = 0
        self.events_seen = 0

    @contextlib.contextmanager
    def watch(self, registration_id: str) -> Iterator[Watch]:
        """Registers a watch for the duration of the block (the call), whatever ends it."""
        watch = Watch(registration_id)
        self._by_registration.setdefault(registration_id, set()).add(watch)
        self.count += 1
        OPEN_WATCHES.inc()
        try:
            yield watch
        finally:
            self._discard(self._by_registration, registration_id, watch)
            if watch.course_id:
                self._discard(self._by_course, watch.course_id, watch)
            self.count -= 1
            OPEN_WATCHES.dec()

    def follow_course(self, watch: Watch, course_id: str) -> None:
        """Also wakes `watch` on every event of `course_id` (once its course is known)."""
        if course_id == watch.course_id:
            return
        if watch.course_id:
            self._discard(self._by_course, watch.course_id, watch)
        watch.course_id = course_id
        self._by_course.setdefault(course_id, set()).add(watch)

    @staticmethod
    def _discard(index: dict[str, set[Watch]], key: str, watch: Watch) -> None:
        watches = index.get(key)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del index[key]

    def on_events(self, records: list[StreamRecord]) -> None:
        """The tail's records (on the event loop): wakes the watches they concern."""
        if not self.count:
            return
        for record in records:
            try:
                envelope = decode_envelope(record.data)
            except MalformedRecord:
                continue  # the consumers dead-letter it; nothing here to wake
            body = getattr(envelope, envelope.WhichOneof("body") or "")
            self.events_seen += 1
            for index, key in ((self._by_registration, getattr(body, "registration_id", "")),
                               (self._by_course, getattr(body, "course_id", "") or record.partition_key)):
                for watch in index.get(key, ()):
                    watch.woken.set()
