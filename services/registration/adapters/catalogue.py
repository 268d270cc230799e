"""What registration knows of the catalogue: a cache of courses, refreshed from enrollment.

Register must keep accepting sign-ups while the enrollment service is down, so known
courses are answered from a cache refreshed in the background; a course not in the
cache is looked up live (it may be new). Only when that live look-up cannot reach the
enrollment service is the answer UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from libs.errors import NotFound, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KnownCourse:
    course_id: str
    campus_id: str
    name: str


class Catalogue:
    def __init__(self, channel: grpc.aio.Channel, refresh_seconds: float = 5.0) -> None:
        self._stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        self._courses: dict[str, KnownCourse] = {}
        self._refresh_seconds = refresh_seconds
        self._task: asyncio.Task[None] | None = None

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

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except grpc.aio.AioRpcError as error:
                log.warning("catalogue refresh failed", extra={"code": error.code().name})
            await asyncio.sleep(self._refresh_seconds)

    async def course(self, course_id: str) -> KnownCourse:
        known = self._courses.get(course_id)
        if known:
            return known
        try:
            course = await self._stub.GetCourse(enrollment_pb2.GetCourseRequest(course_id=course_id), timeout=2)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"course {course_id!r} not found") from error
            raise Unavailable("the course catalogue cannot be reached to check this course; retry later") from error
        known = KnownCourse(course.course_id, course.campus_id, course.name)
        self._courses[course_id] = known
        return known
