"""The EnrollmentService gRPC servicer: translates messages to catalogue use cases."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from sqlalchemy import Engine

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from libs.proto_time import date_message, timestamp
from services.enrollment.domain.model import Outcome
from services.enrollment.service_layer import catalogue, export, listing

SERVICE_NAME = enrollment_pb2.DESCRIPTOR.services_by_name["EnrollmentService"].full_name
# Catalogue writes, and the export of every enrollment and the listing of decisions
# (personal data): admin token only.
ADMIN_METHODS = ("CreateCampus", "CreateCourse", "UpdateCourse", "ExportEnrollments", "ListDecisions")

_OUTCOMES = {
    Outcome.ENROLLED.value: enrollment_pb2.DECISION_OUTCOME_ENROLLED,
    Outcome.DECLINED_FULL.value: enrollment_pb2.DECISION_OUTCOME_DECLINED_FULL,
    Outcome.DECLINED_DUPLICATE.value: enrollment_pb2.DECISION_OUTCOME_DECLINED_DUPLICATE,
    Outcome.DECLINED_UNKNOWN_COURSE.value: enrollment_pb2.DECISION_OUTCOME_DECLINED_UNKNOWN_COURSE,
    Outcome.WAITLISTED.value: enrollment_pb2.DECISION_OUTCOME_WAITLISTED,
    Outcome.CANCELLED.value: enrollment_pb2.DECISION_OUTCOME_CANCELLED,
}


def campus_message(row: Any) -> enrollment_pb2.Campus:
    return enrollment_pb2.Campus(campus_id=row.campus_id, name=row.name, create_time=timestamp(row.create_time))


def course_message(row: Any) -> enrollment_pb2.Course:
    return enrollment_pb2.Course(
        course_id=row.course_id,
        campus_id=row.campus_id,
        name=row.name,
        capacity=row.capacity,
        enrolled_count=row.enrolled_count,
        create_time=timestamp(row.create_time),
        update_time=timestamp(row.update_time),
        waitlist_count=row.waitlist_count,
    )


def decision_message(row: Any) -> enrollment_pb2.Decision:
    return enrollment_pb2.Decision(
        registration_id=row.registration_id,
        course_id=row.course_id,
        outcome=_OUTCOMES[row.outcome],
        decide_time=timestamp(row.decide_time),
        waitlist_position=row.waitlist_position or 0,
        create_time=timestamp(row.create_time) if row.create_time is not None else None,
        promoted=bool(row.promoted),
    )


def exported_enrollment_message(row: Any) -> enrollment_pb2.ExportedEnrollment:
    return enrollment_pb2.ExportedEnrollment(
        registration_id=row.registration_id,
        course_id=row.course_id,
        campus_id=row.campus_id,
        email=row.email,
        name=row.name,
        birth_date=date_message(row.birth_date),
        enroll_time=timestamp(row.enroll_time),
    )


class EnrollmentServicer(enrollment_pb2_grpc.EnrollmentServiceServicer):
    def __init__(self, engine: Engine, page_token_key: bytes, *, stream_name: Callable[[str], str] = str,
                 published: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.page_token_key = page_token_key
        # Where UpdateCourse's promotions go (the outbox rows' full stream names), and what
        # runs once they committed (the relay is woken to publish them at once).
        self.stream_name = stream_name
        self.published = published

    async def CreateCampus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        row = await asyncio.to_thread(catalogue.create_campus, self.engine, request.campus.campus_id,
                                      request.campus.name)
        return campus_message(row)

    async def GetCampus(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return campus_message(await asyncio.to_thread(catalogue.get_campus, self.engine, request.campus_id))

    async def ListCampuses(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        page = await asyncio.to_thread(catalogue.list_campuses, self.engine, request.page_size, request.page_token,
                                       self.page_token_key)
        return enrollment_pb2.ListCampusesResponse(
            campuses=[campus_message(r) for r in page.rows], next_page_token=page.next_page_token
        )

    async def CreateCourse(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        course = request.course
        row = await asyncio.to_thread(
            catalogue.create_course, self.engine, course.course_id, course.campus_id, course.name, course.capacity
        )
        return course_message(row)

    async def GetCourse(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return course_message(await asyncio.to_thread(catalogue.get_course, self.engine, request.course_id))

    async def ListCourses(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        page = await asyncio.to_thread(
            catalogue.list_courses, self.engine, request.campus_id, request.page_size, request.page_token,
            self.page_token_key,
        )
        return enrollment_pb2.ListCoursesResponse(
            courses=[course_message(r) for r in page.rows], next_page_token=page.next_page_token
        )

    async def UpdateCourse(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        course = request.course
        row = await asyncio.to_thread(
            catalogue.update_course, self.engine, course.course_id, course.name, course.capacity,
            list(request.update_mask), stream_name=self.stream_name, committed=self.published,
        )
        return course_message(row)

    async def GetDecision(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        row = await asyncio.to_thread(catalogue.get_decision, self.engine, request.registration_id)
        return decision_message(row)

    async def ListDecisions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        page = await asyncio.to_thread(listing.list_decisions, self.engine, request.filter, request.order_by,
                                       request.page_size, request.page_token, self.page_token_key)
        return enrollment_pb2.ListDecisionsResponse(
            decisions=[enrollment_pb2.ListedDecision(decision=decision_message(row), email=row.email, name=row.name)
                       for row in page.rows],
            next_page_token=page.next_page_token,
        )

    async def ExportEnrollments(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[enrollment_pb2.ExportEnrollmentsResponse]:
        # A bad cursor or size is refused before anything is sent.
        export.check_page_token(request.page_token, self.page_token_key)
        total = await asyncio.to_thread(export.count_enrollments, self.engine)
        token = request.page_token
        while True:
            # One page in memory at a time: the next is read once gRPC took this one.
            page = await asyncio.to_thread(export.export_page, self.engine, request.page_size, token,
                                           self.page_token_key)
            yield enrollment_pb2.ExportEnrollmentsResponse(
                enrollments=[exported_enrollment_message(row) for row in page.rows],
                next_page_token=page.next_page_token,
                total_size=total,
            )
            token = page.next_page_token
            if not token:
                return
