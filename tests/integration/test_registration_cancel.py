"""CancelRegistration and the lifecycle statuses through the registration and enrollment
services (real servers, kinesalite): what each status answers, what is queued."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from libs.envelope import decode_envelope
from libs.kinesis import kinesis_client
from services.enrollment.bootstrap import build_hooks as enrollment_hooks
from services.enrollment.settings import EnrollmentSettings
from services.registration.bootstrap import build_hooks as registration_hooks
from services.registration.domain.registration_ids import RegistrationIds
from services.registration.settings import RegistrationSettings
from tests import helpers
from tests.integration.test_registration_api import read_stream


@pytest.fixture
def services(kinesis_env, tmp_path, monkeypatch):
    enrollment_port, registration_port = helpers.free_port(), helpers.free_port()
    monkeypatch.setenv("ENROLLMENT_PORT", str(enrollment_port))
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", f"sqlite:///{tmp_path / 'enrollment.db'}")
    monkeypatch.setenv("REGISTRATION_PORT", str(registration_port))
    monkeypatch.setenv("ENROLLMENT_TARGET", f"127.0.0.1:{enrollment_port}")
    monkeypatch.setenv("KINESIS_SHARD_COUNT", "1")
    with helpers.serve_in_thread(enrollment_hooks(EnrollmentSettings())):
        with grpc.insecure_channel(f"127.0.0.1:{enrollment_port}") as enrollment_channel:
            enrollment = enrollment_pb2_grpc.EnrollmentServiceStub(enrollment_channel)
            enrollment.CreateCampus(enrollment_pb2.CreateCampusRequest(
                campus=enrollment_pb2.Campus(campus_id="sp", name="SP")), metadata=helpers.ADMIN_METADATA)
            enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
                course=enrollment_pb2.Course(course_id="one", campus_id="sp", name="One Seat", capacity=1)),
                metadata=helpers.ADMIN_METADATA)
            with helpers.serve_in_thread(registration_hooks(RegistrationSettings())):
                with grpc.insecure_channel(f"127.0.0.1:{registration_port}") as channel:
                    yield registration_pb2_grpc.RegistrationServiceStub(channel), enrollment


def register(registration: Any, email: str, join_waitlist: bool = False) -> str:
    reply = registration.Register(R.RegisterRequest(
        name="Student", email=email, course_id="one", birth_date=date_pb2.Date(year=1999, month=9, day=9),
        join_waitlist=join_waitlist), timeout=10)
    return str(reply.registration_id)


def status(registration: Any, registration_id: str) -> R.Registration:
    return registration.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id), timeout=10)


def until(registration: Any, registration_id: str, wanted: int) -> R.Registration:
    return helpers.wait_until(lambda: (r := status(registration, registration_id)).status == wanted and r,
                              30, f"{R.RegistrationStatus.Name(wanted)} for {registration_id}")


def reason(error: grpc.RpcError) -> str:
    details = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert details is not None
    for detail in details.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def cancellations(kinesis_env: dict[str, str]) -> list[str]:
    records = read_stream(kinesis_client("us-east-1"), f"{kinesis_env['KINESIS_STREAM_PREFIX']}registrations")
    return [decode_envelope(r["Data"]).cancel_registration.registration_id for r in records
            if decode_envelope(r["Data"]).WhichOneof("body") == "cancel_registration"]


def test_cancellation_of_each_status_and_a_promotion_seen_through_get_registration(services, kinesis_env):
    registration, enrollment = services
    seated = register(registration, "seated@example.com")
    waiting = register(registration, "waiting@example.com", join_waitlist=True)
    declined = register(registration, "declined@example.com")
    assert until(registration, seated, R.REGISTRATION_STATUS_ENROLLED).course_id == "one"
    queued = until(registration, waiting, R.REGISTRATION_STATUS_WAITLISTED)
    assert (queued.waitlist_position, queued.course_id) == (1, "one")
    assert queued.HasField("create_time") and queued.HasField("decide_time")
    until(registration, declined, R.REGISTRATION_STATUS_DECLINED_FULL)
    assert enrollment.GetCourse(enrollment_pb2.GetCourseRequest(course_id="one")).waitlist_count == 1

    with pytest.raises(grpc.RpcError) as refused:
        registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=declined), timeout=10)
    assert (refused.value.code(), reason(refused.value)) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                             "REGISTRATION_NOT_ACTIVE")
    with pytest.raises(grpc.RpcError) as wrong_course:
        registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=seated, course_id="other"))
    assert wrong_course.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    answered = registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=seated), timeout=10)
    assert answered.status == R.REGISTRATION_STATUS_ENROLLED, "as known when the cancellation was queued"
    until(registration, seated, R.REGISTRATION_STATUS_CANCELLED)
    promoted = until(registration, waiting, R.REGISTRATION_STATUS_ENROLLED)
    assert promoted.waitlist_position == 0
    course = enrollment.GetCourse(enrollment_pb2.GetCourseRequest(course_id="one"))
    assert (course.enrolled_count, course.waitlist_count) == (1, 0)

    again = registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=seated), timeout=10)
    assert again.status == R.REGISTRATION_STATUS_CANCELLED
    assert cancellations(kinesis_env) == [seated], "cancelling a CANCELLED one queues nothing"


def test_a_pending_cancellation_needs_its_course_and_never_keeps_a_seat(services, kinesis_env):
    registration, enrollment = services
    # Issued (signed) but its sign-up never reached the stream: PENDING for ever.
    pending = RegistrationIds(RegistrationSettings().registration_id_secret).issue()
    assert status(registration, pending).status == R.REGISTRATION_STATUS_PENDING
    with pytest.raises(grpc.RpcError) as no_course:
        registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=pending), timeout=10)
    assert no_course.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as unknown_course:
        registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=pending, course_id="nope"))
    assert unknown_course.value.code() == grpc.StatusCode.NOT_FOUND

    answered = registration.CancelRegistration(
        R.CancelRegistrationRequest(registration_id=pending, course_id="one"), timeout=10)
    assert answered.status == R.REGISTRATION_STATUS_PENDING
    until(registration, pending, R.REGISTRATION_STATUS_CANCELLED)
    # A sign-up registered right after takes the one seat: the cancelled one kept none.
    after = register(registration, "after@example.com")
    until(registration, after, R.REGISTRATION_STATUS_ENROLLED)

    forged = pending[:-4] + ("aaaa" if not pending.endswith("aaaa") else "bbbb")
    with pytest.raises(grpc.RpcError) as never:
        registration.CancelRegistration(R.CancelRegistrationRequest(registration_id=forged, course_id="one"))
    assert never.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as malformed:
        registration.CancelRegistration(R.CancelRegistrationRequest(registration_id="reg_nonsense"))
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cancellations(kinesis_env) == [pending]


def test_list_registrations_needs_the_admin_token_and_finds_a_student_across_statuses(services):
    registration, enrollment = services
    enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
        course=enrollment_pb2.Course(course_id="two", campus_id="sp", name="Two", capacity=5)),
        metadata=helpers.ADMIN_METADATA)
    seated = register(registration, "ada@example.com")
    waiting = register(registration, "bob@example.com", join_waitlist=True)
    other = registration.Register(R.RegisterRequest(
        name="Ada Again", email="Ada@Example.com", course_id="two",
        birth_date=date_pb2.Date(year=1999, month=9, day=9)),
        timeout=10).registration_id
    until(registration, waiting, R.REGISTRATION_STATUS_WAITLISTED)
    until(registration, other, R.REGISTRATION_STATUS_ENROLLED)

    with pytest.raises(grpc.RpcError) as anonymous:
        registration.ListRegistrations(R.ListRegistrationsRequest(), timeout=10)
    assert (anonymous.value.code(), reason(anonymous.value)) == (grpc.StatusCode.UNAUTHENTICATED,
                                                                 "ADMIN_TOKEN_REQUIRED")

    def listed(filter_text: str, page_size: int = 0) -> list[R.ListedRegistration]:
        found, token = [], ""
        while True:
            page = registration.ListRegistrations(R.ListRegistrationsRequest(
                filter=filter_text, page_size=page_size, page_token=token), metadata=helpers.ADMIN_METADATA, timeout=10)
            found += page.registrations
            token = page.next_page_token
            if not token:
                return found

    ada = listed('email = "ada@example.com"', page_size=1)
    assert [(r.registration.registration_id, r.registration.course_id, r.name) for r in ada] == [
        (seated, "one", "Student"), (other, "two", "Ada Again")]
    [bob] = listed("status = WAITLISTED")
    assert (bob.registration.registration_id, bob.registration.waitlist_position, bob.email) == (
        waiting, 1, "bob@example.com")
    [enrolled] = listed('status = REGISTRATION_STATUS_ENROLLED AND course_id = "two"')
    assert enrolled.registration.registration_id == other

    with pytest.raises(grpc.RpcError) as bad_filter:
        registration.ListRegistrations(R.ListRegistrationsRequest(filter="status = SEATED"),
                                       metadata=helpers.ADMIN_METADATA, timeout=10)
    assert (bad_filter.value.code(), reason(bad_filter.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
    details = rpc_status.from_call(bad_filter.value)  # type: ignore[arg-type]
    violations = [v.field for d in details.details
                  if d.Unpack(bad := error_details_pb2.BadRequest()) for v in bad.field_violations]
    assert violations == ["filter"], "enrollment's BadRequest reaches the caller"
    with pytest.raises(grpc.RpcError) as bad_token:
        registration.ListRegistrations(R.ListRegistrationsRequest(page_token="forged"),
                                       metadata=helpers.ADMIN_METADATA, timeout=10)
    assert reason(bad_token.value) == "INVALID_PAGE_TOKEN"
