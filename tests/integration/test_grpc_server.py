"""What the one server bootstrap gives every service: reflection v1 and v1alpha for real
clients, clear statuses for requests that are not the method's message, unimplemented
methods and oversized requests."""

from __future__ import annotations

import json
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from libs.grpc_server import MAX_MESSAGE_BYTES
from tests import helpers

LIST_COURSES = "/coursesignup.enrollment.v1.EnrollmentService/ListCourses"


@pytest.fixture
def enrollment(kinesis_env, tmp_path):
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}", seed_demo_catalogue=True) as target:
        yield target


def _raw(target: str, method: str, data: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.RpcError) as raised:
            call(data, timeout=10)
    return raised.value


def test_buf_curl_finds_the_api_with_reflection_v1_and_grpcurl_with_v1alpha(enrollment):
    buf = helpers.ROOT / "node_modules" / ".bin" / "buf"
    answer = subprocess.run(
        [str(buf), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1",
         f"http://{enrollment}{LIST_COURSES}"],
        capture_output=True, text=True, timeout=60, check=False)
    assert answer.returncode == 0, answer.stderr
    assert {course["courseId"] for course in json.loads(answer.stdout)["courses"]} >= {"art110"}

    grpcurl = helpers.ROOT / ".venv" / "bin" / "grpcurl"
    listed = subprocess.run([str(grpcurl), "-plaintext", enrollment, "list"], capture_output=True, text=True,
                            timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"coursesignup.enrollment.v1.EnrollmentService", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= services
    described = subprocess.run([str(grpcurl), "-plaintext", enrollment, "describe",
                                "grpc.reflection.v1.ServerReflection"], capture_output=True, text=True,
                               timeout=60, check=False)
    assert described.returncode == 0, described.stderr
    assert "grpc.reflection.v1.ServerReflectionRequest" in described.stdout


def test_bytes_that_are_not_the_request_message_are_invalid_argument(enrollment):
    error = _raw(enrollment, LIST_COURSES, b"\xff\xff\xff\xff")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ListCourses request message" in error.details()
    # The service still answers a well-formed call.
    with grpc.insecure_channel(enrollment) as channel:
        call = channel.unary_unary(LIST_COURSES, request_serializer=bytes,
                                   response_deserializer=enrollment_pb2.ListCoursesResponse.FromString)
        assert call(b"", timeout=10).courses


def test_a_declared_method_the_server_does_not_implement_is_unimplemented_not_internal(enrollment):
    error = _raw(enrollment, "/grpc.health.v1.Health/List", b"")
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    with grpc.insecure_channel(enrollment) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=bytes,
                                    response_deserializer=health_pb2.HealthCheckResponse.FromString)
        assert check(b"", timeout=10).status == health_pb2.HealthCheckResponse.SERVING


def test_a_request_over_the_size_limit_is_refused_before_it_is_parsed(enrollment):
    oversized = enrollment_pb2.ListCoursesRequest(page_token="x" * (MAX_MESSAGE_BYTES + 1)).SerializeToString()
    assert _raw(enrollment, LIST_COURSES, oversized).code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_the_services_own_clients_retry_unavailable_with_the_shipped_service_config():
    """A server that answers UNAVAILABLE twice: a channel from libs.grpc_client gets the
    third answer; a plain channel gets the first."""
    from concurrent import futures

    from libs import grpc_client
    from libs.config import CommonSettings

    attempts = []

    def list_courses(request: bytes, context: grpc.ServicerContext) -> bytes:
        attempts.append(1)
        if len(attempts) % 3 != 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "coursesignup.enrollment.v1.EnrollmentService",
        {"ListCourses": grpc.unary_unary_rpc_method_handler(list_courses)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc_client.channel(f"127.0.0.1:{port}", CommonSettings()) as channel:
            stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
            assert list(stub.ListCourses(enrollment_pb2.ListCoursesRequest()).courses) == []
        assert len(attempts) == 3
        attempts.clear()
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_retries", 0)]) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                enrollment_pb2_grpc.EnrollmentServiceStub(channel).ListCourses(enrollment_pb2.ListCoursesRequest())
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert len(attempts) == 1
    finally:
        server.stop(0)


def test_with_log_calls_every_answered_call_is_one_line_without_the_request(kinesis_env, tmp_path, caplog):
    with helpers.serve_enrollment(f"sqlite:///{tmp_path / 'enrollment.db'}", seed_demo_catalogue=True,
                                  log_calls=True) as target, grpc.insecure_channel(target) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        with caplog.at_level("INFO", logger="libs.grpc_server"):
            stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id="cs101"), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id="nosuchcourse"), timeout=10)
            # A marker: once its line is in, the two calls before it were logged (or not).
            stub.ListCampuses(enrollment_pb2.ListCampusesRequest(), timeout=10)
            helpers.wait_until(lambda: any(getattr(r, "method", "").endswith("/ListCampuses")
                                           for r in caplog.records if r.message == "rpc"), 10, "the marker's line")
        calls = [(r.method.rsplit("/", 1)[-1], r.code) for r in caplog.records if r.message == "rpc"]
        assert calls == [("GetCourse", "OK"), ("GetCourse", "NOT_FOUND"), ("ListCampuses", "OK")]
        assert not any("cs101" in r.getMessage() or "nosuchcourse" in str(vars(r)) for r in caplog.records
                       if r.message == "rpc")


def test_without_log_calls_successful_calls_are_not_logged(enrollment, caplog):
    with grpc.insecure_channel(enrollment) as channel, caplog.at_level("INFO", logger="libs.grpc_server"):
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id="cs101"), timeout=10)
        with pytest.raises(grpc.RpcError):  # a marker that is logged either way
            stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id="nosuchcourse"), timeout=10)
        helpers.wait_until(lambda: any(r.message == "rpc rejected" for r in caplog.records), 10, "the rejection")
    assert not [r for r in caplog.records if r.message == "rpc"]
