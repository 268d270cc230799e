"""The RegistrationService gRPC servicer: validate, queue on Kinesis, answer PENDING.

Status look-ups and cancellations ask enrollment for the decision. A cancellation is a
command queued on `registrations` like a sign-up, keyed by the registration's course so
the course's single writer applies it after the sign-up: registration ids do not carry
their course, so the course comes from the decision, or, while the registration is still
PENDING (no decision yet), from the request's course_id, which is then required.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from grpc_status import rpc_status

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.events.v1 import events_pb2
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from libs.envelope import new_envelope
from libs.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RelayedError,
    ResourceExhausted,
    Unavailable,
    Validator,
)
from libs.ids import check_resource_id
from libs.kinesis import KinesisOutcomeUnknown, KinesisUnavailable, RecordBatcher
from libs.proto_time import date_message
from services.registration.adapters.catalogue import Catalogue
from services.registration.domain.registration_ids import IdCheck, RegistrationIds
from services.registration.domain.validation import validate_sign_up
from services.registration.service_layer.watches import WatchHub

log = logging.getLogger(__name__)

SERVICE_NAME = registration_pb2.DESCRIPTOR.services_by_name["RegistrationService"].full_name
# Registrations with the students' emails and names (personal data): admin token only.
ADMIN_METHODS = ("ListRegistrations",)
# What enrollment may answer ListDecisions that the caller should see as it is.
_RELAYED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

_STATUS = {
    enrollment_pb2.DECISION_OUTCOME_ENROLLED: registration_pb2.REGISTRATION_STATUS_ENROLLED,
    enrollment_pb2.DECISION_OUTCOME_DECLINED_FULL: registration_pb2.REGISTRATION_STATUS_DECLINED_FULL,
    enrollment_pb2.DECISION_OUTCOME_DECLINED_DUPLICATE: registration_pb2.REGISTRATION_STATUS_DECLINED_DUPLICATE,
    enrollment_pb2.DECISION_OUTCOME_DECLINED_UNKNOWN_COURSE:
        registration_pb2.REGISTRATION_STATUS_DECLINED_UNKNOWN_COURSE,
    enrollment_pb2.DECISION_OUTCOME_WAITLISTED: registration_pb2.REGISTRATION_STATUS_WAITLISTED,
    enrollment_pb2.DECISION_OUTCOME_CANCELLED: registration_pb2.REGISTRATION_STATUS_CANCELLED,
}
_DECLINED = frozenset({registration_pb2.REGISTRATION_STATUS_DECLINED_FULL,
                       registration_pb2.REGISTRATION_STATUS_DECLINED_DUPLICATE,
                       registration_pb2.REGISTRATION_STATUS_DECLINED_UNKNOWN_COURSE})
# Statuses a registration never leaves: a watch ends after sending one.
_TERMINAL = _DECLINED | {registration_pb2.REGISTRATION_STATUS_CANCELLED}


def registration_message(registration_id: str, decision: Any) -> registration_pb2.Registration:
    """A registration as enrollment's decision says it stands."""
    registration = registration_pb2.Registration(
        registration_id=registration_id,
        course_id=decision.course_id,
        status=_STATUS.get(decision.outcome, registration_pb2.REGISTRATION_STATUS_PENDING),
        decide_time=decision.decide_time,
        waitlist_position=decision.waitlist_position,
    )
    if decision.HasField("create_time"):
        registration.create_time.CopyFrom(decision.create_time)
    return registration


UNKNOWN_OUTCOME = "unknown whether the sign-up was queued: retry with the same request_id"


def _share_of_deadline(context: grpc.aio.ServicerContext, share: float, most: float) -> float:
    """Seconds for a call this handler makes on the caller's behalf: `share` of what the
    caller's deadline leaves, at most `most` (the whole of `most` with no deadline)."""
    remaining = context.time_remaining()
    return most if remaining is None else min(most, remaining * share)


class RegistrationServicer(registration_pb2_grpc.RegistrationServiceServicer):
    def __init__(
        self,
        ids: RegistrationIds,
        catalogue: Catalogue,
        enrollment: enrollment_pb2_grpc.EnrollmentServiceStub,
        commands: RecordBatcher,
        *,
        max_pending: int = 256,
        retry_delay_seconds: float = 0.2,
        internationalized_mailboxes: bool = True,
        watches: WatchHub | None = None,
        watch_reread_seconds: float = 30.0,
    ) -> None:
        self.ids = ids
        self.watches = watches or WatchHub()
        # A watch re-reads its registration this often (jittered ±25 %) even unwoken.
        self.watch_reread_seconds = watch_reread_seconds
        self.catalogue = catalogue
        self.enrollment = enrollment
        self.commands = commands
        # Admission: Register calls in progress in this process, and the limit beyond
        # which new ones are answered RESOURCE_EXHAUSTED (with RetryInfo) at once, so
        # overload is the service's decision, not HTTP/2 refusing streams.
        self.internationalized_mailboxes = internationalized_mailboxes
        self.max_pending = max_pending
        self.retry_delay_seconds = retry_delay_seconds
        self.pending = 0
        self.accepted = 0
        self.shed = 0
        self._shed_logged = 0
        self._shed_log_time = 0.0

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self.pending >= self.max_pending:
            self._shed()
        self.pending += 1
        try:
            reply = await self._register(request, context)
        finally:
            self.pending -= 1
        self.accepted += 1
        return reply

    def _shed(self) -> None:
        self.shed += 1
        now = time.monotonic()
        if now - self._shed_log_time >= 10:  # one line per interval, not one per refused call
            log.warning("Register at its admission limit: answering RESOURCE_EXHAUSTED",
                        extra={"max_pending": self.max_pending, "refused": self.shed - self._shed_logged})
            self._shed_log_time, self._shed_logged = now, self.shed
        raise ResourceExhausted(
            "too many sign-ups in progress; retry after the delay in RetryInfo with the same request_id",
            self.retry_delay_seconds,
        )

    async def _register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        today = dt.datetime.now(dt.UTC).date()
        sign_up = validate_sign_up(
            request.name,
            request.birth_date.year,
            request.birth_date.month,
            request.birth_date.day,
            request.course_id,
            request.email,
            request.request_id,
            request.locale,
            today,
            internationalized_mailboxes=self.internationalized_mailboxes,
        )
        # Within the caller's deadline, leaving at least half of it for the queue write.
        course = await self.catalogue.course(sign_up.course_id, timeout=_share_of_deadline(context, 0.5, 2.0))
        registration_id = self.ids.issue(sign_up.request_id, course_id=sign_up.course_id, email=sign_up.email)
        accepted = timestamp_pb2.Timestamp()
        accepted.GetCurrentTime()
        birth = date_message(sign_up.birth_date)
        command = new_envelope(
            registration_id,
            time=accepted,
            register_student=events_pb2.RegisterStudent(
                registration_id=registration_id,
                course_id=sign_up.course_id,
                name=sign_up.name,
                email=sign_up.email,
                birth_date=birth,
                locale=sign_up.locale,
                accept_time=accepted,
                course_name=course.name,
                join_waitlist=request.join_waitlist,
            ),
        )
        # One record per sign-up: enrollment decides it, and the notifier reads the same
        # record for the "received" email (two consumer applications of one stream).
        await self._queue(command, sign_up.course_id, context)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("registration queued", extra={"registration_id": registration_id,
                                                    "course_id": sign_up.course_id})
        return registration_pb2.RegisterResponse(
            registration_id=registration_id, status=registration_pb2.REGISTRATION_STATUS_PENDING
        )

    async def _queue(self, command: events_pb2.Envelope, course_id: str, context: grpc.aio.ServicerContext) -> None:
        """Writes a command to `registrations` keyed by its course. Every answer is true: it
        returns once Kinesis accepted the record, raises UNAVAILABLE only when it certainly
        was not written, DEADLINE_EXCEEDED (unknown) when a PutRecords that may have written
        it has not answered by the caller's deadline."""
        timeout = context.time_remaining()
        written = self.commands.put(command.SerializeToString(), course_id, timeout=timeout)
        try:
            await asyncio.wait_for(written, timeout)
        except KinesisUnavailable as error:
            raise Unavailable("the registration queue is unavailable; retry with the same request_id",
                              reason="QUEUE_UNAVAILABLE") from error
        except (KinesisOutcomeUnknown, TimeoutError) as error:
            raise DeadlineExceeded(UNKNOWN_OUTCOME) from error

    def _issued_id(self, given: str) -> str:
        """The canonical spelling of an issued id; INVALID_ARGUMENT or NOT_FOUND otherwise."""
        registration_id = self.ids.canonical(given)
        if not registration_id:
            raise InvalidArgument.single("registration_id", "is required")
        check = self.ids.check(registration_id)
        if check is IdCheck.MALFORMED:
            raise InvalidArgument.single("registration_id", "is not a registration id returned by Register")
        if check is IdCheck.NOT_ISSUED:
            raise NotFound(f"registration {registration_id!r} not found", reason="REGISTRATION_NOT_FOUND",
                           metadata={"registration_id": registration_id})
        return registration_id

    async def CancelRegistration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        registration_id = self._issued_id(request.registration_id)
        given_course = request.course_id
        if given_course:
            validator = Validator()
            check_resource_id(validator, "course_id", given_course)
            validator.check()
        try:
            decision = await self.enrollment.GetDecision(
                enrollment_pb2.GetDecisionRequest(registration_id=registration_id),
                timeout=_share_of_deadline(context, 0.5, 2.0),
            )
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                # Without the decision it is unknown whether it may be cancelled (a declined
                # one may not) or which course's writer owns it: nothing is queued.
                log.warning("decision look-up failed; cancellation refused", extra={"code": error.code().name})
                raise Unavailable("the registration's decision cannot be looked up now; retry",
                                  reason="ENROLLMENT_UNAVAILABLE") from error
            decision = None
        if decision is None:
            if not given_course:
                raise InvalidArgument.single(
                    "course_id", "is required while the registration is PENDING (its id does not carry its course)")
            await self.catalogue.course(given_course, timeout=_share_of_deadline(context, 0.5, 2.0))
            current = registration_pb2.Registration(registration_id=registration_id,
                                                    status=registration_pb2.REGISTRATION_STATUS_PENDING)
            course_id = given_course
        else:
            current = registration_message(registration_id, decision)
            course_id = decision.course_id
            if given_course and given_course != course_id:
                raise InvalidArgument.single("course_id", "is not the course of this registration")
            if current.status in _DECLINED:
                status = registration_pb2.RegistrationStatus.Name(current.status)
                raise FailedPrecondition(
                    f"registration {registration_id!r} is {status.removeprefix('REGISTRATION_STATUS_')}: "
                    "there is nothing to cancel",
                    reason="REGISTRATION_NOT_ACTIVE", metadata={"registration_id": registration_id, "status": status})
            if current.status == registration_pb2.REGISTRATION_STATUS_CANCELLED:
                return current  # cancelled already: nothing is queued again
        requested = timestamp_pb2.Timestamp()
        requested.GetCurrentTime()
        await self._queue(new_envelope(
            registration_id, time=requested,
            cancel_registration=events_pb2.CancelRegistration(
                registration_id=registration_id, course_id=course_id, request_time=requested),
        ), course_id, context)
        log.info("cancellation queued", extra={"registration_id": registration_id, "course_id": course_id})
        return current

    async def ListRegistrations(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # Enrollment keeps the decisions: the caller's admin token (checked here already)
        # goes on with the call, so enrollment checks it too.
        authorization = [(key, value) for key, value in (context.invocation_metadata() or ())
                         if key == "authorization"]
        try:
            page = await self.enrollment.ListDecisions(
                enrollment_pb2.ListDecisionsRequest(filter=request.filter, order_by=request.order_by,
                                                    page_size=request.page_size, page_token=request.page_token),
                timeout=_share_of_deadline(context, 0.8, 10.0), metadata=authorization,
            )
        except grpc.aio.AioRpcError as error:
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            if error.code() in _RELAYED and status is not None:
                raise RelayedError(status) from error
            log.warning("decision listing failed", extra={"code": error.code().name})
            raise Unavailable("the registrations cannot be listed now; retry",
                              reason="ENROLLMENT_UNAVAILABLE") from error
        return registration_pb2.ListRegistrationsResponse(
            registrations=[registration_pb2.ListedRegistration(
                registration=registration_message(listed.decision.registration_id, listed.decision),
                email=listed.email, name=listed.name) for listed in page.decisions],
            next_page_token=page.next_page_token,
        )

    async def GetRegistration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        registration_id = self._issued_id(request.registration_id)
        current = await self._look_up(registration_id, _share_of_deadline(context, 0.8, 2.0))
        # Accepted ids stay PENDING while the enrollment service or its database is down.
        return current or registration_pb2.Registration(registration_id=registration_id,
                                                        status=registration_pb2.REGISTRATION_STATUS_PENDING)

    async def _look_up(self, registration_id: str, timeout: float) -> registration_pb2.Registration | None:
        """The registration as enrollment's decision says (PENDING: no decision yet), or
        None when enrollment did not answer."""
        try:
            decision = await self.enrollment.GetDecision(
                enrollment_pb2.GetDecisionRequest(registration_id=registration_id), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return registration_pb2.Registration(registration_id=registration_id,
                                                     status=registration_pb2.REGISTRATION_STATUS_PENDING)
            log.warning("decision look-up failed", extra={"code": error.code().name})
            return None
        return registration_message(registration_id, decision)

    async def WatchRegistration(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """The registration now, then at each change, until a terminal status. Woken by the
        enrollment events of this registration and of its course (libs.stream_tail feeds
        `self.watches`); each wake re-reads the decision and sends it only if it differs
        from the last one sent. A jittered periodic re-read covers a missed event. The
        caller's deadline cancels the call (DEADLINE_EXCEEDED), which closes the watch."""
        registration_id = self._issued_id(request.registration_id)
        with self.watches.watch(registration_id) as watch:
            last: registration_pb2.Registration | None = None
            while True:
                watch.woken.clear()  # before the read: an event during it wakes the next one
                current = await self._look_up(registration_id, _share_of_deadline(context, 0.5, 2.0))
                if current is None and last is None:
                    # As GetRegistration: an accepted id is PENDING while enrollment is down.
                    current = registration_pb2.Registration(registration_id=registration_id,
                                                            status=registration_pb2.REGISTRATION_STATUS_PENDING)
                wait = self.watch_reread_seconds * random.uniform(0.75, 1.25)
                if current is None:
                    wait = min(wait, 2.0)  # enrollment did not answer: ask again soon
                elif current != last:
                    yield current
                    last = current
                    if current.status in _TERMINAL:
                        return
                    if current.course_id:
                        self.watches.follow_course(watch, current.course_id)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.woken.wait(), wait)
