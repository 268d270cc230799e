"""The synchronous baseline of the end-to-end benchmark: what a team would otherwise build.

    SYNC_DATABASE_URL=sqlite:///tmp/sync.db SYNC_PORT=50060 SYNC_COURSES_FILE=courses.json \
        python -m benchmarks.sync_register

A gRPC server speaking the same coursesignup.registration.v1.RegistrationService (only
Register), so the benchmark's load client works unchanged. Each Register validates the
request, then decides it at once in ONE database transaction: a conditional seat update
(UPDATE sync_courses SET enrolled = enrolled + 1 WHERE course_id = ? AND enrolled <
capacity) and an INSERT of the registration with its outcome (ENROLLED, or DECLINED_FULL
when no row was updated). The reply carries the final status; there is no queue, no
event, no email.

It reuses the services' bootstrap (libs.grpc_server: an asyncio grpc.aio server with the
same error interceptor, health and reflection), and SQLAlchemy's synchronous engine
(libs.db.make_engine: psycopg 3 with a pool of 5+5 connections, or SQLite in WAL mode
with BEGIN IMMEDIATE). Blocking database work inside an asyncio server goes to a thread
pool with asyncio.to_thread (the default executor: min(32, cores + 4) threads), the
natural choice once the server is grpc.aio; a sync grpc.server with a thread pool would
do the same work in the same threads.

Idempotency (AIP-155): a request_id seen before returns the stored registration (the
INSERT's unique key fails, the transaction, seat included, rolls back). Tables are its
own (sync_courses, sync_registrations), created at start in SYNC_DATABASE_URL and seeded
from SYNC_COURSES_FILE (a JSON object {course_id: capacity}) when empty.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import pathlib
import uuid
from typing import Any

import grpc
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import (
    Column,
    Date,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from libs.db import make_engine
from libs.errors import NotFound, Validator
from libs.grpc_server import ServiceHooks, run
from libs.logs import configure_logging

metadata = MetaData()

courses = Table(
    "sync_courses",
    metadata,
    Column("course_id", String(63), primary_key=True),
    Column("capacity", Integer, nullable=False),
    Column("enrolled", Integer, nullable=False),
)

registrations = Table(
    "sync_registrations",
    metadata,
    Column("registration_id", String(64), primary_key=True),
    Column("request_id", String(128), nullable=False, unique=True),
    Column("course_id", String(63), nullable=False),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=False),
    Column("birth_date", Date, nullable=False),
    Column("status", String(32), nullable=False),
    Column("create_time", DateTime(timezone=True), nullable=False),
)

SERVICE_NAME = registration_pb2.DESCRIPTOR.services_by_name["RegistrationService"].full_name
_STATUS = {
    "ENROLLED": registration_pb2.REGISTRATION_STATUS_ENROLLED,
    "DECLINED_FULL": registration_pb2.REGISTRATION_STATUS_DECLINED_FULL,
}


def seed(engine: Engine, capacities: dict[str, int]) -> None:
    metadata.create_all(engine)
    with engine.begin() as conn:
        if conn.execute(select(func.count()).select_from(courses)).scalar_one() == 0 and capacities:
            conn.execute(insert(courses), [{"course_id": course_id, "capacity": capacity, "enrolled": 0}
                                           for course_id, capacity in capacities.items()])


def decide(engine: Engine, request_id: str, course_id: str, name: str, email: str, birth: dt.date) -> tuple[str, str]:
    """One transaction: take a seat if one is left, record the registration; (id, status)."""
    registration_id = "reg_" + uuid.uuid5(uuid.NAMESPACE_URL, request_id).hex
    try:
        with engine.begin() as conn:
            seated = conn.execute(
                update(courses)
                .where(courses.c.course_id == course_id, courses.c.enrolled < courses.c.capacity)
                .values(enrolled=courses.c.enrolled + 1)
            ).rowcount
            if not seated and conn.execute(
                    select(courses.c.course_id).where(courses.c.course_id == course_id)).first() is None:
                raise NotFound(f"course {course_id!r} not found")
            status = "ENROLLED" if seated else "DECLINED_FULL"
            conn.execute(insert(registrations).values(
                registration_id=registration_id, request_id=request_id, course_id=course_id, name=name,
                email=email, birth_date=birth, status=status, create_time=dt.datetime.now(dt.UTC)))
        return registration_id, status
    except IntegrityError:
        with engine.connect() as conn:
            row = conn.execute(select(registrations.c.registration_id, registrations.c.status)
                               .where(registrations.c.request_id == request_id)).first()
        if row is None:
            raise
        return row.registration_id, row.status


class SyncRegistrationServicer(registration_pb2_grpc.RegistrationServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        validator = Validator()
        name = " ".join(request.name.split())
        if not name:
            validator.add("name", "is required")
        birth: dt.date | None = None
        try:
            birth = dt.date(request.birth_date.year, request.birth_date.month, request.birth_date.day)
        except ValueError:
            validator.add("birth_date", "is not a valid calendar date")
        email = ""
        try:
            email = validate_email(request.email.strip(), check_deliverability=False).normalized
        except EmailNotValidError as error:
            validator.add("email", f"is not a valid address: {error}")
        if not request.course_id:
            validator.add("course_id", "is required")
        validator.check()
        assert birth is not None
        request_id = request.request_id or uuid.uuid4().hex
        registration_id, status = await asyncio.to_thread(
            decide, self.engine, request_id, request.course_id, name, email, birth)
        return registration_pb2.RegisterResponse(registration_id=registration_id, status=_STATUS[status])

    async def GetRegistration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the baseline only implements Register")


def build_hooks() -> ServiceHooks:
    engine = make_engine(os.environ["SYNC_DATABASE_URL"])
    courses_file = os.environ.get("SYNC_COURSES_FILE")
    capacities = json.loads(pathlib.Path(courses_file).read_text()) if courses_file else {}

    def register(server: grpc.aio.Server) -> None:
        registration_pb2_grpc.add_RegistrationServiceServicer_to_server(SyncRegistrationServicer(engine), server)

    async def start() -> None:
        await asyncio.to_thread(seed, engine, capacities)

    async def stop() -> None:
        engine.dispose()

    return ServiceHooks(name="sync-register", port=int(os.environ.get("SYNC_PORT", "50060")), bind_host="127.0.0.1",
                        register=register, service_names=[SERVICE_NAME], start=start, stop=stop)


def main() -> None:
    configure_logging("sync-register", os.environ.get("LOG_LEVEL", "WARNING"))
    run(build_hooks())


if __name__ == "__main__":
    main()
