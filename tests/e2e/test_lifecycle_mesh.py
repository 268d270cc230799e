"""The registration lifecycle end to end (issue 11): the four services as separate processes
over kinesalite and a real SMTP server, called with the generated Python stubs."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.type import date_pb2

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from tests import helpers
from tests.helpers import wait_until
from tests.mesh import Mesh, RecordingSmtpHandler, running_mesh, smtp_server

pytestmark = pytest.mark.e2e

BIRTHS = {"first": dt.date(1980, 1, 1), "second": dt.date(1990, 1, 1), "third": dt.date(2000, 1, 1),
          "fourth": dt.date(2004, 1, 1)}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory,
         kinesis_endpoint: str) -> Iterator[tuple[Mesh, RecordingSmtpHandler]]:
    with smtp_server() as (smtp_port, handler):
        with running_mesh(tmp_path_factory.mktemp("lifecycle"), kinesis_endpoint, smtp_port) as running:
            yield running, handler


def _age(birth: dt.date) -> int:
    today = dt.datetime.now(dt.UTC).date()
    return today.year - birth.year - ((birth.month, birth.day) > (today.month, today.day))


def test_a_cancelled_seat_and_a_capacity_rise_go_to_the_waiting_list_in_order_with_stats_and_emails(mesh):
    running, smtp = mesh
    channels = {name: grpc.insecure_channel(running.target(name)) for name in ("registration", "enrollment", "stats")}
    registration = registration_pb2_grpc.RegistrationServiceStub(channels["registration"])
    enrollment = enrollment_pb2_grpc.EnrollmentServiceStub(channels["enrollment"])
    stats = stats_pb2_grpc.StatsServiceStub(channels["stats"])
    try:
        enrollment.CreateCampus(enrollment_pb2.CreateCampusRequest(
            campus=enrollment_pb2.Campus(campus_id="life", name="Lifecycle")), metadata=helpers.ADMIN_METADATA)
        enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
            course=enrollment_pb2.Course(course_id="wl101", campus_id="life", name="Waiting Lists", capacity=2)),
            metadata=helpers.ADMIN_METADATA)

        def register(who: str, locale: str = "en") -> str:
            birth = BIRTHS.get(who, dt.date(1995, 5, 5))
            reply = registration.Register(R.RegisterRequest(
                name=who.title(), email=f"{who}@example.com", course_id="wl101", locale=locale, join_waitlist=True,
                birth_date=date_pb2.Date(year=birth.year, month=birth.month, day=birth.day)), timeout=10)
            return str(reply.registration_id)

        def status(registration_id: str) -> R.Registration:
            return registration.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id), timeout=5)

        def becomes(registration_id: str, wanted: int, position: int = 0) -> R.Registration:
            return wait_until(lambda: (r := status(registration_id)).status == wanted
                              and r.waitlist_position == position and r, 60,
                              f"{R.RegistrationStatus.Name(wanted)} at {position} for {registration_id}")

        ids = {}
        for who in ("first", "second"):
            ids[who] = register(who)
            becomes(ids[who], R.REGISTRATION_STATUS_ENROLLED)
        ids["third"] = register("third", "pt-BR")
        becomes(ids["third"], R.REGISTRATION_STATUS_WAITLISTED, 1)
        ids["fourth"] = register("fourth")
        becomes(ids["fourth"], R.REGISTRATION_STATUS_WAITLISTED, 2)
        course = enrollment.GetCourse(enrollment_pb2.GetCourseRequest(course_id="wl101"))
        assert (course.enrolled_count, course.waitlist_count) == (2, 2)

        def course_stats() -> Any:
            return stats.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id="wl101"), timeout=5)

        wait_until(lambda: course_stats().student_count == 2, what="2 students counted, the waiting ones not")

        answered = registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=ids["first"]),
                                                   timeout=10)
        assert answered.status == R.REGISTRATION_STATUS_ENROLLED
        becomes(ids["first"], R.REGISTRATION_STATUS_CANCELLED)
        promoted = becomes(ids["third"], R.REGISTRATION_STATUS_ENROLLED)
        assert promoted.course_id == "wl101" and promoted.HasField("create_time")
        becomes(ids["fourth"], R.REGISTRATION_STATUS_WAITLISTED, 1)
        expected = sorted(_age(BIRTHS[w]) for w in ("second", "third"))
        wait_until(lambda: (s := course_stats()).student_count == 2 and (s.min_age, s.max_age) == (
            expected[0], expected[-1]), what="the cancelled student out of the figures, the promoted one in")

        enrollment.UpdateCourse(enrollment_pb2.UpdateCourseRequest(
            course=enrollment_pb2.Course(course_id="wl101", capacity=3), update_mask=["capacity"]),
            metadata=helpers.ADMIN_METADATA)
        becomes(ids["fourth"], R.REGISTRATION_STATUS_ENROLLED)
        course = enrollment.GetCourse(enrollment_pb2.GetCourseRequest(course_id="wl101"))
        assert (course.capacity, course.enrolled_count, course.waitlist_count) == (3, 3, 0)
        wait_until(lambda: course_stats().student_count == 3, what="3 students counted")
        campus = stats.GetCampusStats(stats_pb2.GetCampusStatsRequest(campus_id="life"), timeout=5)
        assert campus.student_count == 3

        again = registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=ids["first"]),
                                                timeout=10)
        assert again.status == R.REGISTRATION_STATUS_CANCELLED

        # A marker behind them on the course's shard: once its emails are out, a duplicate
        # of any earlier one would have been sent too.
        marker = register("marker")
        becomes(marker, R.REGISTRATION_STATUS_WAITLISTED, 1)

        def mail() -> list[Any]:
            with smtp.lock:
                return [m for m in smtp.messages if m["To"].addresses[0].addr_spec.split("@")[0] in (*ids, "marker")]

        wait_until(lambda: Counter(m["To"].addresses[0].addr_spec for m in mail())["marker@example.com"] == 2,
                   what="the marker's received and waitlisted emails")
        kinds = Counter((m["To"].addresses[0].addr_spec.split("@")[0], m["X-Course-Signup-Kind"]) for m in mail())
        assert kinds == {
            ("first", "received"): 1, ("first", "enrolled"): 1, ("first", "cancelled"): 1,
            ("second", "received"): 1, ("second", "enrolled"): 1,
            ("third", "received"): 1, ("third", "waitlisted"): 1, ("third", "promoted"): 1,
            ("fourth", "received"): 1, ("fourth", "waitlisted"): 1, ("fourth", "promoted"): 1,
            ("marker", "received"): 1, ("marker", "waitlisted"): 1,
        }
        by_kind = {(m["To"].addresses[0].addr_spec.split("@")[0], m["X-Course-Signup-Kind"]): m for m in mail()}
        assert "(número 1)" in str(by_kind[("third", "waitlisted")]["Subject"])
        assert "(number 2)" in str(by_kind[("fourth", "waitlisted")]["Subject"])
    finally:
        for channel in channels.values():
            channel.close()
