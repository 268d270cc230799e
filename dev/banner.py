"""Waits until the local mesh is healthy, then says where everything listens."""

from __future__ import annotations

import os
import signal
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dev.ports import listening

SERVICES = [
    ("registration", int(os.environ.get("REGISTRATION_PORT", 50051))),
    ("enrollment", int(os.environ.get("ENROLLMENT_PORT", 50052))),
    ("stats", int(os.environ.get("STATS_PORT", 50053))),
    ("notifier", int(os.environ.get("NOTIFIER_PORT", 50054))),
]


def serving(port: int) -> bool:
    if not listening(port):
        return False
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    deadline = time.monotonic() + 120
    waiting = dict(SERVICES)
    while waiting and time.monotonic() < deadline:
        for name, port in list(waiting.items()):
            if serving(port):
                del waiting[name]
        time.sleep(0.5)
    if waiting:
        print(f"not healthy after 2 minutes: {', '.join(waiting)}; see the logs above", flush=True)
    lines = ["", "course-signup is running (Ctrl-C stops everything):"]
    lines += [f"  {name:<13} 127.0.0.1:{port}" for name, port in SERVICES]
    lines += [
        "  kinesis        http://127.0.0.1:4567 (kinesalite, data in var/kinesis)",
        "  smtp           127.0.0.1:1025 (every email lands in the Maildir var/mail/new)",
        "",
        "Try:",
        "  .venv/bin/grpcurl -plaintext 127.0.0.1:50052 coursesignup.enrollment.v1.EnrollmentService/ListCourses",
        "  .venv/bin/grpcurl -plaintext -d '{\"name\": \"Ada Lovelace\", \"birth_date\": {\"year\": 1990, "
        "\"month\": 12, \"day\": 10}, \"course_id\": \"cs101\", \"email\": \"ada@example.com\"}' "
        "127.0.0.1:50051 coursesignup.registration.v1.RegistrationService/Register",
        "",
        "Catalogue writes and personal-data reads need the admin token (var/admin-token):",
        "  .venv/bin/grpcurl -plaintext -H \"authorization: Bearer $(cat var/admin-token)\" -d "
        "'{\"campus\": {\"campus_id\": \"online\", \"name\": \"Online\"}}' "
        "127.0.0.1:50052 coursesignup.enrollment.v1.EnrollmentService/CreateCampus",
        "",
    ]
    print("\n".join(lines), flush=True)
    signal.pause()


if __name__ == "__main__":
    main()
