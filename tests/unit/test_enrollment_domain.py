"""The capacity decision, in arrival order."""

from __future__ import annotations

from services.enrollment.domain.model import CourseSeats, Outcome, normalize_email


def test_seats_fill_in_order_then_the_course_declines():
    seats = CourseSeats("c", "sp", "C", capacity=2, enrolled=0, enrolled_emails=set())
    outcomes = [seats.decide(e) for e in ("a@x", "b@x", "c@x", "a@x")]
    assert outcomes == [Outcome.ENROLLED, Outcome.ENROLLED, Outcome.DECLINED_FULL, Outcome.DECLINED_DUPLICATE]
    assert seats.enrolled == 2


def test_a_duplicate_is_declined_as_such_even_when_full():
    seats = CourseSeats("c", "sp", "C", capacity=1, enrolled=1, enrolled_emails={"a@x"})
    assert seats.decide("a@x") is Outcome.DECLINED_DUPLICATE
    assert seats.decide("b@x") is Outcome.DECLINED_FULL


def test_zero_capacity_enrolls_nobody():
    seats = CourseSeats("c", "sp", "C", capacity=0, enrolled=0, enrolled_emails=set())
    assert seats.decide("a@x") is Outcome.DECLINED_FULL


def test_email_identity_ignores_case_and_spaces():
    assert normalize_email("  Ada@Example.COM ") == "ada@example.com"
