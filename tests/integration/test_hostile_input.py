"""Input that looks ordinary, or is forged, gets INVALID_ARGUMENT or NOT_FOUND, never
INTERNAL: filters, page tokens and ids, through the real servers on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os

import grpc
import pytest
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs.pagination import encode_token
from services.registration.bootstrap import build_hooks as registration_hooks
from services.registration.settings import RegistrationSettings
from services.stats.bootstrap import build_hooks as stats_hooks
from services.stats.settings import StatsSettings
from tests import helpers

STATS_TOKEN_SECRET = "a-secret-the-test-knows"
# Keys a forger signs into a token (with a leaked key):
# each reached the database and failed there (psycopg DataError on NUL, the drivers'
# UnicodeEncodeError on a lone surrogate, SQLite's OverflowError beyond 64 bits).
FORGED_TEXT_KEYS = ["cs\x00101", "cs\ud800101", "\x00"]


def refused(call, request, *codes: grpc.StatusCode) -> tuple[grpc.StatusCode, set[str]]:
    with pytest.raises(grpc.RpcError) as raised:
        call(request, timeout=10, metadata=helpers.ADMIN_METADATA)
    error = raised.value
    assert error.code() in (codes or (grpc.StatusCode.INVALID_ARGUMENT,)), (error.code(), error.details())
    fields: set[str] = set()
    status = rpc_status.from_call(error)
    for detail in status.details if status else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    return error.code(), fields


@pytest.fixture
def enrollment(kinesis_env, database_url):
    with helpers.serve_enrollment(database_url) as address:
        with grpc.insecure_channel(address) as channel:
            yield enrollment_pb2_grpc.EnrollmentServiceStub(channel), address


@pytest.fixture
def stats(kinesis_env, database_url):
    settings = StatsSettings(stats_port=helpers.free_port(), stats_database_url=database_url,
                             kinesis_shard_count=1, stats_page_token_secret=STATS_TOKEN_SECRET)
    with helpers.serve_in_thread(stats_hooks(settings)):
        with grpc.insecure_channel(f"127.0.0.1:{settings.stats_port}") as channel:
            yield stats_pb2_grpc.StatsServiceStub(channel)


def test_decision_look_ups_with_a_nul_or_control_character_are_invalid_argument(enrollment):
    stub, _ = enrollment
    for registration_id in ["reg_\x00", "\x00", "reg_a\x1fb"]:
        request = enrollment_pb2.GetDecisionRequest(registration_id=registration_id)
        assert refused(stub.GetDecision, request) == (grpc.StatusCode.INVALID_ARGUMENT, {"registration_id"})
    # A marker: an ordinary unknown id is still NOT_FOUND.
    assert refused(stub.GetDecision, enrollment_pb2.GetDecisionRequest(registration_id="reg_unknown"),
                   grpc.StatusCode.NOT_FOUND)[0] == grpc.StatusCode.NOT_FOUND


def test_forged_catalogue_page_tokens_are_invalid_argument(enrollment):
    stub, _ = enrollment
    stub.CreateCampus(enrollment_pb2.CreateCampusRequest(campus=enrollment_pb2.Campus(campus_id="sp", name="SP")),
        metadata=helpers.ADMIN_METADATA)
    leaked = os.environ["ENROLLMENT_PAGE_TOKEN_SECRET"].encode()  # the service's own key (tests/conftest.py)
    for key in FORGED_TEXT_KEYS:
        campuses = enrollment_pb2.ListCampusesRequest(page_token=encode_token(key, {"method": "ListCampuses"}, leaked))
        assert refused(stub.ListCampuses, campuses) == (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
        courses = enrollment_pb2.ListCoursesRequest(
            page_token=encode_token(key, {"method": "ListCourses", "campus_id": ""}, leaked))
        assert refused(stub.ListCourses, courses) == (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
    # A well-formed token signed with the key earlier versions had in the source.
    old = encode_token("a", {"method": "ListCampuses"}, b"course-signup-page-token-v1")
    assert refused(stub.ListCampuses, enrollment_pb2.ListCampusesRequest(page_token=old)) == \
        (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
    # A token nesting JSON deeper than the parser's stack.
    deep = encode_token("[" * 100_000, {"method": "ListCampuses"}, leaked)
    assert refused(stub.ListCampuses, enrollment_pb2.ListCampusesRequest(page_token=deep)) == \
        (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
    # The genuine first page still answers.
    assert [c.campus_id for c in stub.ListCampuses(enrollment_pb2.ListCampusesRequest()).campuses] == ["sp"]


def test_a_filter_timestamp_beyond_the_calendar_is_invalid_argument(stats):
    for moment in ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"]:
        request = stats_pb2.ListEnrollmentsRequest(course_id="cs101", filter=f'enroll_time > "{moment}"')
        assert refused(stats.ListEnrollments, request) == (grpc.StatusCode.INVALID_ARGUMENT, {"filter"})
    ordinary = stats_pb2.ListEnrollmentsRequest(course_id="cs101", filter='enroll_time > "9999-12-31T23:59:59Z"')
    assert list(stats.ListEnrollments(ordinary, timeout=10, metadata=helpers.ADMIN_METADATA).enrollments) == []


def test_forged_stats_page_tokens_are_invalid_argument(stats):
    key = STATS_TOKEN_SECRET.encode()

    def roster_token(after: object, as_of: str = "2026-01-01") -> str:
        query = {"method": "ListEnrollments", "course_id": "cs101", "filter": "", "order_by": "", "as_of": ""}
        return encode_token(json.dumps({"after": after, "as_of": as_of}), query, key)

    def course_stats_token(after: object, order_by: str) -> str:
        query = {"method": "QueryCourseStats", "filter": "", "order_by": order_by, "as_of": ""}
        return encode_token(json.dumps({"after": after, "as_of": "2026-01-01"}), query, key)

    for after in FORGED_TEXT_KEYS:
        request = stats_pb2.ListEnrollmentsRequest(course_id="cs101", page_token=roster_token(after))
        assert refused(stats.ListEnrollments, request) == (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
        request_stats = stats_pb2.QueryCourseStatsRequest(page_token=course_stats_token([after], ""))
        assert refused(stats.QueryCourseStats, request_stats) == (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
    for after in ([10**30, "cs101"], [-(2**63) - 1, "cs101"], [float("inf"), "cs101"]):
        order_by = "average_age" if isinstance(after[0], float) else "student_count"
        request_stats = stats_pb2.QueryCourseStatsRequest(order_by=order_by,
                                                          page_token=course_stats_token(after, order_by))
        assert refused(stats.QueryCourseStats, request_stats) == (grpc.StatusCode.INVALID_ARGUMENT, {"page_token"})
    # Beside them, a genuine first page answers.
    assert list(stats.QueryCourseStats(stats_pb2.QueryCourseStatsRequest(), timeout=10).course_stats) == []


def test_an_issued_registration_id_in_upper_case_answers_its_decision_not_pending(enrollment, monkeypatch):
    enrollment_stub, address = enrollment
    enrollment_stub.CreateCampus(enrollment_pb2.CreateCampusRequest(
        campus=enrollment_pb2.Campus(campus_id="sp", name="SP")), metadata=helpers.ADMIN_METADATA)
    enrollment_stub.CreateCourse(enrollment_pb2.CreateCourseRequest(
        course=enrollment_pb2.Course(course_id="cs101", campus_id="sp", name="CS", capacity=5)),
            metadata=helpers.ADMIN_METADATA)
    port = helpers.free_port()
    monkeypatch.setenv("REGISTRATION_PORT", str(port))
    monkeypatch.setenv("ENROLLMENT_TARGET", address)
    monkeypatch.setenv("KINESIS_SHARD_COUNT", "1")
    with helpers.serve_in_thread(registration_hooks(RegistrationSettings())):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = registration_pb2_grpc.RegistrationServiceStub(channel)
            issued = stub.Register(registration_pb2.RegisterRequest(
                name="Ada", email="ada@example.com", course_id="cs101",
                birth_date=date_pb2.Date(year=1990, month=1, day=1)), timeout=30).registration_id

            def status(registration_id: str) -> registration_pb2.Registration:
                request = registration_pb2.GetRegistrationRequest(registration_id=registration_id)
                return stub.GetRegistration(request, timeout=10)

            helpers.wait_until(lambda: status(issued).status == registration_pb2.REGISTRATION_STATUS_ENROLLED,
                               timeout=60, what="the sign-up decided")
            body_upper = issued[:4] + issued[4:].upper()
            for spelling in (issued.upper(), body_upper, f"  {body_upper} "):
                answer = status(spelling)
                assert (answer.registration_id, answer.status) == \
                    (issued, registration_pb2.REGISTRATION_STATUS_ENROLLED), spelling
            for garbage in (issued[:-1] + "\x00", "reg_\x00"):
                assert refused(stub.GetRegistration, registration_pb2.GetRegistrationRequest(
                    registration_id=garbage)) == (grpc.StatusCode.INVALID_ARGUMENT, {"registration_id"})
