"""Exporting the enrollments, page by page, for read models kept by other services.

Pages follow registration_id (keyset pagination: each page is one indexed range scan
of at most `page_size` rows, so memory stays bounded and a page deep in the export
costs what the first one does). Each page is read in its own short transaction: an
export of millions of rows holds no snapshot open. A reader rebuilding from it relies
on the events of what changes meanwhile (published after commit) to catch up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from libs.pagination import decode_token, encode_token, page_size
from services.enrollment.adapters.tables import courses, enrollments

# The tokens of one method are tied to it (a ListCourses token is refused here).
_TOKEN_QUERY = {"method": "ExportEnrollments"}


@dataclass(frozen=True)
class ExportPage:
    # Rows with registration_id, course_id, campus_id, email, name, birth_date, enroll_time.
    rows: list[Any]
    next_page_token: str


def check_page_token(token: str, token_key: bytes) -> None:
    """Raises InvalidArgument (naming page_token) for a token this method did not issue."""
    decode_token(token, _TOKEN_QUERY, token_key)


def count_enrollments(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(enrollments)).scalar_one())


def export_page(engine: Engine, requested_size: int, token: str, token_key: bytes) -> ExportPage:
    size = page_size(requested_size)
    after = decode_token(token, _TOKEN_QUERY, token_key)
    query = (
        select(
            enrollments.c.registration_id,
            enrollments.c.course_id,
            courses.c.campus_id,
            enrollments.c.email,
            enrollments.c.name,
            enrollments.c.birth_date,
            enrollments.c.enroll_time,
        )
        .join(courses, courses.c.course_id == enrollments.c.course_id)
        .order_by(enrollments.c.registration_id)
        .limit(size + 1)
    )
    if after is not None:
        query = query.where(enrollments.c.registration_id > after)
    with engine.connect() as conn:
        rows = list(conn.execute(query))
    if len(rows) <= size:
        return ExportPage(rows, "")
    return ExportPage(rows[:size], encode_token(rows[size - 1].registration_id, _TOKEN_QUERY, token_key))
