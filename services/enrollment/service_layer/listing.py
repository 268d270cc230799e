"""ListDecisions: decisions with their student, by AIP-160 filter, AIP-132 order and AIP-158 pages.

What the registration service's ListRegistrations serves. The fields are an allow-list
(libs.aip_filter): `email` (stored normalized, so a student's registrations are found
across courses by one address), `course_id`, `status` (a RegistrationStatus name, bare or
quoted, with or without its prefix) and `create_time` (Register's acceptance; the decision
time for rows recorded before it was kept). Pages are keyset pages ending in the unique
registration id; a token carries only the last registration id (emails stay out of
tokens) and the sort key is read back, so each page costs the same however deep. Tokens
are signed (libs.pagination) and tied to the filter and order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Engine, func, select

from libs.aip_filter import Field, FieldKind, OrderKey, compile_filter, parse_order_by
from libs.db import read_only
from libs.errors import InvalidArgument
from libs.pagination import after_keyset, decode_token, encode_token, page_size
from services.enrollment.adapters.tables import decisions, waitlist
from services.enrollment.domain.model import Outcome
from services.enrollment.service_layer.waitlist import position_of

_STATUS_NAMES = {name: outcome.value for outcome in Outcome
                 for name in (outcome.value, f"REGISTRATION_STATUS_{outcome.value}")}
# Never stored (a PENDING registration has no decision): a valid name that matches nothing.
_STATUS_NAMES.update({"PENDING": "PENDING", "REGISTRATION_STATUS_PENDING": "PENDING"})


def _bytewise(column: ColumnElement[str], dialect_name: str) -> ColumnElement[str]:
    """Compared and sorted by code point on both databases (PostgreSQL sorts by locale otherwise)."""
    return column.collate("C") if dialect_name == "postgresql" else column


def _fields(dialect_name: str) -> list[Field]:
    return [
        Field("email", FieldKind.STRING, _bytewise(decisions.c.email, dialect_name)),
        Field("course_id", FieldKind.STRING, _bytewise(decisions.c.course_id, dialect_name)),
        Field("status", FieldKind.ENUM, decisions.c.outcome, values=_STATUS_NAMES),
        Field("create_time", FieldKind.TIMESTAMP, func.coalesce(decisions.c.create_time, decisions.c.decide_time)),
    ]


@dataclass(frozen=True)
class DecisionPage:
    # Rows of decisions, with waitlist_position.
    rows: list[Any]
    next_page_token: str


def list_decisions(engine: Engine, filter_text: str, order_by: str, requested_size: int, token: str,
                   token_key: bytes) -> DecisionPage:
    size = page_size(requested_size)
    query_id = {"method": "ListDecisions", "filter": filter_text, "order_by": order_by}
    after = decode_token(token, query_id, token_key)
    fields = _fields(engine.dialect.name)
    condition = compile_filter(filter_text, fields)
    order = parse_order_by(order_by, fields, [OrderKey(fields[3])])
    unique = _bytewise(decisions.c.registration_id, engine.dialect.name)
    keys = [(key.field.expression, key.descending) for key in order] + [(unique, False)]
    query = (select(decisions, position_of(waitlist).scalar_subquery().label("waitlist_position"))
             .select_from(decisions.outerjoin(waitlist, waitlist.c.registration_id == decisions.c.registration_id)))
    if condition is not None:
        query = query.where(condition)
    with read_only(engine).connect() as conn:
        if after is not None:
            last = conn.execute(select(*(expression for expression, _ in keys))
                                .where(decisions.c.registration_id == after)).first()
            if last is None:
                raise InvalidArgument.single("page_token", "not a token returned by this method")
            query = query.where(after_keyset(keys, list(last)))
        query = query.order_by(*(e.desc() if descending else e.asc() for e, descending in keys)).limit(size + 1)
        rows = list(conn.execute(query))
    if len(rows) <= size:
        return DecisionPage(rows, "")
    return DecisionPage(rows[:size], encode_token(rows[size - 1].registration_id, query_id, token_key))
