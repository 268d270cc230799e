"""ExportEnrollments: every enrollment with its campus, paged by a signed cursor, only for
the admin (it carries personal data), with clear statuses, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import insert

from coursesignup.enrollment.v1 import enrollment_pb2 as pb
from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from libs.db import make_engine
from services.enrollment.adapters import tables
from tests import helpers

ADMIN_TOKEN = helpers.ADMIN_TOKEN  # one of ADMIN_TOKENS (tests/conftest.py)
ADMIN = list(helpers.ADMIN_METADATA)
CREATED = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.fixture
def enrollment(kinesis_env, database_url):
    with helpers.serve_enrollment(database_url) as target:
        with grpc.insecure_channel(target) as channel:
            yield enrollment_pb2_grpc.EnrollmentServiceStub(channel)


def write_enrollments(database_url: str, count: int) -> list[str]:
    """`count` enrollments over two campuses; their registration ids in export order."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(tables.campuses), [{"campus_id": c, "name": c, "create_time": CREATED}
                                                   for c in ("north", "south")])
            conn.execute(insert(tables.courses), [
                {"course_id": course, "campus_id": campus, "name": course, "capacity": 1000, "enrolled_count": 0,
                 "create_time": CREATED, "update_time": CREATED}
                for course, campus in (("cs101", "north"), ("bio1", "south"))
            ])
            if count:
                conn.execute(insert(tables.enrollments), [
                    {"course_id": "cs101" if n % 3 else "bio1", "email": f"s{n}@example.org",
                     "registration_id": f"reg-{(n * 7919) % 1000:04d}-{n}", "name": f"Student {n}",
                     "birth_date": date(2000, 2, 29) + timedelta(days=n), "enroll_time": CREATED + timedelta(seconds=n)}
                    for n in range(count)
                ])
    finally:
        engine.dispose()
    return sorted(f"reg-{(n * 7919) % 1000:04d}-{n}" for n in range(count))


def export(stub, page_size: int = 0, page_token: str = "", metadata=ADMIN) -> list[pb.ExportEnrollmentsResponse]:
    return list(stub.ExportEnrollments(pb.ExportEnrollmentsRequest(page_size=page_size, page_token=page_token),
                                       metadata=metadata))


def failure(stub, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        export(stub, **kwargs)
    return error.value


def test_the_export_streams_every_enrollment_with_its_campus_in_pages(enrollment, database_url):
    expected = write_enrollments(database_url, 23)
    pages = export(enrollment, page_size=5)

    assert [len(p.enrollments) for p in pages] == [5, 5, 5, 5, 3]
    assert [bool(p.next_page_token) for p in pages] == [True] * 4 + [False]
    assert {p.total_size for p in pages} == {23}
    exported = [e for p in pages for e in p.enrollments]
    assert [e.registration_id for e in exported] == expected
    first = next(e for e in exported if e.email == "s0@example.org")
    assert (first.course_id, first.campus_id, first.name) == ("bio1", "south", "Student 0")
    assert (first.birth_date.year, first.birth_date.month, first.birth_date.day) == (2000, 2, 29)
    assert first.enroll_time.ToDatetime(tzinfo=UTC) == CREATED
    assert {e.campus_id for e in exported if e.course_id == "cs101"} == {"north"}


def test_an_interrupted_export_resumes_after_the_last_page_received(enrollment, database_url):
    expected = write_enrollments(database_url, 12)
    first_two = export(enrollment, page_size=4)[:2]
    rest = export(enrollment, page_size=4, page_token=first_two[-1].next_page_token)
    assert [e.registration_id for p in first_two + rest for e in p.enrollments] == expected


def test_an_empty_export_is_one_empty_last_page(enrollment, database_url):
    write_enrollments(database_url, 0)
    (page,) = export(enrollment)
    assert (list(page.enrollments), page.next_page_token, page.total_size) == ([], "", 0)


def test_the_export_needs_the_admin_token(enrollment, database_url):
    write_enrollments(database_url, 3)
    assert failure(enrollment, metadata=()).code() == grpc.StatusCode.UNAUTHENTICATED
    assert failure(enrollment, metadata=[("authorization", ADMIN_TOKEN)]).code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = failure(enrollment, metadata=[("authorization", f"Bearer {ADMIN_TOKEN[:-1]}X")])
    assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ADMIN_TOKEN not in (wrong.details() or "")


@pytest.mark.parametrize("token", ["garbage", "c29tZXRoaW5nLWVsc2U"])
def test_a_bad_cursor_is_invalid_argument_naming_page_token(enrollment, database_url, token):
    write_enrollments(database_url, 3)
    error = failure(enrollment, page_token=token)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = error_details_pb2.BadRequest()
    assert rpc_status.from_call(error).details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["page_token"]


def test_a_token_of_another_listing_is_refused(enrollment, database_url):
    write_enrollments(database_url, 0)
    courses_token = enrollment.ListCourses(pb.ListCoursesRequest(page_size=1)).next_page_token
    assert courses_token
    assert failure(enrollment, page_token=courses_token).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_negative_page_size_is_invalid_argument(enrollment, database_url):
    assert failure(enrollment, page_size=-1).code() == grpc.StatusCode.INVALID_ARGUMENT
