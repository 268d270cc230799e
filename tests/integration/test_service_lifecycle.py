"""Health, start-up and shutdown of a real service process."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import grpc
from google.type import date_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from dev.secrets import SECRET_VARIABLES
from services.enrollment.bootstrap import build_hooks as enrollment_hooks
from services.enrollment.settings import EnrollmentSettings
from tests import helpers


def log_lines(path: pathlib.Path, message: str) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("message") == message:
            lines.append(entry)
    return lines


def test_two_registration_processes_share_one_port_both_serve_and_sigterm_stops_all(kinesis_env, tmp_path,
                                                                                     monkeypatch):
    enrollment_port, port, metrics_port = helpers.free_port(), helpers.free_port(), helpers.free_port()
    monkeypatch.setenv("ENROLLMENT_PORT", str(enrollment_port))
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", f"sqlite:///{tmp_path / 'enrollment.db'}")
    monkeypatch.setenv("SEED_DEMO_CATALOGUE", "true")
    env = {**os.environ, "REGISTRATION_PORT": str(port), "REGISTRATION_PROCESSES": "2",
           "REGISTRATION_METRICS_PORT": str(metrics_port),
           "ENROLLMENT_TARGET": f"127.0.0.1:{enrollment_port}", "KINESIS_SHARD_COUNT": "1", "LOG_LEVEL": "INFO"}
    log_path = tmp_path / "registration.log"
    with helpers.serve_in_thread(enrollment_hooks(EnrollmentSettings())), open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.registration"], cwd=helpers.ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            workers = helpers.wait_until(lambda: len(log_lines(log_path, "worker started")) == 2 and
                                         log_lines(log_path, "worker started"), timeout=30, what="2 workers")
            pids = {entry["pid"] for entry in workers}
            # A connection made before a worker has bound the port goes to the other one
            # and stays there: open them once both listen.
            helpers.wait_until(lambda: {entry["pid"] for entry in log_lines(log_path, "listening")} == pids,
                               timeout=60, what="both workers listening")
            # One channel is one TCP connection and sticks to one process: 24 channels of
            # their own (a local subchannel pool each) land on both with near certainty.
            channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                        for _ in range(24)]
            try:
                def all_serving() -> bool:
                    try:
                        return all(health_pb2_grpc.HealthStub(c).Check(health_pb2.HealthCheckRequest(), timeout=2)
                                   .status == health_pb2.HealthCheckResponse.SERVING for c in channels)
                    except grpc.RpcError:
                        return False
                helpers.wait_until(all_serving, timeout=60, what="every connection SERVING")
                calls = 0
                for i, channel in enumerate(channels):
                    for j in range(3):
                        reply = registration_pb2_grpc.RegistrationServiceStub(channel).Register(R.RegisterRequest(
                            name=f"Student {i}", email=f"s{i}-{j}@example.com", course_id="cs101",
                            birth_date=date_pb2.Date(year=1990, month=1, day=1)), timeout=10)
                        assert reply.status == R.REGISTRATION_STATUS_PENDING
                        calls += 1
            finally:
                for channel in channels:
                    channel.close()
            assert all(pathlib.Path(f"/proc/{pid}").exists() for pid in pids)
            # The parent's one /metrics sums both workers' RPC counts.
            samples = helpers.scrape(metrics_port)
            assert helpers.metric_sum(samples, "grpc_server_handled_total", grpc_method="Register",
                                      grpc_code="OK") == calls
            assert helpers.metric_sum(samples, "grpc_server_started_total", grpc_method="Register") == calls
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert not any(pathlib.Path(f"/proc/{pid}").exists() for pid in pids), "a worker outlived its parent"
    stopped = log_lines(log_path, "registration worker stopped")
    assert {entry["pid"] for entry in stopped} == pids
    # Both processes served Register calls, and together all of them.
    assert all(entry["register_accepted"] > 0 for entry in stopped), stopped
    assert sum(entry["register_accepted"] for entry in stopped) == calls


def test_a_service_without_its_secrets_refuses_to_start_naming_each_variable(tmp_path):
    # No secret has a default in the source (make run keeps them in var/secrets.env).
    base = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
    cases = {
        "services.registration": {"REGISTRATION_ID_SECRET", "LOG_PSEUDONYM_KEY"},
        "services.enrollment": {"ENROLLMENT_PAGE_TOKEN_SECRET", "LOG_PSEUDONYM_KEY"},
        "services.stats": {"STATS_PAGE_TOKEN_SECRET", "LOG_PSEUDONYM_KEY"},
        "services.notifier": {"LOG_PSEUDONYM_KEY"},
    }
    for module, missing in cases.items():
        done = subprocess.run([sys.executable, "-m", module], env=base, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2, (module, done.stderr)
        named = {line.split(" ")[2].rstrip(":") for line in done.stderr.splitlines()
                 if line.startswith("configuration error: ")}
        assert named == missing, (module, done.stderr)
        assert "Traceback" not in done.stderr
    # The development default earlier versions had in the source is refused like none.
    retired = {**os.environ, "REGISTRATION_ID_SECRET": "local-development-secret-change-me"}
    done = subprocess.run([sys.executable, "-m", "services.registration"], env=retired, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "REGISTRATION_ID_SECRET is not set (it holds a development default" in done.stderr
    placeholder = {**os.environ, "LOG_PSEUDONYM_KEY": "replace-me-log-pseudonym-key"}
    done = subprocess.run([sys.executable, "-m", "services.notifier"], env=placeholder, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "LOG_PSEUDONYM_KEY holds a placeholder" in done.stderr
