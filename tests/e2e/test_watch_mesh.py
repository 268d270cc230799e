"""WatchRegistration end to end (issue 11): real processes over kinesalite, a watch held on
one registration instance (two worker processes sharing its port) while everything that
changes the registration goes through another instance and enrollment."""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from google.type import date_pb2
from grpc_status import rpc_status

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from services.registration.domain.registration_ids import RegistrationIds
from tests import helpers
from tests.helpers import wait_until
from tests.mesh import Mesh, running_mesh, smtp_server

pytestmark = pytest.mark.e2e

COURSE = "watch101"
WATCHES = "coursesignup_registration_watches"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, kinesis_endpoint: str) -> Iterator[Mesh]:
    metrics_port = helpers.free_port()
    with smtp_server(headers_only=True) as (smtp_port, _):
        # Instance A: two workers behind one port, their parent serving the summed /metrics.
        with running_mesh(tmp_path_factory.mktemp("watch"), kinesis_endpoint, smtp_port,
                          extra_env={"REGISTRATION_PROCESSES": "2",
                                     "REGISTRATION_METRICS_PORT": str(metrics_port)}) as running:
            running.ports["metrics"] = metrics_port
            running.env.update(REGISTRATION_PROCESSES="1", REGISTRATION_METRICS_PORT="0")
            running.start("registration", "registration-b")  # instance B: its own port
            running.wait_healthy(["registration-b"])
            yield running


class StreamReader:
    """Reads a WatchRegistration stream in a thread: its messages, then how it ended."""

    def __init__(self, stub: Any, registration_id: str, timeout: float) -> None:
        self.messages: queue.Queue[Any] = queue.Queue()
        self.ended: grpc.StatusCode | None = None
        self.done = threading.Event()
        self.call = stub.WatchRegistration(R.WatchRegistrationRequest(registration_id=registration_id),
                                           timeout=timeout)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for message in self.call:
                self.messages.put(message)
            self.ended = grpc.StatusCode.OK
        except grpc.RpcError as error:
            self.ended = error.code()
        finally:
            self.done.set()

    def next(self, timeout: float = 15.0) -> Any:  # well under the 22.5 s of the earliest safety re-read
        return self.messages.get(timeout=timeout)


def reason_of(error: grpc.RpcError) -> str:
    info = error_details_pb2.ErrorInfo()
    assert any(detail.Unpack(info) for detail in rpc_status.from_call(error).details), error
    return info.reason


def watches_open(mesh: Mesh) -> float:
    return helpers.metric_sum(helpers.scrape(mesh.ports["metrics"]), WATCHES)


def stubs(mesh: Mesh) -> tuple[Any, Any, Any, list[grpc.Channel]]:
    channels = [grpc.insecure_channel(mesh.target(name)) for name in ("registration", "registration-b", "enrollment")]
    return (registration_pb2_grpc.RegistrationServiceStub(channels[0]),
            registration_pb2_grpc.RegistrationServiceStub(channels[1]),
            enrollment_pb2_grpc.EnrollmentServiceStub(channels[2]), channels)


def test_a_watch_on_one_instance_follows_a_registration_changed_through_another_until_cancelled(mesh):
    watched_on_a, changed_on_b, enrollment, channels = stubs(mesh)
    try:
        enrollment.CreateCampus(enrollment_pb2.CreateCampusRequest(
            campus=enrollment_pb2.Campus(campus_id="watch", name="Watching")), metadata=helpers.ADMIN_METADATA)
        enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
            course=enrollment_pb2.Course(course_id=COURSE, campus_id="watch", name="Watched", capacity=1)),
            metadata=helpers.ADMIN_METADATA)

        def register(who: str, request_id: str = "") -> str:
            return str(changed_on_b.Register(R.RegisterRequest(
                name=who.title(), email=f"{who}@example.com", course_id=COURSE, join_waitlist=True,
                request_id=request_id, birth_date=date_pb2.Date(year=1990, month=1, day=1)), timeout=10
            ).registration_id)

        def status(registration_id: str) -> tuple[int, int]:
            reply = changed_on_b.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id))
            return reply.status, reply.waitlist_position

        first, second = register("first"), None
        wait_until(lambda: status(first)[0] == R.REGISTRATION_STATUS_ENROLLED, what="first enrolled")
        second = register("second")
        wait_until(lambda: status(second) == (R.REGISTRATION_STATUS_WAITLISTED, 1), what="second waitlisted")

        # The id Register will return (the mesh's secret), so the watch opens before the sign-up.
        request_id = str(uuid.uuid4())
        target = RegistrationIds(os.environ["REGISTRATION_ID_SECRET"]).issue(
            request_id, course_id=COURSE, email="third@example.com")
        watch = StreamReader(watched_on_a, target, timeout=60)
        seen = [watch.next()]
        assert register("third", request_id) == target

        def step() -> tuple[int, int]:
            seen.append(watch.next())
            return seen[-1].status, seen[-1].waitlist_position

        assert step() == (R.REGISTRATION_STATUS_WAITLISTED, 2)
        # Someone ahead leaves: no event names the third, its course's event wakes its watch.
        changed_on_b.CancelRegistration(R.CancelRegistrationRequest(registration_id=second))
        assert step() == (R.REGISTRATION_STATUS_WAITLISTED, 1)
        enrollment.UpdateCourse(enrollment_pb2.UpdateCourseRequest(
            course=enrollment_pb2.Course(course_id=COURSE, capacity=2), update_mask=["capacity"]),
            metadata=helpers.ADMIN_METADATA)
        assert step() == (R.REGISTRATION_STATUS_ENROLLED, 0)
        changed_on_b.CancelRegistration(R.CancelRegistrationRequest(registration_id=target))
        assert step() == (R.REGISTRATION_STATUS_CANCELLED, 0)
        assert watch.done.wait(30) and watch.ended == grpc.StatusCode.OK, "the stream ends after CANCELLED"
        assert watch.messages.empty()
        assert [m.status for m in seen] == [R.REGISTRATION_STATUS_PENDING, R.REGISTRATION_STATUS_WAITLISTED,
                                            R.REGISTRATION_STATUS_WAITLISTED, R.REGISTRATION_STATUS_ENROLLED,
                                            R.REGISTRATION_STATUS_CANCELLED]
        assert {m.registration_id for m in seen} == {target} and seen[-1].course_id == COURSE
        wait_until(lambda: watches_open(mesh) == 0, what="no watch left open")
    finally:
        for channel in channels:
            channel.close()


def test_a_watch_ends_at_the_callers_deadline_and_leaves_nothing_open(mesh):
    watched_on_a, _, _, channels = stubs(mesh)
    try:
        never_used = RegistrationIds(os.environ["REGISTRATION_ID_SECRET"]).issue(str(uuid.uuid4()))
        watch = StreamReader(watched_on_a, never_used, timeout=4)
        assert watch.next().status == R.REGISTRATION_STATUS_PENDING  # accepted ids are PENDING until decided
        wait_until(lambda: watches_open(mesh) == 1, what="the watch counted")
        assert watch.done.wait(30)
        assert watch.ended == grpc.StatusCode.DEADLINE_EXCEEDED and watch.messages.empty()
        wait_until(lambda: watches_open(mesh) == 0, what="the watch closed at its deadline")
    finally:
        for channel in channels:
            channel.close()


def test_malformed_and_never_issued_ids_are_refused_as_by_get_registration(mesh):
    watched_on_a, _, _, channels = stubs(mesh)
    try:
        forged = RegistrationIds("another-secret-0123456789abcdef").issue("x")
        for registration_id, code, reason in (("not-an-id", grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID"),
                                              (forged, grpc.StatusCode.NOT_FOUND, "REGISTRATION_NOT_FOUND")):
            with pytest.raises(grpc.RpcError) as raised:
                list(watched_on_a.WatchRegistration(R.WatchRegistrationRequest(registration_id=registration_id),
                                                    timeout=10))
            assert raised.value.code() == code and reason_of(raised.value) == reason
            with pytest.raises(grpc.RpcError) as looked_up:
                watched_on_a.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id), timeout=10)
            assert looked_up.value.code() == code and reason_of(looked_up.value) == reason
    finally:
        for channel in channels:
            channel.close()
