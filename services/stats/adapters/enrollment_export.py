"""The enrollment service's ExportEnrollments stream, read as pages of domain events.

The rebuild reads the enrollments this way only: through enrollment's API, with the
admin token (the export carries birth dates), never from its database.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from services.stats.domain.model import StudentEnrolled


@dataclass(frozen=True)
class EnrollmentPage:
    enrollments: list[StudentEnrolled]
    # Enrollments of the whole export, as counted when it started.
    total: int


def student_enrolled(message: enrollment_pb2.ExportedEnrollment) -> StudentEnrolled:
    return StudentEnrolled(
        registration_id=message.registration_id,
        course_id=message.course_id,
        campus_id=message.campus_id,
        email=message.email,
        name=message.name,
        birth_date=dt.date(message.birth_date.year, message.birth_date.month, message.birth_date.day),
        enroll_time=message.enroll_time.ToDatetime(tzinfo=dt.UTC),
    )


class EnrollmentExport:
    """Streams every enrollment from the enrollment service at `target`."""

    def __init__(self, target: str, admin_token: str, page_size: int = 1000) -> None:
        self.target = target
        self.admin_token = admin_token
        self.page_size = page_size

    def pages(self) -> Iterator[EnrollmentPage]:
        """Pages in registration_id order; at least one (empty when there is nothing).
        Raises grpc.RpcError when the service refuses or fails."""
        with grpc.insecure_channel(self.target) as channel:
            stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
            responses = stub.ExportEnrollments(
                enrollment_pb2.ExportEnrollmentsRequest(page_size=self.page_size),
                metadata=[("authorization", f"Bearer {self.admin_token}")],
                wait_for_ready=False,
            )
            try:
                for response in responses:
                    yield EnrollmentPage([student_enrolled(m) for m in response.enrollments], response.total_size)
            finally:
                responses.cancel()
