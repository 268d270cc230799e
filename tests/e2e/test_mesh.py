"""The four services as separate processes, end to end, over kinesalite and a real SMTP server."""

from __future__ import annotations

import datetime as dt
import signal
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from tests import helpers
from tests.helpers import wait_until
from tests.mesh import Mesh, RecordingSmtpHandler, running_mesh, smtp_server

pytestmark = pytest.mark.e2e

R = registration_pb2
FINAL = {R.REGISTRATION_STATUS_ENROLLED, R.REGISTRATION_STATUS_DECLINED_FULL, R.REGISTRATION_STATUS_DECLINED_DUPLICATE}


def age_on(birth: dt.date, today: dt.date) -> int:
    return today.year - birth.year - ((birth.month, birth.day) > (today.month, today.day))


def field_violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status details"
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, kinesis_endpoint: str
) -> Iterator[tuple[Mesh, RecordingSmtpHandler]]:
    with smtp_server() as (smtp_port, handler):
        with running_mesh(tmp_path_factory.mktemp("mesh"), kinesis_endpoint, smtp_port,
                          extra_env={"SEED_DEMO_CATALOGUE": "true"}) as running:
            yield running, handler


@pytest.fixture(scope="module")
def stubs(mesh: tuple[Mesh, RecordingSmtpHandler]) -> Iterator[dict[str, Any]]:
    running, _ = mesh
    channels = {name: grpc.insecure_channel(running.target(name)) for name in running.ports}
    yield {
        "registration": registration_pb2_grpc.RegistrationServiceStub(channels["registration"]),
        "enrollment": enrollment_pb2_grpc.EnrollmentServiceStub(channels["enrollment"]),
        "stats": stats_pb2_grpc.StatsServiceStub(channels["stats"]),
        "notifier": notifier_pb2_grpc.NotifierServiceStub(channels["notifier"]),
    }
    for channel in channels.values():
        channel.close()


def register(stub: Any, course_id: str, email: str, birth: dt.date, name: str = "Student", **extra: Any) -> str:
    reply = stub.Register(
        R.RegisterRequest(
            name=name, email=email, course_id=course_id,
            birth_date=date_pb2.Date(year=birth.year, month=birth.month, day=birth.day), **extra,
        ),
        timeout=10,
    )
    assert reply.status == R.REGISTRATION_STATUS_PENDING
    return str(reply.registration_id)


def final_status(stub: Any, registration_id: str, timeout: float = 60.0) -> Any:
    return wait_until(
        lambda: (r := stub.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id), timeout=5))
        .status in FINAL and r,
        timeout, f"a decision for {registration_id}",
    )


def test_a_full_course_enrolls_exactly_its_capacity_and_emails_everyone(mesh, stubs):
    _, smtp = mesh
    enrollment, registration, stats = stubs["enrollment"], stubs["registration"], stubs["stats"]
    enrollment.CreateCampus(enrollment_pb2.CreateCampusRequest(
        campus=enrollment_pb2.Campus(campus_id="e2e", name="End to End")), metadata=helpers.ADMIN_METADATA)
    enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
        course=enrollment_pb2.Course(course_id="tiny", campus_id="e2e", name="Tiny Seminar", capacity=3)),
            metadata=helpers.ADMIN_METADATA)

    births = {f"student{i}@example.com": dt.date(1980 + i * 2, 1 + i, 10 + i) for i in range(10)}
    with ThreadPoolExecutor(max_workers=10) as pool:
        ids = dict(zip(births, pool.map(lambda e: register(registration, "tiny", e, births[e]), births)))
    assert len(set(ids.values())) == 10

    decided = {email: final_status(registration, rid) for email, rid in ids.items()}
    outcomes = Counter(d.status for d in decided.values())
    assert outcomes == {R.REGISTRATION_STATUS_ENROLLED: 3, R.REGISTRATION_STATUS_DECLINED_FULL: 7}
    course = enrollment.GetCourse(enrollment_pb2.GetCourseRequest(course_id="tiny"))
    assert (course.capacity, course.enrolled_count) == (3, 3)

    today = dt.datetime.now(dt.UTC).date()
    ages = [age_on(births[e], today) for e, d in decided.items() if d.status == R.REGISTRATION_STATUS_ENROLLED]
    course_stats = wait_until(
        lambda: (s := stats.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id="tiny"))).student_count == 3
        and s, what="course stats to count 3 students",
    )
    assert (course_stats.min_age, course_stats.max_age) == (min(ages), max(ages))
    assert course_stats.average_age == pytest.approx(sum(ages) / 3)
    campus_stats = stats.GetCampusStats(stats_pb2.GetCampusStatsRequest(campus_id="e2e"))
    assert campus_stats.student_count == 3

    def ours() -> list[Any]:
        with smtp.lock:
            return [m for m in smtp.messages if m["To"].addresses[0].addr_spec in births]
    wait_until(lambda: len(ours()) >= 20, what="20 emails")
    # A marker sign-up for the same course travels the same shards behind the ten: once
    # both its emails are out, a duplicate of theirs would have been recorded and sent too.
    marker = "marker@example.com"
    register(registration, "tiny", marker, dt.date(1990, 1, 1))
    def marker_mail() -> list[Any]:
        with smtp.lock:
            return [m for m in smtp.messages if m["To"].addresses[0].addr_spec == marker]
    wait_until(lambda: len(marker_mail()) == 2, what="the marker's 2 emails")
    assert Counter(m["X-Course-Signup-Kind"] for m in ours()) == {"received": 10, "enrolled": 3, "declined-full": 7}
    per_recipient = Counter(m["To"].addresses[0].addr_spec for m in ours())
    assert set(per_recipient.values()) == {2}, per_recipient
    enrolled_emails = {e for e, d in decided.items() if d.status == R.REGISTRATION_STATUS_ENROLLED}
    enrolled_mail = {m["To"].addresses[0].addr_spec for m in ours() if m["X-Course-Signup-Kind"] == "enrolled"}
    assert enrolled_mail == enrolled_emails

    some_id = ids["student0@example.com"]
    log = stubs["notifier"].ListNotifications(notifier_pb2.ListNotificationsRequest(registration_id=some_id),
        metadata=helpers.ADMIN_METADATA)
    assert {n.status for n in log.notifications} == {notifier_pb2.DELIVERY_STATUS_SENT}
    assert len(log.notifications) == 2


def test_an_enrolled_email_registering_again_is_declined_as_duplicate(mesh, stubs):
    enrollment, registration = stubs["enrollment"], stubs["registration"]
    enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
        course=enrollment_pb2.Course(course_id="dup101", campus_id="e2e", name="Duplicates", capacity=10)),
            metadata=helpers.ADMIN_METADATA)
    first = register(registration, "dup101", "twice@example.com", dt.date(2000, 5, 5))
    assert final_status(registration, first).status == R.REGISTRATION_STATUS_ENROLLED
    again = register(registration, "dup101", "Twice@Example.com", dt.date(2000, 5, 5))
    assert final_status(registration, again).status == R.REGISTRATION_STATUS_DECLINED_DUPLICATE
    assert enrollment.GetCourse(enrollment_pb2.GetCourseRequest(course_id="dup101")).enrolled_count == 1


def test_a_retried_request_id_is_one_registration(mesh, stubs):
    registration = stubs["registration"]
    request_id = str(uuid.uuid4())
    first = register(registration, "dup101", "retry@example.com", dt.date(1999, 1, 1), request_id=request_id)
    second = register(registration, "dup101", "retry@example.com", dt.date(1999, 1, 1), request_id=request_id)
    assert first == second
    assert final_status(registration, first).status == R.REGISTRATION_STATUS_ENROLLED
    assert stubs["enrollment"].GetCourse(enrollment_pb2.GetCourseRequest(course_id="dup101")).enrolled_count == 2


def test_unknown_course_is_not_found_and_bad_input_names_the_field(mesh, stubs):
    registration = stubs["registration"]
    with pytest.raises(grpc.RpcError) as unknown:
        register(registration, "no-such-course", "x@example.com", dt.date(1990, 1, 1))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as bad_email:
        register(registration, "tiny", "not-an-email", dt.date(1990, 1, 1))
    assert bad_email.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(bad_email.value) == ["email"]

    with pytest.raises(grpc.RpcError) as bad_many:
        registration.Register(R.RegisterRequest(name=" ", course_id="tiny", email="ok@example.com",
                                                birth_date=date_pb2.Date(year=2999, month=1, day=1)))
    assert bad_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(bad_many.value)) == {"name", "birth_date"}


def test_registration_ids_tell_pending_from_never_issued_from_malformed(mesh, stubs):
    registration = stubs["registration"]
    real = register(registration, "dup101", "lookup@example.com", dt.date(1995, 3, 3))
    forged = real[:-4] + ("aaaa" if not real.endswith("aaaa") else "bbbb")
    with pytest.raises(grpc.RpcError) as never:
        registration.GetRegistration(R.GetRegistrationRequest(registration_id=forged))
    assert never.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as malformed:
        registration.GetRegistration(R.GetRegistrationRequest(registration_id="'; DROP TABLE decisions; --"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(malformed.value) == ["registration_id"]


def test_registrations_stay_pending_while_enrollment_is_down_and_are_decided_when_it_returns(mesh, stubs):
    running, _ = mesh
    registration = stubs["registration"]
    assert running.stop("enrollment") == 0  # SIGTERM: graceful, exit code 0
    try:
        queued = [register(registration, "dup101", f"while-down{i}@example.com", dt.date(1990, 1, 1))
                  for i in range(5)]
        for registration_id in queued:
            reply = registration.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id))
            assert reply.status == R.REGISTRATION_STATUS_PENDING
    finally:
        running.start("enrollment")
        running.wait_healthy(("enrollment",))
    assert {final_status(registration, rid).status for rid in queued} == {R.REGISTRATION_STATUS_ENROLLED}


def test_every_service_stops_cleanly_on_sigterm(mesh):
    running, _ = mesh
    # Runs last in this module: stop each service the way an orchestrator does.
    for service in ("registration", "stats", "notifier", "enrollment"):
        assert running.stop(service, signal.SIGTERM) == 0, running.log_tail(service)
