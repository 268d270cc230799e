"""The StatsService gRPC servicer (grpc.aio): validates requests and reads the read model.

Database reads run in worker threads (asyncio.to_thread) so the event loop keeps
serving. The stats service does not own the catalogue, so it cannot tell an unknown
course or campus from one without students: both get zeros (and QueryCourseStats
leaves them out).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from typing import TypeAlias

import grpc
from sqlalchemy import Engine

from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs.errors import Validator
from libs.ids import check_resource_id
from libs.proto_time import date_message, timestamp
from services.stats.domain.model import OVERALL_SCOPE, campus_scope, course_scope
from services.stats.service_layer import queries, views

ListingMessage: TypeAlias = stats_pb2.QueryCourseStatsRequest | stats_pb2.ListEnrollmentsRequest
DatedMessage: TypeAlias = (
    stats_pb2.GetCourseStatsRequest
    | stats_pb2.GetCampusStatsRequest
    | stats_pb2.GetOverallStatsRequest
    | ListingMessage
)


_VIEWS: dict[int, bool] = {
    stats_pb2.AGE_STATS_VIEW_UNSPECIFIED: False,
    stats_pb2.AGE_STATS_VIEW_BASIC: False,
    stats_pb2.AGE_STATS_VIEW_FULL: True,
}


class StatsServicer(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, engine: Engine, page_token_key: bytes) -> None:
        self._engine = engine
        self._page_token_key = page_token_key

    async def GetCourseStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.GetCourseStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.AgeStats:
        validator = Validator()
        check_resource_id(validator, "course_id", request.course_id)
        as_of = _as_of(validator, request) or _today()
        with_histogram = _view(validator, request.view)
        validator.check()
        return await self._age_stats(
            f"courses/{request.course_id}", course_scope(request.course_id), as_of, with_histogram
        )

    async def GetCampusStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.GetCampusStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.AgeStats:
        validator = Validator()
        check_resource_id(validator, "campus_id", request.campus_id)
        as_of = _as_of(validator, request) or _today()
        with_histogram = _view(validator, request.view)
        validator.check()
        return await self._age_stats(
            f"campuses/{request.campus_id}", campus_scope(request.campus_id), as_of, with_histogram
        )

    async def GetOverallStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.GetOverallStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.AgeStats:
        validator = Validator()
        as_of = _as_of(validator, request) or _today()
        with_histogram = _view(validator, request.view)
        validator.check()
        return await self._age_stats("overall", OVERALL_SCOPE, as_of, with_histogram)

    async def QueryCourseStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.QueryCourseStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.QueryCourseStatsResponse:
        validator = Validator()
        listing = _listing(validator, request)
        validator.check()
        page = await asyncio.to_thread(
            queries.query_course_stats, self._engine, listing, self._page_token_key
        )
        return stats_pb2.QueryCourseStatsResponse(
            course_stats=[
                stats_pb2.CourseStats(
                    course_id=row.course_id,
                    campus_id=row.campus_id,
                    student_count=row.student_count,
                    min_age=row.min_age,
                    max_age=row.max_age,
                    average_age=row.average_age,
                    median_age=row.median_age,
                )
                for row in page.items
            ],
            next_page_token=page.next_page_token,
            as_of=date_message(page.as_of),
        )

    async def ListEnrollments(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.ListEnrollmentsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.ListEnrollmentsResponse:
        validator = Validator()
        check_resource_id(validator, "course_id", request.course_id)
        listing = _listing(validator, request)
        validator.check()
        page = await asyncio.to_thread(
            queries.list_enrollments, self._engine, request.course_id, listing, self._page_token_key
        )
        return stats_pb2.ListEnrollmentsResponse(
            enrollments=[
                stats_pb2.Enrollment(
                    registration_id=entry.registration_id,
                    name=entry.name,
                    email=entry.email,
                    age=entry.age,
                    birth_date=date_message(entry.birth_date),
                    enroll_time=timestamp(entry.enroll_time),
                )
                for entry in page.items
            ],
            next_page_token=page.next_page_token,
            as_of=date_message(page.as_of),
        )

    async def _age_stats(
        self, name: str, scope: str, as_of: date, with_histogram: bool
    ) -> stats_pb2.AgeStats:
        stats = await asyncio.to_thread(views.age_stats, self._engine, scope, as_of, with_histogram)
        metrics = stats.metrics
        return stats_pb2.AgeStats(
            scope=name,
            student_count=metrics.student_count,
            min_age=metrics.min_age,
            max_age=metrics.max_age,
            average_age=metrics.average_age,
            as_of=date_message(as_of),
            median_age=stats.median_age,
            age_histogram=[
                stats_pb2.AgeBucket(age=age, student_count=count)
                for age, count in (stats.histogram or {}).items()
            ],
        )


def _listing(validator: Validator, request: ListingMessage) -> queries.ListingRequest:
    if request.page_size < 0:
        validator.add("page_size", "must not be negative")
    return queries.ListingRequest(
        filter=request.filter,
        order_by=request.order_by,
        page_size=max(request.page_size, 0),
        page_token=request.page_token,
        as_of=_as_of(validator, request),
    )


def _view(validator: Validator, view: int) -> bool:
    if int(view) not in _VIEWS:
        validator.add("view", "must be AGE_STATS_VIEW_BASIC or AGE_STATS_VIEW_FULL")
        return False
    return _VIEWS[int(view)]


def _today() -> date:
    return datetime.now(UTC).date()


def _as_of(validator: Validator, request: DatedMessage) -> date | None:
    """The requested date; None when unset (an all-zero Date counts as unset)."""
    if not request.HasField("as_of"):
        return None
    given = request.as_of
    if (given.year, given.month, given.day) == (0, 0, 0):
        return None
    try:
        return date(given.year, given.month, given.day)
    except ValueError:
        validator.add(
            "as_of", "must be a full calendar date (year 1-9999, month 1-12, a day of that month)"
        )
        return None


