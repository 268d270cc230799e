"""Register queues typed commands on Kinesis: partitioned by course, one per accepted call."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.type import date_pb2

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from libs.config import EnrollmentSettings
from libs.envelope import decode_envelope
from libs.kinesis import kinesis_client
from services.enrollment.bootstrap import build_hooks as enrollment_hooks
from services.registration.bootstrap import build_hooks as registration_hooks
from services.registration.settings import RegistrationServiceSettings
from tests import helpers


def read_stream(client, stream: str) -> list[dict]:
    records = []
    for shard in client.list_shards(StreamName=stream)["Shards"]:
        iterator = client.get_shard_iterator(StreamName=stream, ShardId=shard["ShardId"],
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while iterator:
            page = client.get_records(ShardIterator=iterator, Limit=1000)
            records += page["Records"]
            if not page["Records"]:
                break
            iterator = page.get("NextShardIterator")
    return records


@pytest.fixture
def services(kinesis_env, tmp_path, monkeypatch):
    enrollment_port, registration_port = helpers.free_port(), helpers.free_port()
    monkeypatch.setenv("ENROLLMENT_PORT", str(enrollment_port))
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", f"sqlite:///{tmp_path / 'enrollment.db'}")
    monkeypatch.setenv("SEED_DEMO_CATALOGUE", "true")
    monkeypatch.setenv("REGISTRATION_PORT", str(registration_port))
    monkeypatch.setenv("ENROLLMENT_TARGET", f"127.0.0.1:{enrollment_port}")
    monkeypatch.setenv("KINESIS_SHARD_COUNT", "2")
    with helpers.serve_in_thread(enrollment_hooks(EnrollmentSettings())):
        with helpers.serve_in_thread(registration_hooks(RegistrationServiceSettings())):
            with grpc.insecure_channel(f"127.0.0.1:{registration_port}") as channel:
                yield registration_pb2_grpc.RegistrationServiceStub(channel), enrollment_port


def request(i: int, course_id: str, request_id: str = "") -> R.RegisterRequest:
    return R.RegisterRequest(name=f"Student {i}", email=f"s{i}@example.com", course_id=course_id,
                             birth_date=date_pb2.Date(year=1990, month=1 + i % 12, day=1), request_id=request_id)


def test_concurrent_registers_each_put_one_record_keyed_by_course(services, kinesis_env):
    registration, _ = services
    courses = ["cs101", "math201", "bio150"]
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: registration.Register(request(i, courses[i % 3])), range(60)))
    assert len({r.registration_id for r in replies}) == 60

    client = kinesis_client("us-east-1")
    prefix = kinesis_env["KINESIS_STREAM_PREFIX"]
    commands = read_stream(client, f"{prefix}registrations")
    bodies = [decode_envelope(r["Data"]).register_student for r in commands]
    assert {b.registration_id for b in bodies} == {r.registration_id for r in replies}
    assert all(r["PartitionKey"] == decode_envelope(r["Data"]).register_student.course_id for r in commands)
    assert Counter(b.course_id for b in bodies) == {c: 20 for c in courses}
    # Exactly one record per sign-up; it carries what the notifier's "received" email needs.
    assert len(commands) == 60
    assert {b.course_name for b in bodies} == {"Introduction to Computer Science", "Linear Algebra", "Cell Biology"}


def test_a_course_created_after_start_is_accepted_and_unknown_ones_are_not_found(services):
    registration, enrollment_port = services
    with grpc.insecure_channel(f"127.0.0.1:{enrollment_port}") as channel:
        enrollment_pb2_grpc.EnrollmentServiceStub(channel).CreateCourse(enrollment_pb2.CreateCourseRequest(
            course=enrollment_pb2.Course(course_id="brand-new", campus_id="sp", name="New", capacity=1)))
    assert registration.Register(request(1, "brand-new")).status == R.REGISTRATION_STATUS_PENDING
    with pytest.raises(grpc.RpcError) as error:
        registration.Register(request(1, "never-created"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
