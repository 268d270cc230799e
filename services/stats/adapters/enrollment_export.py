"""The enrollment service's ExportEnrollments stream, read as pages of domain events.

The rebuild reads the enrollments this way only: through enrollment's API, with the
admin token (the export carries birth dates), never from its database.

A stream that drops once the export is under way (enrollment restarted, a connection
reset, UNAVAILABLE, one stream's DEADLINE_EXCEEDED) is resumed on a new connection
from the next_page_token of the last page received whole, with the mesh's one backoff
(`libs.backoff`) and a warning per resume: each page is received whole or not at all,
so nothing is read twice or skipped. Each resume gets a bounded number of attempts and
seconds to get the next page; then the last error is raised. What cannot get better by
trying again (UNAUTHENTICATED, PERMISSION_DENIED, INVALID_ARGUMENT, ...) is raised at
once, and so is any failure before the first page: there is nothing to resume yet, and
an operator who named the wrong target or token learns it at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from tenacity import retry_if_exception

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from libs.backoff import Backoff
from services.stats.domain.model import StudentEnrolled

log = logging.getLogger(__name__)

# Enrollments per streamed page (the enrollment service's most).
PAGE_SIZE = 1000

# Statuses of a stream that broke or a service that is restarting (a connection reset
# or a server stopping mid-stream is UNAVAILABLE): the export resumes. Any other is final.
RESUMABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
RESUME_BACKOFF = Backoff(base_seconds=0.5, cap_seconds=10.0)
# After one drop: new streams tried, and seconds, to get the next page, before giving up.
RESUME_ATTEMPTS = 7
RESUME_DEADLINE_SECONDS = 120.0
RESUME_MESSAGE = "enrollment export interrupted; resuming after the last page received"


@dataclass(frozen=True)
class EnrollmentPage:
    enrollments: list[StudentEnrolled]
    # Enrollments of the whole export, as counted when it started (or last resumed).
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


def resumable(error: BaseException) -> bool:
    return isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call) and error.code() in RESUMABLE_CODES


class EnrollmentExport:
    """Streams every enrollment from the enrollment service at `target`, resuming a
    dropped stream (see the module's docstring); `resumes` counts the streams opened
    again by the last `pages()`."""

    def __init__(
        self,
        target: str,
        admin_token: str,
        page_size: int = PAGE_SIZE,
        backoff: Backoff = RESUME_BACKOFF,
        resume_attempts: int = RESUME_ATTEMPTS,
        resume_deadline_seconds: float = RESUME_DEADLINE_SECONDS,
        channel: Callable[[str], grpc.Channel] = grpc.insecure_channel,
    ) -> None:
        self.target = target
        # Makes the channel to `target` (TLS and the service config: libs.grpc_client).
        self.make_channel = channel
        self.admin_token = admin_token
        self.page_size = page_size
        self.backoff = backoff
        self.resume_attempts = resume_attempts
        self.resume_deadline_seconds = resume_deadline_seconds
        self.resumes = 0

    def pages(self) -> Iterator[EnrollmentPage]:
        """Pages in registration_id order; at least one (empty when there is nothing).
        Raises grpc.RpcError when the service refuses or fails, or when a dropped stream
        could not be resumed within the limits."""
        self.resumes = 0
        stream = _Stream(self)
        try:
            # Nothing to resume from before the first page: a failure here is final.
            response = stream.next_response()
            received = 0
            while response is not None:
                received += len(response.enrollments)
                yield EnrollmentPage([student_enrolled(m) for m in response.enrollments], response.total_size)
                if not response.next_page_token:
                    # The last page: the export is complete, whatever becomes of the stream now
                    # (resuming from an empty token would start it over).
                    return
                resuming = self.backoff.retrying(
                    retry=retry_if_exception(resumable),
                    # The first attempt is the broken stream's own next().
                    attempts=1 + self.resume_attempts,
                    deadline_seconds=self.resume_deadline_seconds,
                    log=log,
                    message=RESUME_MESSAGE,
                    extra={"target": self.target, "enrollments_received": received},
                )
                response = resuming(stream.next_response)
        finally:
            stream.close()


class _Stream:
    """One ExportEnrollments stream at a time, opened again after `next_page_token` of
    the last response received when the previous one broke."""

    def __init__(self, export: EnrollmentExport) -> None:
        self.export = export
        self.token = ""
        self.channel: grpc.Channel | None = None
        self.responses: Any = None
        self.opened = 0

    def next_response(self) -> enrollment_pb2.ExportEnrollmentsResponse | None:
        """The next page, None when the stream ended; raises grpc.RpcError when it broke."""
        if self.responses is None:
            self._open()
        try:
            response = next(self.responses)
        except grpc.RpcError:
            # A new channel for the next attempt: the broken one would wait out gRPC's
            # own reconnect backoff instead of the export's.
            self.close()
            raise
        except StopIteration:
            # Ended without a page with an empty token (no page at all, or an older server).
            return None
        self.token = response.next_page_token
        return response

    def _open(self) -> None:
        if self.opened:
            self.export.resumes += 1
        self.opened += 1
        self.channel = self.export.make_channel(self.export.target)
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(self.channel)
        self.responses = stub.ExportEnrollments(
            enrollment_pb2.ExportEnrollmentsRequest(page_size=self.export.page_size, page_token=self.token),
            metadata=[("authorization", f"Bearer {self.export.admin_token}")],
            wait_for_ready=False,
        )

    def close(self) -> None:
        if self.responses is not None:
            self.responses.cancel()
            self.responses = None
        if self.channel is not None:
            self.channel.close()
            self.channel = None
