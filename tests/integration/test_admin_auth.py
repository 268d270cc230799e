"""Only the admin writes the catalogue or reads personal data: `authorization: Bearer
<one of ADMIN_TOKENS>`, checked by the server bootstrap for the methods each service
declares; a refused call changes nothing; no token configured refuses them all."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pydantic import ValidationError

from coursesignup.enrollment.v1 import enrollment_pb2 as pb
from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.notifier.v1 import notifier_pb2, notifier_pb2_grpc
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs.config import CommonSettings
from services.notifier.bootstrap import build_hooks as notifier_hooks
from services.notifier.settings import NotifierSettings
from services.stats.bootstrap import build_hooks as stats_hooks
from services.stats.settings import StatsSettings
from tests import helpers

OLD = "old-admin-token-0123456789"
NEW = "new-admin-token-9876543210"


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def refusal(call, request, metadata) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as raised:
        result = call(request, metadata=metadata, timeout=10)
        if not hasattr(result, "ByteSize"):  # a server stream fails when read
            list(result)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, raised.value
    return raised.value


def reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            assert info.domain == "coursesignup"
            return info.reason
    raise AssertionError("no ErrorInfo")


@pytest.fixture
def enrollment(kinesis_env, monkeypatch, tmp_path):
    monkeypatch.setenv("ADMIN_TOKENS", f"{OLD}, {NEW}")  # rotating: both accepted
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}") as target, \
            grpc.insecure_channel(target) as channel:
        yield enrollment_pb2_grpc.EnrollmentServiceStub(channel)


def catalogue(stub) -> tuple:  # type: ignore[no-untyped-def]
    return (tuple(stub.ListCampuses(pb.ListCampusesRequest()).campuses),
            tuple(stub.ListCourses(pb.ListCoursesRequest()).courses))


def test_catalogue_writes_and_the_export_need_a_current_admin_token_and_refusals_change_nothing(enrollment):
    stub = enrollment
    stub.CreateCampus(pb.CreateCampusRequest(campus=pb.Campus(campus_id="a", name="A")), metadata=bearer(OLD))
    stub.CreateCourse(pb.CreateCourseRequest(course=pb.Course(course_id="a1", campus_id="a", name="A1",
                                                              capacity=5)), metadata=bearer(NEW))
    before = catalogue(stub)
    guarded = [
        (stub.CreateCampus, pb.CreateCampusRequest(campus=pb.Campus(campus_id="b", name="B"))),
        (stub.CreateCourse, pb.CreateCourseRequest(course=pb.Course(course_id="a2", campus_id="a", name="A2",
                                                                    capacity=5))),
        (stub.UpdateCourse, pb.UpdateCourseRequest(course=pb.Course(course_id="a1", capacity=500),
                                                   update_mask=["capacity"])),
        (stub.ExportEnrollments, pb.ExportEnrollmentsRequest()),
    ]
    for call, request in guarded:
        for metadata, expected in (([], "ADMIN_TOKEN_REQUIRED"),
                                   (bearer("not-a-token-of-this-service"), "ADMIN_TOKEN_INVALID"),
                                   (bearer(OLD + "x"), "ADMIN_TOKEN_INVALID"),
                                   ([("authorization", OLD)], "ADMIN_TOKEN_REQUIRED"),
                                   ([("authorization", f"Basic {OLD}")], "ADMIN_TOKEN_REQUIRED")):
            error = refusal(call, request, metadata)
            assert reason(error) == expected
            assert OLD not in (error.details() or "")
    assert catalogue(stub) == before  # nothing a refused call asked for happened

    stub.UpdateCourse(pb.UpdateCourseRequest(course=pb.Course(course_id="a1", capacity=7), update_mask=["capacity"]),
                      metadata=bearer(NEW))
    assert list(stub.ExportEnrollments(pb.ExportEnrollmentsRequest(), metadata=bearer(OLD)))[-1].total_size == 0
    # Reads of the catalogue and decisions stay open.
    assert stub.GetCourse(pb.GetCourseRequest(course_id="a1")).capacity == 7
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetDecision(pb.GetDecisionRequest(registration_id="reg_unknown"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_with_no_admin_token_configured_the_admin_methods_are_refused(kinesis_env, monkeypatch, tmp_path):
    monkeypatch.delenv("ADMIN_TOKENS", raising=False)
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}") as target, \
            grpc.insecure_channel(target) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        error = refusal(stub.CreateCampus, pb.CreateCampusRequest(campus=pb.Campus(campus_id="a", name="A")),
                        helpers.ADMIN_METADATA)
        assert "ADMIN_TOKENS" in error.details()
        assert list(stub.ListCampuses(pb.ListCampusesRequest()).campuses) == []


def test_personal_data_reads_of_stats_and_the_notifier_need_the_token(kinesis_env, monkeypatch, tmp_path):
    monkeypatch.setenv("ADMIN_TOKENS", NEW)
    stats_port, notifier_port = helpers.free_port(), helpers.free_port()
    stats = StatsSettings(stats_port=stats_port, stats_database_url=f"sqlite:///{tmp_path / 'stats.db'}",
                          kinesis_shard_count=1)
    notifier = NotifierSettings(notifier_port=notifier_port, kinesis_shard_count=1,
                                notifier_database_url=f"sqlite:///{tmp_path / 'notifier.db'}")
    with helpers.serve_in_thread(stats_hooks(stats)), helpers.serve_in_thread(notifier_hooks(notifier)), \
            grpc.insecure_channel(f"127.0.0.1:{stats_port}") as stats_channel, \
            grpc.insecure_channel(f"127.0.0.1:{notifier_port}") as notifier_channel:
        stats_stub = stats_pb2_grpc.StatsServiceStub(stats_channel)
        notifier_stub = notifier_pb2_grpc.NotifierServiceStub(notifier_channel)
        roster = stats_pb2.ListEnrollmentsRequest(course_id="cs101")
        emails = notifier_pb2.ListNotificationsRequest(registration_id="reg_1")
        for call, request in ((stats_stub.ListEnrollments, roster), (notifier_stub.ListNotifications, emails)):
            assert reason(refusal(call, request, [])) == "ADMIN_TOKEN_REQUIRED"
            assert reason(refusal(call, request, bearer(OLD))) == "ADMIN_TOKEN_INVALID"
            call(request, metadata=bearer(NEW), timeout=10)
        # Aggregates stay open.
        stats_stub.GetCourseStats(stats_pb2.GetCourseStatsRequest(course_id="cs101"), timeout=10)
        notifier_stub.GetDeliveryStats(notifier_pb2.GetDeliveryStatsRequest(), timeout=10)


def test_a_short_admin_token_is_refused_at_start():
    with pytest.raises(ValidationError, match="at least 16 characters"):
        CommonSettings(admin_tokens="good-token-0123456789,short")
    assert CommonSettings(admin_tokens=f" {OLD} ,{NEW},").admin_token_list() == [OLD, NEW]
