"""What registration knows of the catalogue: a cache of courses, refreshed from enrollment.

Register must keep accepting sign-ups while the enrollment service is down (the queue
absorbs the outage), so known courses are answered from a cache refreshed in the
background, and a course not in the cache is looked up live (it may be new). When that
look-up cannot reach the enrollment service (an instance started during the outage has
an empty cache) the sign-up is accepted unverified: enrollment, which owns the
catalogue, decides it, and declines it DECLINED_UNKNOWN_COURSE if the course does not
exist. Only a course enrollment answers NOT_FOUND for is refused at the door.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from libs.errors import NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownCourse:
    course_id: str
    campus_id: str
    name: str
    # False when enrollment could not be asked: the course may not exist (enrollment decides).
    verified: bool = True


class Catalogue:
    def __init__(self, channel: grpc.aio.Channel, refresh_seconds: float = 5.0) -> None:
        self._stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        self._courses: dict[str, KnownCourse] = {}
        self._refresh_seconds = refresh_seconds
        self._task: asyncio.Task[None] | None = None
        self.unverified = 0  # sign-ups accepted without a catalogue check (enrollment unreachable)
        self._unverified_log_time = 0.0
        self._refreshed_at: float | None = None  # monotonic time of the last full refresh

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()

    async def refresh(self) -> None:
        courses: dict[str, KnownCourse] = {}
        token = ""
        while True:
            page = await self._stub.ListCourses(
                enrollment_pb2.ListCoursesRequest(page_size=1000, page_token=token), timeout=5
            )
            for course in page.courses:
                courses[course.course_id] = KnownCourse(course.course_id, course.campus_id, course.name)
            token = page.next_page_token
            if not token:
                break
        self._courses = courses
        self._refreshed_at = time.monotonic()

    def reachable(self) -> bool:
        """Whether the catalogue was refreshed from enrollment lately (two refresh periods):
        without it, courses added since are accepted unverified and course names may be stale."""
        return self._refreshed_at is not None and time.monotonic() - self._refreshed_at < 2 * self._refresh_seconds + 5

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except grpc.aio.AioRpcError as error:
                log.warning("catalogue refresh failed", extra={"code": error.code().name})
            await asyncio.sleep(self._refresh_seconds)

    async def course(self, course_id: str, timeout: float = 2.0) -> KnownCourse:
        """The course, from the cache or asked of enrollment within `timeout` seconds
        (the caller passes what its own deadline leaves)."""
        known = self._courses.get(course_id)
        if known:
            return known
        try:
            course = await self._stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id=course_id),
                                                timeout=max(timeout, 0.05))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"course {course_id!r} not found", reason="COURSE_NOT_FOUND",
                               metadata={"course_id": course_id}) from error
            self._unverified(error.code())
            return KnownCourse(course_id, "", "", verified=False)
        known = KnownCourse(course.course_id, course.campus_id, course.name)
        self._courses[course_id] = known
        return known

    def _unverified(self, code: grpc.StatusCode) -> None:
        self.unverified += 1
        now = time.monotonic()
        if now - self._unverified_log_time >= 10:  # one line per interval, not one per sign-up
            self._unverified_log_time = now
            log.warning("catalogue unreachable: accepting sign-ups for courses not in the cache unverified "
                        "(enrollment decides them)", extra={"code": code.name, "unverified": self.unverified})
