"""`make run` as a user runs it: the whole mesh comes up, Ctrl-C stops it all, data survives."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
from google.type import date_pb2

from coursesignup.registration.v1 import registration_pb2 as R
from coursesignup.registration.v1 import registration_pb2_grpc
from dev.ports import listening
from dev.secrets import SECRET_VARIABLES
from tests.helpers import ROOT

pytestmark = pytest.mark.e2e

PORTS = {"registration": 50051, "enrollment": 50052, "stats": 50053, "notifier": 50054,
         "kinesis": 4567, "smtp": 1025}


@contextlib.contextmanager
def make_run(output: list[str]) -> Iterator[subprocess.Popen[str]]:
    # As a user's shell has it: none of the tokens and keys the tests give their services
    # (make run uses var/admin-token and var/secrets.env).
    env = {k: v for k, v in os.environ.items() if k not in {"ADMIN_TOKENS", "ADMIN_TOKEN", *SECRET_VARIABLES}}
    process = subprocess.Popen(
        ["make", "--no-print-directory", "run"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env=env,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 180
        assert process.stdout is not None
        os.set_blocking(process.stdout.fileno(), False)
        while not any("RegistrationService/Register" in line for line in output):
            if time.monotonic() > deadline or process.poll() is not None:
                raise AssertionError("make run did not come up:\n" + "".join(output[-60:]))
            chunk = process.stdout.readline()
            if chunk:
                output.append(chunk)
            else:
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)  # honcho stops what it started
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def ctrl_c(process: subprocess.Popen[str]) -> float:
    """Sends SIGINT to the foreground process group, as a terminal does; returns seconds to stop."""
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=30)
    while any(listening(port) for port in PORTS.values()) and time.monotonic() - started < 30:
        time.sleep(0.2)
    return time.monotonic() - started


def decided(stub: registration_pb2_grpc.RegistrationServiceStub, registration_id: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = stub.GetRegistration(R.GetRegistrationRequest(registration_id=registration_id), timeout=5).status
        if status != R.REGISTRATION_STATUS_PENDING:
            return int(status)
        time.sleep(0.3)
    raise AssertionError("not decided")


def test_make_run_serves_the_demo_stops_on_ctrl_c_and_keeps_its_data():
    busy = [name for name, port in PORTS.items() if listening(port)]
    if busy:
        pytest.skip(f"default ports in use by something else ({', '.join(busy)}); is a `make run` up?")
    var = ROOT / "var"
    output: list[str] = []
    with make_run(output) as process:
        assert all(listening(port) for port in PORTS.values())
        text = "".join(output)
        assert "127.0.0.1:50051" in text and "grpcurl" in text
        with grpc.insecure_channel("127.0.0.1:50051") as channel:
            stub = registration_pb2_grpc.RegistrationServiceStub(channel)
            reply = stub.Register(R.RegisterRequest(
                name="Make Run", email=f"make-run-{time.time_ns()}@example.com", course_id="cs101",
                birth_date=date_pb2.Date(year=1999, month=9, day=9)), timeout=10)
            first_status = decided(stub, reply.registration_id)
        assert first_status in (R.REGISTRATION_STATUS_ENROLLED, R.REGISTRATION_STATUS_DECLINED_FULL)
        stop_seconds = ctrl_c(process)
    assert process.returncode is not None
    assert not [name for name, port in PORTS.items() if listening(port)], "something still listens"
    assert stop_seconds < 20
    assert (var / "enrollment.db").exists() and (var / "kinesis").exists() and (var / "mail" / "new").exists()

    output.clear()
    with make_run(output) as process:
        with grpc.insecure_channel("127.0.0.1:50051") as channel:
            stub = registration_pb2_grpc.RegistrationServiceStub(channel)
            assert decided(stub, reply.registration_id) == first_status  # the data survived the restart
        ctrl_c(process)


def readme_examples() -> str:
    """The README's grpcurl examples: the first sh block after "Try it while `make run` is up"."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("Try it while `make run` is up"):]
    block = after[after.index("```sh\n") + len("```sh\n"):]
    return block[:block.index("```\n")]


def test_the_readme_examples_run_as_pasted_in_order_on_make_run_twice():
    busy = [name for name, port in PORTS.items() if listening(port)]
    if busy:
        pytest.skip(f"default ports in use by something else ({', '.join(busy)}); is a `make run` up?")
    examples = readme_examples()
    assert "<" not in examples.replace("<<", ""), "a placeholder the reader would have to replace"
    output: list[str] = []
    with make_run(output) as process:
        for attempt in range(2):  # pasted again in the same shell session's way: nothing breaks
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", examples], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, (attempt, done.stdout[-3000:], done.stderr[-3000:])
            registration_id = done.stdout.split("\n", 1)[0] if done.stdout.startswith("reg_") else \
                next(line for line in done.stdout.splitlines() if line.startswith("reg_"))
            assert f'"registration_id": "{registration_id}"' in done.stdout  # GetRegistration found it
            assert "REGISTRATION_STATUS_" in done.stdout and '"status": "SERVING"' in done.stdout
        ctrl_c(process)
