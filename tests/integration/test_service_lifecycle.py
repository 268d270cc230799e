"""Health, start-up and shutdown of a real service process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import grpc
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from tests import helpers


def test_health_is_not_serving_until_kinesis_answers_and_sigterm_still_stops_at_once(tmp_path):
    port, dead_kinesis = helpers.free_port(), helpers.free_port()
    env = {**os.environ, "REGISTRATION_PORT": str(port), "AWS_ENDPOINT_URL_KINESIS": f"http://127.0.0.1:{dead_kinesis}",
           "ENROLLMENT_TARGET": f"127.0.0.1:{helpers.free_port()}"}
    process = subprocess.Popen([sys.executable, "-m", "services.registration"], cwd=helpers.ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        helpers.wait_for_port(port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            time.sleep(1.0)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            service = "coursesignup.registration.v1.RegistrationService"
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            try:
                registration_pb2_grpc.RegistrationServiceStub(channel).Register(R.RegisterRequest(
                    name="A", email="a@example.com", course_id="cs101",
                    birth_date=date_pb2.Date(year=1990, month=1, day=1)), timeout=5)
                raise AssertionError("Register answered before the service was ready")
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
