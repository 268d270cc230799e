"""The registration lifecycle in the enrollment service (issue 11), on SQLite and PostgreSQL:
waiting lists, cancellations and promotions in order, through the consumer's dispatch
(the same path as the running service) and UpdateCourse, with a sequential model of the
rules to compare against."""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest
from google.type import date_pb2
from sqlalchemy import Engine, func, select

from coursesignup.events.v1 import events_pb2
from libs import consumer as consumer_lib
from libs import outbox as outbox_lib
from libs.consumer import StreamRecord
from libs.db import make_engine
from libs.envelope import decode_envelope, new_envelope
from libs.errors import InvalidArgument
from libs.worker import dispatch
from services.enrollment.adapters.tables import courses, decisions, enrollments, metadata, waitlist
from services.enrollment.service_layer import catalogue
from services.enrollment.service_layer.deciding import REGISTRATIONS, SeatsChanged
from services.enrollment.service_layer.listing import list_decisions

_SEQUENCE = itertools.count(1000)


@pytest.fixture
def engine(database_url):
    engine = make_engine(database_url)
    for meta in (metadata, consumer_lib.metadata, outbox_lib.metadata):
        meta.create_all(engine)
    catalogue.create_campus(engine, "sp", "São Paulo")
    catalogue.create_course(engine, "small", "sp", "Small", 2)
    yield engine
    engine.dispose()


def sign_up(registration_id: str, *, join_waitlist: bool = True, course_id: str = "small",
            email: str | None = None, accepted: int = 0) -> bytes:
    body = events_pb2.RegisterStudent(
        registration_id=registration_id, course_id=course_id, name=f"Name {registration_id}",
        email=email or f"{registration_id}@Example.com", birth_date=date_pb2.Date(year=2000, month=2, day=29),
        locale="pt-BR", course_name="Small", join_waitlist=join_waitlist,
    )
    if accepted:
        body.accept_time.seconds = accepted
    else:
        body.accept_time.GetCurrentTime()
    return new_envelope(registration_id, register_student=body).SerializeToString()


def cancellation(registration_id: str, course_id: str = "small") -> bytes:
    body = events_pb2.CancelRegistration(registration_id=registration_id, course_id=course_id)
    return new_envelope(registration_id, cancel_registration=body).SerializeToString()


def records(payloads: list[bytes]) -> list[StreamRecord]:
    now = dt.datetime.now(dt.UTC)
    return [StreamRecord("registrations", "shard-0", str(next(_SEQUENCE)), "small", data, now)
            for data in payloads]


def decide(engine: Engine, payloads: list[bytes] | list[StreamRecord]) -> None:
    batch = payloads if payloads and isinstance(payloads[0], StreamRecord) else records(payloads)  # type: ignore[arg-type]
    with engine.begin() as conn:
        dispatch(conn, batch, REGISTRATIONS, lambda base: "events")  # type: ignore[arg-type]


def outcome(engine: Engine, registration_id: str) -> tuple[str, int]:
    row = catalogue.get_decision(engine, registration_id)
    return row.outcome, row.waitlist_position or 0


def events(engine: Engine) -> list[events_pb2.Envelope]:
    with engine.connect() as conn:
        return [decode_envelope(data) for data in
                conn.execute(select(outbox_lib.outbox.c.data).order_by(outbox_lib.outbox.c.id)).scalars()]


def course_row(engine: Engine, course_id: str = "small"):
    return catalogue.get_course(engine, course_id)


@dataclass
class Model:
    """The rules, sequentially: what the stream in order must end as."""

    capacity: int
    enrolled: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)
    promoted: list[str] = field(default_factory=list)

    def _fill(self) -> None:
        while self.waiting and len(self.enrolled) < self.capacity:
            head = self.waiting.pop(0)
            self.enrolled.append(head)
            self.promoted.append(head)

    def sign_up(self, rid: str) -> None:
        (self.enrolled if len(self.enrolled) < self.capacity and not self.waiting else self.waiting).append(rid)

    def cancel(self, rid: str) -> None:
        for line in (self.enrolled, self.waiting):
            if rid in line:
                line.remove(rid)
                self.cancelled.add(rid)
        self._fill()

    def raise_capacity(self, capacity: int) -> None:
        self.capacity = capacity
        self._fill()


def assert_matches(engine: Engine, model: Model) -> None:
    for rid in model.enrolled:
        assert outcome(engine, rid) == ("ENROLLED", 0), rid
    for position, rid in enumerate(model.waiting, start=1):
        assert outcome(engine, rid) == ("WAITLISTED", position), rid
    for rid in model.cancelled:
        assert outcome(engine, rid) == ("CANCELLED", 0), rid
    course = course_row(engine)
    assert (course.capacity, course.enrolled_count, course.waitlist_count) == (
        model.capacity, len(model.enrolled), len(model.waiting))
    with engine.connect() as conn:
        seated = set(conn.execute(select(enrollments.c.registration_id)).scalars())
    assert seated == set(model.enrolled)
    promoted = [e.student_enrolled.registration_id for e in events(engine)
                if e.WhichOneof("body") == "student_enrolled" and e.student_enrolled.promoted]
    assert promoted == model.promoted, "each promotion once, in waiting order"
    assert_replay_is_fair(events(engine))


def test_a_full_course_waitlists_who_asked_with_positions_and_declines_the_others(engine):
    decide(engine, [sign_up("a"), sign_up("b"), sign_up("c"), sign_up("d", join_waitlist=False), sign_up("e")])
    assert [outcome(engine, rid) for rid in "abcde"] == [
        ("ENROLLED", 0), ("ENROLLED", 0), ("WAITLISTED", 1), ("DECLINED_FULL", 0), ("WAITLISTED", 2)]
    waitlisted = [e.registration_waitlisted for e in events(engine)
                  if e.WhichOneof("body") == "registration_waitlisted"]
    assert [(w.registration_id, w.waitlist_position, w.contact_email, w.locale) for w in waitlisted] == [
        ("c", 1, "c@Example.com", "pt-BR"), ("e", 2, "e@Example.com", "pt-BR")]
    assert course_row(engine).waitlist_count == 2
    row = catalogue.get_decision(engine, "c")
    assert row.create_time is not None and not row.promoted
    # The same address waiting is a duplicate, as one enrolled is.
    decide(engine, [sign_up("c2", email="C@example.com")])
    assert outcome(engine, "c2") == ("DECLINED_DUPLICATE", 0)


def test_promotions_follow_the_waiting_order_and_positions_stay_1_to_n(engine):
    model = Model(capacity=2)
    ids = [f"r{i}" for i in range(10)]
    decide(engine, [sign_up(rid) for rid in ids])
    for rid in ids:
        model.sign_up(rid)
    assert_matches(engine, model)

    steps: list[tuple[str, str | int]] = [
        ("cancel", "r5"),   # a waiting one: those behind move up
        ("cancel", "r0"),   # an enrolled one: the head of the line takes the seat
        ("raise", 4),       # two new seats: the next two, in order
        ("cancel", "r9"),   # the last in line
        ("cancel", "r1"),
        ("cancel", "r3"),
        ("raise", 5),
        ("sign_up", "r10"),  # arrives behind everyone waiting
        ("cancel", "r2"),
        ("raise", 9),       # more seats than waiting: everyone in, the rest stays free
        ("sign_up", "r11"),  # nobody waits: a free seat
    ]
    for kind, value in steps:
        if kind == "cancel":
            decide(engine, [cancellation(str(value))])
            model.cancel(str(value))
        elif kind == "raise":
            catalogue.update_course(engine, "small", "", int(value), ["capacity"], stream_name=lambda base: "events")
            model.raise_capacity(int(value))
        else:
            decide(engine, [sign_up(str(value))])
            model.sign_up(str(value))
        assert_matches(engine, model)
    assert model.promoted and model.waiting == []


def test_cancelling_pending_enrolled_waitlisted_cancelled_and_declined_registrations(engine):
    # PENDING: the cancellation follows the sign-up on the stream, so it is applied right
    # after the decision, in the same batch: the seat it took goes on at once.
    decide(engine, [sign_up("p"), cancellation("p"), sign_up("a"), sign_up("b"), sign_up("w"),
                    sign_up("d", join_waitlist=False)])
    assert outcome(engine, "p") == ("CANCELLED", 0)
    assert [outcome(engine, rid) for rid in "abwd"] == [
        ("ENROLLED", 0), ("ENROLLED", 0), ("WAITLISTED", 1), ("DECLINED_FULL", 0)]
    kinds = Counter(e.WhichOneof("body") for e in events(engine))
    assert kinds == {"student_enrolled": 3, "registration_cancelled": 1, "registration_waitlisted": 1,
                     "registration_declined": 1}

    before = len(events(engine))
    decide(engine, [cancellation("w")])  # WAITLISTED: leaves the line, frees no seat
    decide(engine, [cancellation("a")])  # ENROLLED: frees a seat (nobody waits now)
    cancelled = {e.registration_cancelled.registration_id: e.registration_cancelled for e in events(engine)[before:]}
    assert (cancelled["w"].seat_freed, cancelled["a"].seat_freed) == (False, True)
    assert (cancelled["a"].email, cancelled["a"].contact_email, cancelled["a"].locale) == (
        "a@example.com", "a@Example.com", "pt-BR")
    assert cancelled["a"].birth_date == date_pb2.Date(year=2000, month=2, day=29)
    assert (course_row(engine).enrolled_count, course_row(engine).waitlist_count) == (1, 0)

    before = len(events(engine))
    decide(engine, [cancellation("a"), cancellation("d"), cancellation("p")])  # CANCELLED again, DECLINED
    assert len(events(engine)) == before, "nothing changes, no event"
    assert [outcome(engine, rid) for rid in "adp"] == [("CANCELLED", 0), ("DECLINED_FULL", 0), ("CANCELLED", 0)]
    assert course_row(engine).enrolled_count == 1

    # Cancelled before its sign-up was ever decided here: the sign-up never takes a seat.
    decide(engine, [cancellation("early")])
    decide(engine, [sign_up("early")])
    assert outcome(engine, "early") == ("CANCELLED", 0)
    assert course_row(engine).enrolled_count == 1
    # A cancellation naming another course than the registration's is not this writer's.
    catalogue.create_course(engine, "other", "sp", "Other", 5)
    decide(engine, [cancellation("b", course_id="other")])
    assert outcome(engine, "b") == ("ENROLLED", 0)


def test_a_redelivered_cancellation_changes_nothing(engine):
    decide(engine, [sign_up(rid) for rid in ("a", "b", "w1", "w2")])
    batch = records([cancellation("a"), sign_up("w3")])
    decide(engine, batch)
    state = [outcome(engine, rid) for rid in ("a", "b", "w1", "w2", "w3")]
    assert state == [("CANCELLED", 0), ("ENROLLED", 0), ("ENROLLED", 0), ("WAITLISTED", 1), ("WAITLISTED", 2)]
    published = len(events(engine))
    decide(engine, batch)  # the same records again (a batch redone after a crash, Kinesis redelivering)
    decide(engine, [cancellation("a")])  # a second request, a new record
    assert [outcome(engine, rid) for rid in ("a", "b", "w1", "w2", "w3")] == state
    assert len(events(engine)) == published
    assert course_row(engine).enrolled_count == 2


def _waiting_positions(engine: Engine) -> list[int]:
    with engine.connect() as conn:
        ids = list(conn.execute(select(waitlist.c.registration_id).order_by(waitlist.c.seq)).scalars())
    return [outcome(engine, rid)[1] for rid in ids]


def test_capacity_rises_racing_the_decider_never_overbook_nor_promote_twice(engine):
    """Real concurrency: UpdateCourse raising the capacity one seat at a time in one thread
    while the decider signs up and cancels in another. The course row lock serialises them."""
    batches = [[sign_up(f"s{b}-{i}") for i in range(8)] + [cancellation(f"s{b}-0"), cancellation(f"s{b - 1}-3")]
               for b in range(1, 16)]
    rises = list(range(3, 43))
    start = threading.Barrier(2)
    failures: list[BaseException] = []

    def decider() -> None:
        start.wait()
        for batch in batches:
            batch_records = records(batch)
            while True:
                try:
                    decide(engine, batch_records)
                    break
                except SeatsChanged:  # the consumer retries such a batch from its checkpoint
                    continue

    def admin() -> None:
        start.wait()
        for capacity in rises:
            catalogue.update_course(engine, "small", "", capacity, ["capacity"], stream_name=lambda base: "events")

    threads = [threading.Thread(target=guarded, args=(job, failures)) for job in (decider, admin)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []

    course = course_row(engine)
    with engine.connect() as conn:
        seated = conn.execute(select(func.count()).select_from(enrollments)).scalar_one()
        enrolled_decisions = conn.execute(select(func.count()).select_from(decisions)
                                          .where(decisions.c.outcome == "ENROLLED")).scalar_one()
        stored = conn.execute(select(courses.c.enrolled_count)).scalar_one()
    assert course.capacity == rises[-1]
    assert seated == stored == enrolled_decisions == course.enrolled_count <= course.capacity
    # Every freed or added seat went to the waiting list at once: a seat is free only if nobody waits.
    assert course.enrolled_count == course.capacity or course.waitlist_count == 0
    assert _waiting_positions(engine) == list(range(1, course.waitlist_count + 1))
    assert_replay_is_fair(events(engine))
    enrolled_events = Counter(e.student_enrolled.registration_id for e in events(engine)
                              if e.WhichOneof("body") == "student_enrolled")
    assert set(enrolled_events.values()) == {1}, "each seat given once"
    promotions = sum(1 for e in events(engine) if e.WhichOneof("body") == "student_enrolled"
                     and e.student_enrolled.promoted)
    with engine.connect() as conn:
        assert promotions == conn.execute(select(func.count()).select_from(decisions)
                                          .where(decisions.c.promoted.is_(True))).scalar_one() > 0


def assert_replay_is_fair(published: list[events_pb2.Envelope]) -> None:
    """Replays the events in outbox order (the commit order of the course's transactions,
    which the course lock serialises): each place told is the true one at that moment, and
    each promotion is the head of the line."""
    line: list[str] = []
    for envelope in published:
        kind = envelope.WhichOneof("body")
        if kind == "registration_waitlisted":
            line.append(envelope.registration_waitlisted.registration_id)
            assert envelope.registration_waitlisted.waitlist_position == len(line)
        elif kind == "student_enrolled" and envelope.student_enrolled.promoted:
            assert line and line.pop(0) == envelope.student_enrolled.registration_id, "promoted out of order"
        elif kind == "registration_cancelled" and envelope.registration_cancelled.registration_id in line:
            assert not envelope.registration_cancelled.seat_freed
            line.remove(envelope.registration_cancelled.registration_id)


def guarded(job, failures: list[BaseException]) -> None:
    try:
        job()
    except BaseException as error:  # reported by the test, not lost in the thread
        failures.append(error)


def test_capacity_cannot_be_lowered_below_the_enrolled_count_and_promotes_nothing(engine):
    decide(engine, [sign_up(rid) for rid in ("a", "b", "w")])
    with pytest.raises(Exception) as refused:
        catalogue.update_course(engine, "small", "", 1, ["capacity"])
    assert getattr(refused.value, "reason", "") == "CAPACITY_BELOW_ENROLLED"
    catalogue.update_course(engine, "small", "Renamed", 0, ["name"])
    assert outcome(engine, "w") == ("WAITLISTED", 1)
    assert course_row(engine).name == "Renamed"


def _listed(engine: Engine, filter_text: str = "", order_by: str = "", size: int = 0) -> list[str]:
    ids, token = [], ""
    while True:
        page = list_decisions(engine, filter_text, order_by, size, token, b"key")
        ids += [row.registration_id for row in page.rows]
        token = page.next_page_token
        if not token:
            return ids


def test_list_decisions_filters_by_student_course_status_and_time_in_keyset_pages(engine):
    catalogue.create_course(engine, "other", "sp", "Other", 5)
    at = iter(range(1_800_000_000, 1_800_000_100))
    decide(engine, [sign_up("a", email="ada@example.com", accepted=next(at)), sign_up("b", accepted=next(at)),
                    sign_up("w", accepted=next(at)), sign_up("d", email="Ada@Example.com ", accepted=next(at)),
                    sign_up("x", join_waitlist=False, accepted=next(at))])
    decide(engine, [sign_up("o", course_id="other", email="ADA@example.com", accepted=next(at))])
    decide(engine, [cancellation("b")])  # w moves into the seat

    assert _listed(engine, 'email = "ada@example.com"') == ["a", "d", "o"], "one student across courses"
    assert _listed(engine, "status = ENROLLED") == ["a", "w", "o"]
    assert _listed(engine, 'status = REGISTRATION_STATUS_CANCELLED OR status = "DECLINED_FULL"') == ["b", "x"]
    assert _listed(engine, "status = PENDING") == []
    assert _listed(engine, 'course_id = "other" AND status != CANCELLED') == ["o"]
    assert _listed(engine, 'create_time >= "2027-01-15T08:00:03Z"') == ["d", "x", "o"]
    everything = _listed(engine)
    assert everything == ["a", "b", "w", "d", "x", "o"], "create_time order"
    assert _listed(engine, size=2) == everything
    assert _listed(engine, "", "create_time desc", 2) == list(reversed(everything))
    assert _listed(engine, order_by="course_id, status desc", size=1) == ["o", "a", "w", "x", "d", "b"]
    first = list_decisions(engine, "", "", 2, "", b"key")
    row = first.rows[0]
    assert (row.name, row.email, row.waitlist_position) == ("Name a", "ada@example.com", 0)

    for bad_filter in ("status > ENROLLED", "status = SEATED", 'email = ada', "name = \"x\""):
        with pytest.raises(InvalidArgument) as refused:
            list_decisions(engine, bad_filter, "", 0, "", b"key")
        assert refused.value.reason == "INVALID_FILTER", bad_filter
    with pytest.raises(InvalidArgument) as tampered:
        list_decisions(engine, "status = ENROLLED", "", 2, first.next_page_token, b"key")
    assert tampered.value.reason == "INVALID_PAGE_TOKEN", "a token is tied to its filter"
