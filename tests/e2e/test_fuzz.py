"""Hostile input against every method of every running service (hypothesis, bounded).

The whole mesh runs as separate processes on PostgreSQL (where a NUL in text or an
integer beyond 64 bits once reached the driver and came back INTERNAL). Every request
is a well-formed message of the method's type whose fields hold hostile values: huge
and control-character strings, odd Unicode, extreme integers, unknown enum values,
impossible dates and times, garbage in nested messages; or a valid request with one
field made hostile (to get past the first check); or bytes that are not the message at
all. Calls go without credentials, with a wrong token or with the admin token.

What must hold: only documented codes come back (never UNKNOWN or INTERNAL), every
error carries a google.rpc.ErrorInfo, a refused catalogue write leaves the catalogue as
it was, a refused Register queues nothing (proved by marker sign-ups decided after it on
every course), and every service is still SERVING at the end.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import sqlalchemy
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coursesignup.enrollment.v1 import enrollment_pb2
from coursesignup.notifier.v1 import notifier_pb2
from coursesignup.registration.v1 import registration_pb2
from coursesignup.stats.v1 import stats_pb2
from tests import faults, helpers
from tests.helpers import wait_until as wait_for
from tests.mesh import running_mesh, smtp_server

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

FieldDescriptor = pb_descriptor.FieldDescriptor
SERVICES = {
    "registration": registration_pb2.DESCRIPTOR.services_by_name["RegistrationService"],
    "enrollment": enrollment_pb2.DESCRIPTOR.services_by_name["EnrollmentService"],
    "stats": stats_pb2.DESCRIPTOR.services_by_name["StatsService"],
    "notifier": notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"],
}
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
METHODS = [(name, service, method) for name, service in SERVICES.items() for method in service.methods] + \
    [(name, HEALTH, HEALTH.methods_by_name["Check"]) for name in SERVICES]
CATALOGUE_WRITES = {"CreateCampus", "CreateCourse", "UpdateCourse"}
# What a hostile request may get. RESOURCE_EXHAUSTED: a message over the 1 MiB limit.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
DEMO_COURSES = ["cs101", "math201", "art110", "bio150", "hist120"]

HOSTILE_TEXT = [
    "", " ", "\x00", "cs\x00101", "\x1b[2J", "\r\nBcc: victim@example.com", "\u202eexe.txt", "\u2028", "\x85",
    "\ufeff", "\ufffe", "\U0010ffff", "\ue000", "e\u0301" * 50, "\u200b", "' OR 1=1 --", '"; DROP TABLE x; --',
    "%s%n%x", "../../../etc/passwd", "${jndi:ldap://x}", "a" * 300, "é" * 5000, "x" * 200_000, "{" * 5000,
    "9" * 400, "-1", "NaN", "true", "null", "[]", "😀" * 100, "ada@example.com", "ADA@EXAMPLE.COM",
    "a@b", "@", "x@xn--bcher-kva.example", "josé@exemplo.com.br", "a" * 65 + "@example.com", "cs101", "art110",
    "sp", "rj", "reg_unknown", "status = ENROLLED", "enroll_time > \"9999-12-31T23:59:59-23:59\"",
    "average_age desc, course_id", "student_count >= 1 AND average_age > 20", "age > 200", "name = \"\\x00\"",
    "capacity", "name", "campus_id", "*", "en", "pt-BR", "PT_br", "zz",
]
INT32 = [0, 1, -1, 2, 7, 31, 12, 13, 29, 30, 366, 1000, 2**31 - 1, -(2**31), 9999, 10000, 1900, 1899, 2027]
INT64 = [*INT32, 2**63 - 1, -(2**63), 253402300800, -62135596801, 2**53 + 1]
UINT64 = [0, 1, 2**32 - 1, 2**64 - 1]


def text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(HOSTILE_TEXT), st.text(st.characters(exclude_categories=["Cs"]), max_size=40))


def scalar(field: Any) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if kind == FieldDescriptor.TYPE_DOUBLE else 32)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return st.one_of(st.sampled_from(INT64), st.integers(-(2**63), 2**63 - 1))
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.sampled_from(UINT64)
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.sampled_from([0, 1, 2**32 - 1])
    return st.one_of(st.sampled_from(INT32), st.integers(-(2**31), 2**31 - 1))


@st.composite
def message(draw: Callable[..., Any], descriptor: Any, depth: int = 0) -> Any:
    """A message of `descriptor`'s type with hostile values in a random subset of fields."""
    built = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        is_message = field.type == FieldDescriptor.TYPE_MESSAGE
        if is_message and depth >= 3:
            continue
        value = message(field.message_type, depth + 1) if is_message else scalar(field)
        if field.is_repeated:
            values = draw(st.lists(value, max_size=3))
            target = getattr(built, field.name)
            if is_message:
                for item in values:
                    target.add().CopyFrom(item)
            else:
                target.extend(values)
        elif is_message:
            getattr(built, field.name).CopyFrom(draw(value))
        else:
            setattr(built, field.name, draw(value))
    return built


def seeds() -> dict[str, Any]:
    """A valid request per method, to make hostile one field at a time."""
    birth = date_pb2.Date(year=2000, month=5, day=17)
    return {
        "Register": registration_pb2.RegisterRequest(name="Ada Lovelace", birth_date=birth, course_id="cs101",
                                                     email="ada@example.com", request_id="fuzz-1", locale="en"),
        "GetRegistration": registration_pb2.GetRegistrationRequest(registration_id="reg_unknown"),
        "CreateCampus": enrollment_pb2.CreateCampusRequest(campus=enrollment_pb2.Campus(campus_id="fz", name="Fuzz")),
        "CreateCourse": enrollment_pb2.CreateCourseRequest(course=enrollment_pb2.Course(
            course_id="fz1", campus_id="sp", name="Fuzzing", capacity=5)),
        "UpdateCourse": enrollment_pb2.UpdateCourseRequest(course=enrollment_pb2.Course(
            course_id="math201", name="Linear Algebra", capacity=60), update_mask=["capacity"]),
        "GetCourse": enrollment_pb2.GetCourseRequest(course_id="cs101"),
        "ListCourses": enrollment_pb2.ListCoursesRequest(campus_id="sp", page_size=2),
        "GetDecision": enrollment_pb2.GetDecisionRequest(registration_id="reg_unknown"),
        "GetCourseStats": stats_pb2.GetCourseStatsRequest(course_id="cs101"),
        "GetCampusStats": stats_pb2.GetCampusStatsRequest(campus_id="sp"),
        "QueryCourseStats": stats_pb2.QueryCourseStatsRequest(filter="student_count >= 0",
                                                              order_by="average_age desc", page_size=3),
        "ListEnrollments": stats_pb2.ListEnrollmentsRequest(course_id="cs101", filter="age > 1",
                                                            order_by="enroll_time desc", page_size=3),
        "ListNotifications": notifier_pb2.ListNotificationsRequest(registration_id="reg_unknown"),
    }


@st.composite
def request_for(draw: Callable[..., Any], method: Any) -> bytes:
    seed = seeds().get(method.name)
    how = draw(st.sampled_from(["one field", "one field", "random", "bytes"] if seed else ["random", "bytes"]))
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "random":
        return draw(message(method.input_type)).SerializeToString()
    assert seed is not None
    built = type(seed)()
    built.CopyFrom(seed)
    target, descriptor = built, method.input_type
    field = draw(st.sampled_from(list(descriptor.fields)))
    if field.type == FieldDescriptor.TYPE_MESSAGE and not field.is_repeated and draw(st.booleans()):
        target, descriptor = getattr(built, field.name), field.message_type  # one level down
        field = draw(st.sampled_from(list(descriptor.fields)))
    hostile = draw(message(descriptor))
    target.ClearField(field.name)
    if field.is_repeated:
        getattr(target, field.name).extend(getattr(hostile, field.name))
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(target, field.name).CopyFrom(getattr(hostile, field.name))
    else:
        setattr(target, field.name, getattr(hostile, field.name))
    return built.SerializeToString()


def catalogue(channel: grpc.Channel) -> tuple[list[bytes], list[bytes]]:
    """What catalogue writes decide: every campus, every course but its seat counters."""
    call = channel.unary_unary  # raw bytes: the comparison is of what the service says
    campuses = enrollment_pb2.ListCampusesResponse.FromString(call(
        "/coursesignup.enrollment.v1.EnrollmentService/ListCampuses")(
        enrollment_pb2.ListCampusesRequest(page_size=1000).SerializeToString(), timeout=30))
    courses = enrollment_pb2.ListCoursesResponse.FromString(call(
        "/coursesignup.enrollment.v1.EnrollmentService/ListCourses")(
        enrollment_pb2.ListCoursesRequest(page_size=1000).SerializeToString(), timeout=30))
    for course in courses.courses:  # the decider changes these on its own, as sign-ups are decided
        course.ClearField("enrolled_count")
        course.ClearField("waitlist_count")
    return ([c.SerializeToString(deterministic=True) for c in campuses.campuses],
            [c.SerializeToString(deterministic=True) for c in courses.courses])


def test_hostile_requests_to_every_method_get_documented_codes_and_change_nothing(tmp_path, kinesis_endpoint):
    app_name = f"fuzz{uuid.uuid4().hex[:8]}"
    with faults.postgres_databases(app_name) as urls, smtp_server(headers_only=True) as (smtp_port, _smtp), \
            running_mesh(tmp_path, kinesis_endpoint, smtp_port, database_urls=urls,
                         extra_env={"SEED_DEMO_CATALOGUE": "true"}) as mesh:
        channels = {name: grpc.insecure_channel(mesh.target(name), options=[
            ("grpc.max_send_message_length", 8 * 1024 * 1024)]) for name in SERVICES}
        accepted: set[str] = set()
        seen: dict[str, set[str]] = {}

        @settings(max_examples=600, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def one_call(data: st.DataObject) -> None:
            service_name, service, method = data.draw(st.sampled_from(METHODS), label="method")
            body = data.draw(request_for(method), label="request")
            metadata = data.draw(st.sampled_from([helpers.ADMIN_METADATA, helpers.ADMIN_METADATA, (),
                                                  (("authorization", "Bearer wrong-token-0123456789"),)]))
            channel = channels[service_name]
            write = method.name in CATALOGUE_WRITES
            before = catalogue(channels["enrollment"]) if write else None
            path = f"/{service.full_name}/{method.name}"
            code, details, reply = grpc.StatusCode.OK, None, b""
            try:
                if method.server_streaming:
                    for item in channel.unary_stream(path)(body, timeout=30, metadata=metadata):
                        reply = item
                else:
                    reply = channel.unary_unary(path)(body, timeout=30, metadata=metadata)
            except grpc.RpcError as error:
                code, details = error.code(), error
            seen.setdefault(method.name, set()).add(code.name)
            assert code in ALLOWED, (path, code, details and details.details(), body[:200])
            # The transport's own size limit, and grpc.health.v1 (the standard protocol, served
            # by grpcio-health-checking: NOT_FOUND for an unknown service) carry no details.
            message = (details.details() or "") if details is not None else ""
            transport = code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message
            if details is not None and not transport and service is not HEALTH:
                status = rpc_status.from_call(details)
                info = error_details_pb2.ErrorInfo()
                assert status is not None and any(d.Unpack(info) for d in status.details), (path, code)
                assert info.domain == "coursesignup" and info.reason, (path, code)
            if write and code != grpc.StatusCode.OK:
                assert catalogue(channels["enrollment"]) == before, (path, code, "a refused write changed it")
            if method.name == "Register" and code == grpc.StatusCode.OK:
                accepted.add(registration_pb2.RegisterResponse.FromString(reply).registration_id)

        one_call()
        print({name: sorted(codes) for name, codes in sorted(seen.items())}, "accepted", len(accepted))
        # Every method was reached, and most of them past their first check.
        assert {m.name for _, _, m in METHODS} <= set(seen), set(seen)

        # Every service still serves.
        for name in SERVICES:
            health = health_pb2_grpc.HealthStub(channels[name]).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING, name

        # Nothing refused was queued: every accepted sign-up is decided, then one marker per
        # course, ordered after anything sent earlier for that course, is decided too, and
        # the count is exactly accepted + markers.
        engine = sqlalchemy.create_engine(urls["enrollment"].replace("postgresql://", "postgresql+psycopg://", 1))

        def decided() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sqlalchemy.text("SELECT count(*) FROM decisions")).scalar_one())

        wait_for(lambda: decided() >= len(accepted), 60, "every accepted sign-up decided")
        courses = [enrollment_pb2.Course.FromString(c).course_id for c in catalogue(channels["enrollment"])[1]]
        assert set(DEMO_COURSES) <= set(courses)
        today = dt.date.today()
        markers = [faults.Applicant(f"Marker {i}", f"marker{i}@example.com", dt.date(today.year - 20, 1, 1),
                                    course, f"marker-{uuid.uuid4().hex}")
                   for i, course in enumerate(courses)]
        result = faults.register_all(mesh.target("registration"), markers)
        assert not result.failures, result.failures
        wait_for(lambda: decided() >= len(accepted) + len(markers), 60, "the markers decided")
        assert decided() == len(accepted) + len(markers)
        engine.dispose()
        for channel in channels.values():
            channel.close()
