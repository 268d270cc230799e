"""Prometheus metrics of a running service: RPCs by method and code, stream and domain
metrics, scraped from its /metrics port. Metrics are process-wide, so each check
compares a scrape after the work with one before it."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.type import date_pb2

from coursesignup.enrollment.v1 import enrollment_pb2 as pb
from coursesignup.enrollment.v1 import enrollment_pb2_grpc
from coursesignup.events.v1 import events_pb2
from libs.config import CommonSettings
from libs.envelope import new_envelope
from libs.kinesis import OutgoingRecord, kinesis_client, put_records
from tests import helpers


def _sign_up(course_id: str, email: str) -> OutgoingRecord:
    accepted = timestamp_pb2.Timestamp()
    accepted.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    command = events_pb2.RegisterStudent(
        registration_id=f"reg_{uuid.uuid4().hex}", course_id=course_id, name="N", email=email,
        birth_date=date_pb2.Date(year=2000, month=1, day=1), accept_time=accepted)
    return OutgoingRecord(course_id, new_envelope(command.registration_id, register_student=command)
                          .SerializeToString())


def test_enrollment_counts_rpcs_by_code_records_dead_letters_and_decisions(kinesis_env, database_url):
    metrics_port = helpers.free_port()
    with helpers.serve_enrollment(database_url, enrollment_metrics_port=metrics_port) as target, \
            grpc.insecure_channel(target) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        before = helpers.scrape(metrics_port)
        stub.CreateCampus(pb.CreateCampusRequest(campus=pb.Campus(campus_id="m", name="Metrics")),
            metadata=helpers.ADMIN_METADATA)
        stub.CreateCourse(pb.CreateCourseRequest(course=pb.Course(course_id="m1", campus_id="m", name="M",
                                                                  capacity=2)), metadata=helpers.ADMIN_METADATA)
        for _ in range(3):
            stub.ListCourses(pb.ListCoursesRequest())
        with pytest.raises(grpc.RpcError):
            stub.GetCourse(pb.GetCourseRequest(course_id="missing"))

        settings = CommonSettings()
        records = [_sign_up("m1", f"s{i}@example.com") for i in range(5)]
        records.insert(2, OutgoingRecord("m1", b"\xff not an envelope"))
        assert all(put_records(kinesis_client(settings.aws_region), settings.stream_name("registrations"),
                               records))

        def decided() -> bool:
            return stub.GetCourse(pb.GetCourseRequest(course_id="m1")).enrolled_count == 2 and \
                helpers.metric_sum(helpers.scrape(metrics_port), "coursesignup_decisions_total") - \
                helpers.metric_sum(before, "coursesignup_decisions_total") == 5
        helpers.wait_until(decided, what="the five sign-ups decided")
        after = helpers.scrape(metrics_port)

    def delta(name: str, **labels: str) -> float:
        return helpers.metric_sum(after, name, **labels) - helpers.metric_sum(before, name, **labels)

    service = "coursesignup.enrollment.v1.EnrollmentService"
    assert delta("grpc_server_started_total", grpc_service=service, grpc_method="ListCourses") == 3
    assert delta("grpc_server_handled_total", grpc_method="ListCourses", grpc_code="OK", grpc_type="unary") == 3
    assert delta("grpc_server_handled_total", grpc_method="GetCourse", grpc_code="NOT_FOUND") == 1
    assert delta("grpc_server_handling_seconds_count", grpc_method="ListCourses") == 3
    assert delta("coursesignup_decisions_total", outcome="ENROLLED") == 2
    assert delta("coursesignup_decisions_total", outcome="DECLINED_FULL") == 3
    assert delta("coursesignup_decision_lag_seconds_count") == 5
    # The decisions are committed by now; the lag is at least the second the test back-dated them by.
    assert delta("coursesignup_decision_lag_seconds_sum") >= 5
    stream = f"{kinesis_env['KINESIS_STREAM_PREFIX']}registrations"
    assert delta("coursesignup_stream_records_consumed_total", stream=stream) == 6
    assert delta("coursesignup_stream_dead_letters_total", stream=stream) == 1
    assert helpers.metric_sum(after, "coursesignup_stream_leases_held", stream=stream) == 1
    assert ("coursesignup_outbox_depth", ()) in after
