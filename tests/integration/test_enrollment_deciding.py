"""Deciding batches of RegisterStudent commands against SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter

import pytest
from google.type import date_pb2
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from coursesignup.events.v1 import events_pb2
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.envelope import decode_envelope, new_envelope
from libs.worker import dispatch
from services.enrollment.adapters.tables import courses, decisions, metadata
from services.enrollment.service_layer import catalogue
from services.enrollment.service_layer.deciding import REGISTRATIONS


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    for meta in (metadata, consumer_lib.metadata, outbox_lib.metadata):
        meta.create_all(engine)
    catalogue.create_campus(engine, "sp", "São Paulo")
    catalogue.create_course(engine, "small", "sp", "Small", 2)
    yield engine
    engine.dispose()


def command(course_id: str, email: str, registration_id: str | None = None) -> bytes:
    body = events_pb2.RegisterStudent(
        registration_id=registration_id or f"reg_{uuid.uuid4().hex}", course_id=course_id, name="N",
        email=email, birth_date=date_pb2.Date(year=2000, month=2, day=29), locale="pt-BR", course_name="Small",
    )
    return new_envelope(body.registration_id, register_student=body).SerializeToString()


def records(payloads: list[bytes]) -> list[StreamRecord]:
    now = dt.datetime.now(dt.UTC)
    return [StreamRecord("registrations", "shard-0", str(100 + i), "small", data, now)
            for i, data in enumerate(payloads)]


def decide(engine, payloads: list[bytes]) -> None:
    with engine.begin() as conn:
        dispatch(conn, records(payloads), REGISTRATIONS, lambda base: "events")


def outcomes(engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(decisions.c.outcome)).scalars())


def outbox_types(engine) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(outbox_lib.outbox.c.data)).scalars()
        return Counter(decode_envelope(data).WhichOneof("body") for data in rows)


def test_a_batch_fills_the_course_then_declines_and_writes_one_event_per_decision(engine):
    decide(engine, [command("small", f"S{i}@example.com") for i in range(5)])
    assert outcomes(engine) == {"ENROLLED": 2, "DECLINED_FULL": 3}
    assert catalogue.get_course(engine, "small").enrolled_count == 2
    assert outbox_types(engine) == {"student_enrolled": 2, "registration_declined": 3}


def test_each_event_carries_what_the_decision_email_needs(engine):
    decide(engine, [command("small", f" S{i}@example.com", f"reg_{i}") for i in range(3)])
    with engine.connect() as conn:
        envelopes = [decode_envelope(data) for data in conn.execute(select(outbox_lib.outbox.c.data)).scalars()]
    for envelope in envelopes:
        event = getattr(envelope, envelope.WhichOneof("body"))
        assert (event.contact_email, event.name, event.course_name, event.locale) == (
            f"S{event.registration_id[-1]}@example.com", "N", "Small", "pt-BR")
        # The same fact always has the same id, so a copy can be told from a new message.
        assert envelope.message_id == f"{envelope.WhichOneof('body')}:{event.registration_id}"
    assert {e.student_enrolled.email for e in envelopes if e.HasField("student_enrolled")} == {
        "s0@example.com", "s1@example.com"}


def test_a_redelivered_batch_changes_nothing(engine):
    batch = [command("small", f"s{i}@example.com") for i in range(3)]
    decide(engine, batch)
    decide(engine, batch)
    decide(engine, batch[1:])
    assert outcomes(engine) == {"ENROLLED": 2, "DECLINED_FULL": 1}
    assert catalogue.get_course(engine, "small").enrolled_count == 2
    assert sum(outbox_types(engine).values()) == 3


def test_the_same_email_in_any_case_is_a_duplicate_across_and_within_batches(engine):
    decide(engine, [command("small", "ada@example.com"), command("small", "ADA@example.com")])
    decide(engine, [command("small", " Ada@Example.com")])
    assert outcomes(engine) == {"ENROLLED": 1, "DECLINED_DUPLICATE": 2}


def test_unknown_courses_are_declined_and_poison_records_are_dead_lettered(engine):
    decide(engine, [command("ghost", "a@example.com"), b"\x00garbage", command("small", "b@example.com"),
                    new_envelope("x", student_enrolled=events_pb2.StudentEnrolled()).SerializeToString()])
    assert outcomes(engine) == {"DECLINED_UNKNOWN_COURSE": 1, "ENROLLED": 1}
    with engine.connect() as conn:
        reasons = conn.execute(select(consumer_lib.dead_letters.c.reason)).scalars().all()
    assert len(reasons) == 2
    assert any("does not belong on the registrations stream" in r for r in reasons)


def test_the_database_refuses_an_overbooked_course_whatever_the_code_does(engine):
    decide(engine, [command("small", f"s{i}@example.com") for i in range(2)])
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(update(courses).where(courses.c.course_id == "small")
                     .values(enrolled_count=courses.c.enrolled_count + 1))
    assert catalogue.get_course(engine, "small").enrolled_count == 2


def test_capacity_cannot_be_lowered_below_the_enrolled_count(engine):
    from libs.errors import FailedPrecondition

    decide(engine, [command("small", f"s{i}@example.com") for i in range(2)])
    with pytest.raises(FailedPrecondition):
        catalogue.update_course(engine, "small", "", 1, ["capacity"])
    raised = catalogue.update_course(engine, "small", "", 5, ["capacity"])
    assert (raised.capacity, raised.name) == (5, "Small")
    decide(engine, [command("small", f"t{i}@example.com") for i in range(5)])
    assert catalogue.get_course(engine, "small").enrolled_count == 5
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(decisions)).scalar_one() == 7
