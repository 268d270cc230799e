"""Every answer Register gives is true (issue 10, item 2): OK only once Kinesis accepted
the record, UNAVAILABLE only when it certainly was not written, DEADLINE_EXCEEDED when
unknown. Real kinesalite (paused with SIGSTOP), real enrollment and registration processes."""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time

import grpc
from google.type import date_pb2

from coursesignup.enrollment.v1 import enrollment_pb2, enrollment_pb2_grpc
from coursesignup.registration.v1 import registration_pb2, registration_pb2_grpc
from services.registration.domain.registration_ids import RegistrationIds
from tests import helpers
from tests.mesh import running_mesh

# Longer than botocore's read timeout (10 s), so the PutRecords in flight times out on the
# client and is retried, and longer than the old batcher's sweep (15 s), which answered
# UNAVAILABLE while the write was still in flight.
PAUSE_SECONDS = 17
CALLER_DEADLINE_SECONDS = 45


def _sign_up(request_id: str, course_id: str) -> registration_pb2.RegisterRequest:
    return registration_pb2.RegisterRequest(
        name="Truth Tester", birth_date=date_pb2.Date(year=2000, month=5, day=17), course_id=course_id,
        email=f"{request_id}@example.com", request_id=request_id)


def _create_course(enrollment: enrollment_pb2_grpc.EnrollmentServiceStub, course_id: str) -> None:
    enrollment.CreateCampus(enrollment_pb2.CreateCampusRequest(
        campus=enrollment_pb2.Campus(campus_id="north", name="North")), timeout=10, metadata=helpers.ADMIN_METADATA)
    enrollment.CreateCourse(enrollment_pb2.CreateCourseRequest(
        course=enrollment_pb2.Course(course_id=course_id, campus_id="north", name="Truth 101", capacity=100_000)),
        timeout=10, metadata=helpers.ADMIN_METADATA)


def test_register_answers_are_true_when_kinesis_pauses_mid_burst(tmp_path: pathlib.Path) -> None:
    course_id = "truth101"
    with helpers.kinesalite_process() as (kinesis_url, kinesalite), \
            running_mesh(tmp_path, kinesis_url, helpers.free_port(), services=("enrollment", "registration")) as mesh, \
            grpc.insecure_channel(mesh.target("registration")) as registration_channel, \
            grpc.insecure_channel(mesh.target("enrollment")) as enrollment_channel:
        registration = registration_pb2_grpc.RegistrationServiceStub(registration_channel)
        enrollment = enrollment_pb2_grpc.EnrollmentServiceStub(enrollment_channel)
        _create_course(enrollment, course_id)
        registration.Register(_sign_up("warmup", course_id), timeout=30)  # catalogue cached, stream reached

        answers: dict[str, grpc.StatusCode] = {}
        answered_after_resume: list[str] = []
        resumed = threading.Event()
        stop = threading.Event()
        lock = threading.Lock()

        def client(worker: int) -> None:
            for index in range(10_000):
                if stop.is_set():
                    return
                request_id = f"w{worker}n{index}"
                try:
                    registration.Register(_sign_up(request_id, course_id), timeout=CALLER_DEADLINE_SECONDS)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()
                with lock:
                    answers[request_id] = code
                    if resumed.is_set():
                        answered_after_resume.append(request_id)

        threads = [threading.Thread(target=client, args=(worker,), daemon=True) for worker in range(24)]
        for thread in threads:
            thread.start()
        helpers.wait_until(lambda: len(answers) >= 100, timeout=60, what="the burst under way")
        kinesalite.send_signal(signal.SIGSTOP)
        try:
            time.sleep(PAUSE_SECONDS)  # the outage itself, not a wait for an outcome
        finally:
            resumed.set()
            kinesalite.send_signal(signal.SIGCONT)
        helpers.wait_until(lambda: len(answered_after_resume) >= 24, timeout=60,
                           what="the calls held across the pause answered")
        stop.set()
        for thread in threads:
            thread.join(CALLER_DEADLINE_SECONDS + 15)

        # A marker sign-up behind all of them on the same course (one shard, FIFO): once it
        # is decided, every earlier record that reached the stream is decided too.
        marker = registration.Register(_sign_up("marker", course_id), timeout=30).registration_id

        def marker_decided() -> bool:
            status = registration.GetRegistration(
                registration_pb2.GetRegistrationRequest(registration_id=marker), timeout=5).status
            return status != registration_pb2.REGISTRATION_STATUS_PENDING

        helpers.wait_until(marker_decided, timeout=120, what="the marker decided")

        ids = RegistrationIds(os.environ["REGISTRATION_ID_SECRET"])  # what the mesh was given

        def decided(request_id: str) -> bool:
            registration_id = ids.issue(request_id, course_id=course_id, email=f"{request_id}@example.com")
            try:
                enrollment.GetDecision(enrollment_pb2.GetDecisionRequest(registration_id=registration_id), timeout=5)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND, error
                return False
            return True

        codes = set(answers.values())
        assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        accepted = [request_id for request_id, code in answers.items() if code == grpc.StatusCode.OK]
        refused = [request_id for request_id, code in answers.items() if code == grpc.StatusCode.UNAVAILABLE]
        assert answered_after_resume, "no call was held across the pause"
        lost = [request_id for request_id in accepted if not decided(request_id)]
        assert not lost, f"{len(lost)} sign-ups answered OK were never decided"
        refused_but_decided = [request_id for request_id in refused if decided(request_id)]
        assert not refused_but_decided, \
            f"{len(refused_but_decided)} of {len(refused)} sign-ups answered UNAVAILABLE were decided anyway"
