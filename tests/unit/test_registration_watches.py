"""Which open watches an enrollment event wakes (issue 11): its registration's, and every
watch of its course (positions move for those no event names); closed watches leave no trace."""

from __future__ import annotations

import asyncio
import datetime as dt

from coursesignup.events.v1 import events_pb2
from libs.consumer import StreamRecord
from libs.envelope import new_envelope
from services.registration.service_layer.watches import OPEN_WATCHES, WatchHub


def record(**body: object) -> StreamRecord:
    message = next(iter(body.values()))
    envelope = new_envelope(message.registration_id, **body)  # type: ignore[attr-defined]
    return StreamRecord("enrollment-events", "shard-0", "1", message.course_id,  # type: ignore[attr-defined]
                        envelope.SerializeToString(), dt.datetime.now(dt.UTC))


def test_an_event_wakes_its_registration_and_every_watch_of_its_course_only() -> None:
    async def scenario() -> None:
        hub = WatchHub()
        with hub.watch("reg-a") as pending, hub.watch("reg-b") as waiting, hub.watch("reg-c") as elsewhere:
            hub.follow_course(waiting, "art110")
            hub.follow_course(elsewhere, "cs101")
            assert OPEN_WATCHES._value.get() == 3
            # Someone else in art110 cancelled: reg-b moves up although no event names it.
            hub.on_events([record(registration_cancelled=events_pb2.RegistrationCancelled(
                registration_id="reg-x", course_id="art110"))])
            assert waiting.woken.is_set() and not pending.woken.is_set() and not elsewhere.woken.is_set()
            waiting.woken.clear()
            hub.on_events([record(registration_waitlisted=events_pb2.RegistrationWaitlisted(
                registration_id="reg-a", course_id="math1"))])
            assert pending.woken.is_set() and not elsewhere.woken.is_set()
        assert hub.count == 0 and OPEN_WATCHES._value.get() == 0
        assert not hub._by_registration and not hub._by_course, "closed watches leave no index entry"
        hub.on_events([record(registration_cancelled=events_pb2.RegistrationCancelled(
            registration_id="reg-b", course_id="art110"))])
        assert hub.events_seen == 2, "with no watch open, records are not even decoded"

    asyncio.run(scenario())
