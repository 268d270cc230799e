"""The EnrollmentService catalogue API over gRPC, against SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from coursesignup.enrollment.v1 import enrollment_pb2 as pb
from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from services.enrollment.bootstrap import build_hooks
from services.enrollment.settings import EnrollmentSettings
from tests import helpers


@pytest.fixture
def enrollment(kinesis_env, database_url, monkeypatch):
    port = helpers.free_port()
    monkeypatch.setenv("ENROLLMENT_PORT", str(port))
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", database_url)
    monkeypatch.setenv("KINESIS_SHARD_COUNT", "1")
    with helpers.serve_in_thread(build_hooks(EnrollmentSettings())):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield enrollment_pb2_grpc.EnrollmentServiceStub(channel)


def violations(error: grpc.RpcError) -> set[str]:
    status = rpc_status.from_call(error)
    found = set()
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found |= {v.field for v in bad.field_violations}
    return found


def reason_of(error: grpc.RpcError) -> tuple[str, dict[str, str]]:
    """The google.rpc.ErrorInfo every error carries: its reason and metadata."""
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in rpc_status.from_call(error).details), error
    assert info.domain == "coursesignup"
    return info.reason, dict(info.metadata)


def code_of(call, *args) -> tuple[grpc.StatusCode, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, metadata=helpers.ADMIN_METADATA)
    return error.value.code(), error.value


def test_catalogue_round_trip_with_pages_and_clear_errors(enrollment):
    enrollment.CreateCampus(pb.CreateCampusRequest(campus=pb.Campus(campus_id="sp", name="São Paulo")),
                            metadata=helpers.ADMIN_METADATA)
    code, error = code_of(enrollment.CreateCampus, pb.CreateCampusRequest(campus=pb.Campus(campus_id="sp", name="x")))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(error) == ("CAMPUS_ALREADY_EXISTS", {"campus_id": "sp"})
    for i in range(5):
        created = enrollment.CreateCourse(pb.CreateCourseRequest(
            course=pb.Course(course_id=f"c{i}", campus_id="sp", name=f"Course {i}", capacity=10 + i)),
                metadata=helpers.ADMIN_METADATA)
        assert (created.capacity, created.enrolled_count) == (10 + i, 0)

    seen, token = [], ""
    while True:
        page = enrollment.ListCourses(pb.ListCoursesRequest(campus_id="sp", page_size=2, page_token=token))
        seen += [c.course_id for c in page.courses]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"c{i}" for i in range(5)]

    first = enrollment.ListCourses(pb.ListCoursesRequest(campus_id="sp", page_size=2))
    code, error = code_of(enrollment.ListCourses,
                          pb.ListCoursesRequest(campus_id="rj", page_size=2, page_token=first.next_page_token))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations(error) == {"page_token"}
    code, error = code_of(enrollment.ListCourses, pb.ListCoursesRequest(page_token="forged"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    code, error = code_of(enrollment.GetCourse, pb.GetCourseRequest(course_id="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reason_of(error) == ("COURSE_NOT_FOUND", {"course_id": "nope"})
    code, error = code_of(enrollment.CreateCourse, pb.CreateCourseRequest(
        course=pb.Course(course_id="c9", campus_id="ghost", name="x", capacity=1)))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reason_of(error) == ("CAMPUS_NOT_FOUND", {"campus_id": "ghost"})
    code, error = code_of(enrollment.CreateCourse, pb.CreateCourseRequest(
        course=pb.Course(course_id="c1", campus_id="sp", name="x", capacity=1)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert reason_of(error) == ("COURSE_ALREADY_EXISTS", {"course_id": "c1"})
    code, error = code_of(enrollment.UpdateCourse, pb.UpdateCourseRequest(
        course=pb.Course(course_id="nope", capacity=3), update_mask=["capacity"]))
    assert (code, reason_of(error)[0]) == (grpc.StatusCode.NOT_FOUND, "COURSE_NOT_FOUND")
    code, error = code_of(enrollment.CreateCourse, pb.CreateCourseRequest(
        course=pb.Course(course_id="Bad Id", campus_id="sp", name="", capacity=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(error) == {"course.course_id", "course.name", "course.capacity"}
    assert reason_of(error) == ("FIELD_INVALID", {"fields": "course.course_id,course.name,course.capacity"})
    # Names hold visible text only: no bidi override, line separator, NEL, zero-width space.
    for hidden in ("\u202e", "\u2028", "\x85", "\u200b", "\ufeff", "\ue000", "\ufdd0"):
        code, error = code_of(enrollment.CreateCourse, pb.CreateCourseRequest(
            course=pb.Course(course_id="c9", campus_id="sp", name=f"Evil{hidden}txt.exe", capacity=1)))
        assert (code, violations(error)) == (grpc.StatusCode.INVALID_ARGUMENT, {"course.name"}), repr(hidden)
    code, _ = code_of(enrollment.GetCourse, pb.GetCourseRequest(course_id="c9"))
    assert code == grpc.StatusCode.NOT_FOUND  # none of them created it
    # Stored in NFC, spaces collapsed; ZWJ (emoji sequences, Indic scripts) kept.
    created = enrollment.CreateCourse(pb.CreateCourseRequest(course=pb.Course(
        course_id="c9", campus_id="sp", name="  Cafe\u0301   \U0001F469\u200d\U0001F52C lab ", capacity=1)),
        metadata=helpers.ADMIN_METADATA)
    assert created.name == "Caf\u00e9 \U0001F469\u200d\U0001F52C lab"

    updated = enrollment.UpdateCourse(pb.UpdateCourseRequest(
        course=pb.Course(course_id="c0", capacity=99), update_mask=["capacity"]), metadata=helpers.ADMIN_METADATA)
    assert (updated.capacity, updated.name) == (99, "Course 0")
    code, error = code_of(enrollment.UpdateCourse, pb.UpdateCourseRequest(
        course=pb.Course(course_id="c0", campus_id="rj"), update_mask=["campus_id"]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and violations(error) == {"update_mask"}
    assert enrollment.GetCourse(pb.GetCourseRequest(course_id="c0")).campus_id == "sp"

    code, _ = code_of(enrollment.GetDecision, pb.GetDecisionRequest(registration_id="reg_unknown"))
    assert code == grpc.StatusCode.NOT_FOUND
