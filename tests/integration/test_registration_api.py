"""Register queues typed commands on Kinesis: partitioned by course, one per accepted call."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from email_validator import EmailNotValidError, validate_email
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

import libs.kinesis as kinesis_module
from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from libs.envelope import decode_envelope
from libs.grpc_server import MAX_MESSAGE_BYTES
from libs.kinesis import kinesis_client
from services.enrollment.bootstrap import build_hooks as enrollment_hooks
from services.enrollment.settings import EnrollmentSettings
from services.registration.bootstrap import build_hooks as registration_hooks
from services.registration.domain.validation import normalize_email
from services.registration.settings import RegistrationSettings
from tests import helpers

# A field as large as a request may carry: the server refuses messages over MAX_MESSAGE_BYTES.
LARGEST_FIELD = MAX_MESSAGE_BYTES - 1024


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
        with helpers.serve_in_thread(registration_hooks(RegistrationSettings())):
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
            course=enrollment_pb2.Course(course_id="brand-new", campus_id="sp", name="New", capacity=1)),
                metadata=helpers.ADMIN_METADATA)
    assert registration.Register(request(1, "brand-new")).status == R.REGISTRATION_STATUS_PENDING
    with pytest.raises(grpc.RpcError) as error:
        registration.Register(request(1, "never-created"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_one_request_id_shared_by_24_different_sign_ups_makes_24_registrations_all_decided(services):
    """AIP-155: a request id deduplicates retries of one sign-up, never merges two."""
    registration, _ = services
    courses = ["cs101", "math201", "bio150", "hist120"]
    sign_ups = [R.RegisterRequest(name=f"Student {i}", email=f"shared{i}@example.com", course_id=courses[i % 4],
                                  birth_date=date_pb2.Date(year=1990, month=1 + i % 12, day=1), request_id="1")
                for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda r: registration.Register(r, timeout=30), sign_ups))
    ids = [reply.registration_id for reply in replies]
    assert len(set(ids)) == 24
    # A retry of one of them (same request id, same sign-up) is still that registration,
    # also when the address is spelled with another case in its domain.
    retry = R.RegisterRequest()
    retry.CopyFrom(sign_ups[5])
    retry.email = "shared5@EXAMPLE.com"
    assert registration.Register(retry, timeout=30).registration_id == ids[5]

    def decided() -> bool:
        statuses = [registration.GetRegistration(R.GetRegistrationRequest(registration_id=i), timeout=10).status
                    for i in ids]
        return all(status != R.REGISTRATION_STATUS_PENDING for status in statuses)

    helpers.wait_until(decided, timeout=60, what="all 24 sign-ups decided")
    statuses = {registration.GetRegistration(R.GetRegistrationRequest(registration_id=i), timeout=10).status
                for i in ids}
    assert statuses == {R.REGISTRATION_STATUS_ENROLLED}


def test_a_huge_email_is_refused_cheaply_with_invalid_argument(services):
    registration, _ = services
    # The largest address a request can carry (the server refuses bigger messages).
    huge = R.RegisterRequest(name="A", email="a" * LARGEST_FIELD + "@example.com", course_id="cs101",
                             birth_date=date_pb2.Date(year=1990, month=1, day=1))
    with pytest.raises(grpc.RpcError) as error:
        registration.Register(huge, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = error_details(error.value, error_details_pb2.BadRequest).field_violations
    assert [v.field for v in violations] == ["email"]


def test_oversized_fields_are_refused_by_length_before_any_validation_and_a_normal_call_goes_on(services,
                                                                                                  monkeypatch):
    """Every field is bounded before it is parsed: an address longer than 254 characters
    never reaches email_validator (its cost grows with the input, on the event loop),
    and a normal sign-up sent beside four of the largest (about 1 MiB: a 4 MB request is
    refused by the transport, RESOURCE_EXHAUSTED) is accepted."""
    registration, _ = services
    import services.registration.domain.validation as validation

    validated: list[int] = []
    original = validation.validate_email

    def counting_validate_email(address, **kwargs):
        validated.append(len(address))
        return original(address, **kwargs)

    monkeypatch.setattr(validation, "validate_email", counting_validate_email)

    def sign_up(**fields) -> R.RegisterRequest:
        values = dict(name="A", email="a@example.org", course_id="cs101", request_id="")
        values.update(fields)
        return R.RegisterRequest(birth_date=date_pb2.Date(year=1990, month=1, day=1), **values)

    def refused_fields(call) -> list[str]:
        with pytest.raises(grpc.RpcError) as error:
            call.result()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value
        return [v.field for v in error_details(error.value, error_details_pb2.BadRequest).field_violations]

    huge = [registration.Register.future(sign_up(email="a" * LARGEST_FIELD + "@example.com"), timeout=30)
            for _ in range(4)]
    too_big = registration.Register.future(sign_up(email="a" * 4_000_000 + "@example.com"), timeout=30)
    normal = registration.Register.future(sign_up(email="normal@example.org"), timeout=30)
    assert normal.result().status == R.REGISTRATION_STATUS_PENDING
    assert [refused_fields(call) for call in huge] == [["email"]] * 4
    with pytest.raises(grpc.RpcError) as transport_refusal:
        too_big.result()
    assert transport_refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for oversized, field in [(dict(email="b" * 250 + "@example.com"), "email"),
                             (dict(name="N" * LARGEST_FIELD), "name"),
                             (dict(course_id="c" * LARGEST_FIELD), "course_id"),
                             (dict(request_id="r" * LARGEST_FIELD), "request_id"),
                             (dict(locale="l" * LARGEST_FIELD), "locale")]:
        assert refused_fields(registration.Register.future(sign_up(**oversized), timeout=30)) == [field]
    # Only the normal address was ever looked at by email_validator (the fast path may
    # have skipped even that one): nothing over 254 characters.
    assert all(length <= 254 for length in validated), validated


def error_details(error: grpc.RpcError, kind):
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            message = kind()
            detail.Unpack(message)
            return message
    raise AssertionError(f"no {kind.DESCRIPTOR.name} in {status}")


@pytest.mark.parametrize("address", [
    "ada@example.com", "Ada.Lovelace+course@Example.COM", "ada@EXAMPLE.com", "Postmaster@example.com",
    "a..b@example.com", ".ada@example.com", "ada@example", "ada@localhost", "ada@example..com",
    "\"quoted\"@example.com", "Ada <ada@example.com>", "ådå@example.com", "ada@exämple.com", "ada@xn--exmple-cua.com",
    "a" * 64 + "@example.com", "a" * 65 + "@example.com", "ada@" + "b" * 63 + ".com",
    "x" * 60 + "@" + ".".join(["c" * 60] * 3) + ".com", "ada@@example.com", "@example.com", "ada@",
])
def test_the_email_fast_path_normalizes_exactly_like_email_validator(address):
    def reference(value: str) -> str:
        try:
            return validate_email(value, check_deliverability=False).normalized
        except EmailNotValidError:
            return "invalid"

    def ours(value: str) -> str:
        try:
            return normalize_email(value)
        except EmailNotValidError:
            return "invalid"

    # Twice each: the first call may teach the fast path the domain, the second uses it.
    assert ours(address) == reference(address)
    assert ours(address) == reference(address)
    for local in ("plain", "Postmaster", "a..b", "ådå", "a" * 65):
        other = f"{local}@{address.rpartition('@')[2]}"
        assert ours(other) == reference(other), other


def test_register_beyond_the_admission_limit_is_resource_exhausted_with_retry_info(kinesis_env, tmp_path,
                                                                                   monkeypatch):
    """In-flight Register calls over REGISTER_MAX_PENDING get RESOURCE_EXHAUSTED at once, not refused streams."""
    enrollment_port, registration_port = helpers.free_port(), helpers.free_port()
    monkeypatch.setenv("ENROLLMENT_PORT", str(enrollment_port))
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", f"sqlite:///{tmp_path / 'enrollment.db'}")
    monkeypatch.setenv("SEED_DEMO_CATALOGUE", "true")
    monkeypatch.setenv("REGISTRATION_PORT", str(registration_port))
    monkeypatch.setenv("ENROLLMENT_TARGET", f"127.0.0.1:{enrollment_port}")
    monkeypatch.setenv("REGISTER_MAX_PENDING", "4")
    monkeypatch.setenv("REGISTER_RETRY_DELAY_MILLIS", "750")
    # Each PutRecords is held until the test lets it go, so the calls stay in flight.
    gate = threading.Event()
    original = kinesis_module.put_records_once

    def held_put_records(*args):
        gate.wait(30)
        return original(*args)

    monkeypatch.setattr(kinesis_module, "put_records_once", held_put_records)
    # A record is queued only by a call already counted in progress: once four are
    # queued the four held calls are all in, and no probe can overtake one of them.
    queued: list[bytes] = []
    original_put = kinesis_module.RecordBatcher.put

    def counted_put(self, data, partition_key, **options):
        queued.append(data)
        return original_put(self, data, partition_key, **options)

    monkeypatch.setattr(kinesis_module.RecordBatcher, "put", counted_put)
    with helpers.serve_in_thread(enrollment_hooks(EnrollmentSettings())):
        with helpers.serve_in_thread(registration_hooks(RegistrationSettings())):
            with grpc.insecure_channel(f"127.0.0.1:{registration_port}") as channel:
                registration = registration_pb2_grpc.RegistrationServiceStub(channel)
                held = [registration.Register.future(request(i, "cs101"), timeout=30) for i in range(4)]
                helpers.wait_until(lambda: len(queued) == 4, timeout=20, what="the 4 held calls in progress")
                refused = []
                try:
                    helpers.wait_until(lambda: len(refused) < 20 and _refused_one(registration, refused),
                                       timeout=20, what="a RESOURCE_EXHAUSTED", interval=0.05)
                except AssertionError as error:
                    raise AssertionError(f"{error}; the calls got {[(e.code(), e.details()) for e in refused]}, "
                                         f"the held ones {[f.exception() for f in held if f.done()]}") from None
                finally:
                    gate.set()
                assert all(f.result().status == R.REGISTRATION_STATUS_PENDING for f in held)
                error = refused[-1]
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                retry = error_details(error, error_details_pb2.RetryInfo)
                assert retry.retry_delay.ToMilliseconds() == 750
                # Once the calls in flight are answered, Register accepts again.
                assert registration.Register(request(99, "cs101"), timeout=10).status == \
                    R.REGISTRATION_STATUS_PENDING


def _refused_one(registration, refused: list) -> bool:
    try:
        registration.Register(request(50 + len(refused), "cs101"), timeout=10)
    except grpc.RpcError as error:
        refused.append(error)
        return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    return False
