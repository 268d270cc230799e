"""The StatsService gRPC servicer (grpc.aio): validates requests and reads metrics.

Database reads run in worker threads (asyncio.to_thread) so the event loop keeps
serving. The stats service does not own the catalogue, so it cannot tell an unknown
course or campus from one without students: both get zeros.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import TypeAlias

import grpc
from google.type import date_pb2
from sqlalchemy import Engine

from coursesignup.stats.v1 import stats_pb2, stats_pb2_grpc
from libs.errors import Validator
from libs.ids import check_resource_id
from services.stats.domain.model import OVERALL_SCOPE, campus_scope, course_scope
from services.stats.service_layer import views

AgeStatsRequest: TypeAlias = (
    stats_pb2.GetCourseStatsRequest | stats_pb2.GetCampusStatsRequest | stats_pb2.GetOverallStatsRequest
)


class StatsServicer(stats_pb2_grpc.StatsServiceServicer):
    def __init__(self, engine: Callable[[], Engine]) -> None:
        # A callable, because the database is opened by the start hook, after the
        # servicer is registered; it raises Unavailable until then.
        self._engine = engine

    async def GetCourseStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.GetCourseStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.AgeStats:
        validator = Validator()
        check_resource_id(validator, "course_id", request.course_id)
        as_of = _as_of(validator, request)
        validator.check()
        return await self._age_stats(
            f"courses/{request.course_id}", course_scope(request.course_id), as_of
        )

    async def GetCampusStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.GetCampusStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.AgeStats:
        validator = Validator()
        check_resource_id(validator, "campus_id", request.campus_id)
        as_of = _as_of(validator, request)
        validator.check()
        return await self._age_stats(
            f"campuses/{request.campus_id}", campus_scope(request.campus_id), as_of
        )

    async def GetOverallStats(  # noqa: N802 - gRPC method name
        self, request: stats_pb2.GetOverallStatsRequest, context: grpc.aio.ServicerContext
    ) -> stats_pb2.AgeStats:
        validator = Validator()
        as_of = _as_of(validator, request)
        validator.check()
        return await self._age_stats("overall", OVERALL_SCOPE, as_of)

    async def _age_stats(self, name: str, scope: str, as_of: date) -> stats_pb2.AgeStats:
        metrics = await asyncio.to_thread(views.age_metrics, self._engine(), scope, as_of)
        return stats_pb2.AgeStats(
            scope=name,
            student_count=metrics.student_count,
            min_age=metrics.min_age,
            max_age=metrics.max_age,
            average_age=metrics.average_age,
            as_of=date_pb2.Date(year=as_of.year, month=as_of.month, day=as_of.day),
        )


def _as_of(validator: Validator, request: AgeStatsRequest) -> date:
    """The requested date; today in UTC when unset (an all-zero Date counts as unset)."""
    today = datetime.now(UTC).date()
    if not request.HasField("as_of"):
        return today
    given = request.as_of
    if (given.year, given.month, given.day) == (0, 0, 0):
        return today
    try:
        return date(given.year, given.month, given.day)
    except ValueError:
        validator.add(
            "as_of", "must be a full calendar date (year 1-9999, month 1-12, a day of that month)"
        )
        return today
