"""The registration service's settings: the shared `CommonSettings` and its own."""

from __future__ import annotations

import os

from pydantic import Field

from libs.config import CommonSettings, Secret


class RegistrationSettings(CommonSettings):
    registration_port: int = 50051
    # Prometheus /metrics over HTTP on BIND_HOST; 0 turns it off.
    registration_metrics_port: int = Field(default=9451, ge=0, le=65535)
    # Where the enrollment service answers catalogue and decision queries.
    enrollment_target: str = "127.0.0.1:50052"
    # Key that signs registration ids: set the same secret on every registration
    # instance; changing it makes earlier ids NOT_FOUND.
    registration_id_secret: Secret
    # Whether the notifier's mail relay supports SMTPUTF8 (RFC 6531). False: Register
    # refuses addresses whose mailbox name is outside ASCII, which could not be delivered.
    register_internationalized_mailboxes: bool = True
    # How long Register waits to gather a PutRecords batch.
    register_batch_millis: float = 2.0
    # PutRecords calls in flight per stream; while they are busy, records queue up and
    # leave together (group commit), so fewer in flight means bigger batches.
    register_max_in_flight: int = Field(default=1, ge=1, le=32)
    # Worker processes sharing the port (SO_REUSEPORT); one process is one core at most
    # (the GIL). 1 serves in this process; 0 means one per CPU this process may use.
    registration_processes: int = Field(default=1, ge=0, le=64)
    # Register calls in progress per process beyond which new ones are answered
    # RESOURCE_EXHAUSTED with a RetryInfo, well before gRPC's per-connection stream limit
    # (1000) refuses streams; it bounds Register's latency under overload.
    register_max_pending: int = Field(default=256, ge=1, le=900)
    # The retry delay Register's RESOURCE_EXHAUSTED suggests (google.rpc.RetryInfo).
    register_retry_delay_millis: int = Field(default=200, ge=0)

    def worker_processes(self) -> int:
        if self.registration_processes:
            return self.registration_processes
        return len(os.sched_getaffinity(0))
