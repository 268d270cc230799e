"""CancelRegistration's and ListRegistrations' rules in the registration servicer, with
enrollment and the queue replaced by recorders: what is queued, with which partition key,
and what reaches the caller when enrollment fails."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from coursesignup.enrollment.v1 import enrollment_pb2
from coursesignup.registration.v1 import registration_pb2 as R
from libs.envelope import decode_envelope
from libs.errors import FailedPrecondition, InvalidArgument, RelayedError, Unavailable
from services.registration.domain.registration_ids import RegistrationIds
from services.registration.entrypoints.grpc_api import RegistrationServicer

IDS = RegistrationIds("unit-test-secret-0123456789")


class Context:
    def time_remaining(self) -> float:
        return 5.0

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer the-token"), ("x-other", "1"))


class Queue:
    def __init__(self) -> None:
        self.put_records: list[tuple[bytes, str]] = []

    def put(self, data: bytes, partition_key: str, timeout: float | None = None) -> asyncio.Future[None]:
        self.put_records.append((data, partition_key))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


class Enrollment:
    def __init__(self, answer: Any = None, error: grpc.aio.AioRpcError | None = None) -> None:
        self.answer, self.error = answer, error
        self.metadata: Any = None

    async def GetDecision(self, request: Any, timeout: float) -> Any:
        if self.error is not None:
            raise self.error
        if self.answer is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata())
        return self.answer

    async def ListDecisions(self, request: Any, timeout: float, metadata: Any) -> Any:
        self.metadata = metadata
        if self.error is not None:
            raise self.error
        return self.answer


class Catalogue:
    async def course(self, course_id: str, timeout: float) -> Any:
        return course_id


def servicer(enrollment: Enrollment, queue: Queue) -> RegistrationServicer:
    return RegistrationServicer(IDS, Catalogue(), enrollment, queue)  # type: ignore[arg-type]


def decision(outcome: int, course_id: str = "cs101") -> enrollment_pb2.Decision:
    return enrollment_pb2.Decision(registration_id="x", course_id=course_id, outcome=outcome,
                                   decide_time=timestamp_pb2.Timestamp(seconds=1))


def cancel(enrollment: Enrollment, queue: Queue, registration_id: str, course_id: str = "") -> Any:
    request = R.CancelRegistrationRequest(registration_id=registration_id, course_id=course_id)
    return asyncio.run(servicer(enrollment, queue).CancelRegistration(request, Context()))  # type: ignore[arg-type]


def test_an_active_registration_is_cancelled_on_its_courses_partition_and_answered_as_known():
    queue, registration_id = Queue(), IDS.issue()
    for outcome, status in ((enrollment_pb2.DECISION_OUTCOME_ENROLLED, R.REGISTRATION_STATUS_ENROLLED),
                            (enrollment_pb2.DECISION_OUTCOME_WAITLISTED, R.REGISTRATION_STATUS_WAITLISTED)):
        answered = cancel(Enrollment(decision(outcome)), queue, registration_id)
        assert (answered.status, answered.course_id) == (status, "cs101")
    assert [key for _, key in queue.put_records] == ["cs101", "cs101"]
    envelope = decode_envelope(queue.put_records[0][0])
    assert envelope.message_id == f"cancel_registration:{registration_id}", "redeliveries dedupe by id"
    assert (envelope.cancel_registration.registration_id, envelope.cancel_registration.course_id) == (
        registration_id, "cs101")


def test_cancelled_declined_pending_and_unreachable_registrations():
    queue, registration_id = Queue(), IDS.issue()
    again = cancel(Enrollment(decision(enrollment_pb2.DECISION_OUTCOME_CANCELLED)), queue, registration_id)
    assert again.status == R.REGISTRATION_STATUS_CANCELLED
    with pytest.raises(FailedPrecondition) as declined:
        cancel(Enrollment(decision(enrollment_pb2.DECISION_OUTCOME_DECLINED_FULL)), queue, registration_id)
    assert (declined.value.reason, declined.value.metadata["status"]) == (
        "REGISTRATION_NOT_ACTIVE", "REGISTRATION_STATUS_DECLINED_FULL")
    with pytest.raises(InvalidArgument) as wrong_course:
        cancel(Enrollment(decision(enrollment_pb2.DECISION_OUTCOME_ENROLLED)), queue, registration_id, "math201")
    assert wrong_course.value.metadata["fields"] == "course_id"
    with pytest.raises(InvalidArgument) as no_course:
        cancel(Enrollment(), queue, registration_id)
    assert no_course.value.metadata["fields"] == "course_id"
    unreachable = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
    with pytest.raises(Unavailable) as down:
        cancel(Enrollment(error=unreachable), queue, registration_id, "cs101")
    assert down.value.reason == "ENROLLMENT_UNAVAILABLE"
    assert queue.put_records == [], "nothing queued by any of these"

    pending = cancel(Enrollment(), queue, registration_id, "cs101")
    assert pending.status == R.REGISTRATION_STATUS_PENDING
    assert [key for _, key in queue.put_records] == ["cs101"]


def test_list_registrations_passes_the_token_on_and_relays_enrollments_refusal_intact():
    listed = enrollment_pb2.ListDecisionsResponse(
        decisions=[enrollment_pb2.ListedDecision(
            decision=enrollment_pb2.Decision(registration_id="reg_a", course_id="cs101", waitlist_position=2,
                                             outcome=enrollment_pb2.DECISION_OUTCOME_WAITLISTED),
            email="ada@example.com", name="Ada")],
        next_page_token="next")
    enrollment = Enrollment(listed)
    page = asyncio.run(servicer(enrollment, Queue()).ListRegistrations(
        R.ListRegistrationsRequest(filter="status = WAITLISTED"), Context()))  # type: ignore[arg-type]
    assert enrollment.metadata == [("authorization", "Bearer the-token")]
    [row] = page.registrations
    assert (row.registration.status, row.registration.waitlist_position, row.email, row.name) == (
        R.REGISTRATION_STATUS_WAITLISTED, 2, "ada@example.com", "Ada")
    assert page.next_page_token == "next"

    refusal = InvalidArgument.single("filter", "status is one of ...").to_status_proto()
    error = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(),
                                 grpc.aio.Metadata(("grpc-status-details-bin", refusal.SerializeToString())),
                                 details=refusal.message)
    with pytest.raises(RelayedError) as relayed:
        asyncio.run(servicer(Enrollment(error=error), Queue()).ListRegistrations(
            R.ListRegistrationsRequest(filter="status = SEATED"), Context()))  # type: ignore[arg-type]
    assert relayed.value.to_status_proto() == refusal
    assert (relayed.value.code, relayed.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FILTER")
