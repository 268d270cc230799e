"""Following a registration with the WatchRegistration stream.

The server sends the registration now and at each change (a WAITLISTED position moving
up included) and ends the stream after a status it never leaves (DECLINED_*,
CANCELLED). `StreamingWatcher` yields those messages, stops earlier at ENROLLED unless
told to follow on, and opens the stream again (skipping what it already showed) if a
registration instance stops under it: any instance serves any registration.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import grpc

from coursesignup.registration.v1 import registration_pb2
from libs.backoff import Backoff

R = registration_pb2
# Statuses a registration never leaves: the server ends the stream after one.
FINAL = frozenset({
    R.REGISTRATION_STATUS_CANCELLED,
    R.REGISTRATION_STATUS_DECLINED_FULL,
    R.REGISTRATION_STATUS_DECLINED_DUPLICATE,
    R.REGISTRATION_STATUS_DECLINED_UNKNOWN_COURSE,
})
# Where a watch "until decided" stops: a seat, or a final status. WAITLISTED is still waiting.
DECIDED = FINAL | {R.REGISTRATION_STATUS_ENROLLED}
# A stream cut by an instance going away is opened again after these delays.
RECONNECT_BACKOFF = Backoff(base_seconds=0.2, cap_seconds=3.0)
_RECONNECT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


class WatchTimeout(Exception):
    """No decision within the time the user allowed."""


class RegistrationWatcher(Protocol):
    def updates(self, registration_id: str, deadline: float) -> Iterator[Any]:
        """Yields the registration now and at each change, ending after the status the
        watcher stops at; raises WatchTimeout once `time.monotonic()` passes `deadline`."""
        ...


class StreamingWatcher:
    def __init__(self, registration: Any, *, until: frozenset[int] = DECIDED, backoff: Backoff = RECONNECT_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._registration = registration
        self._until = until | FINAL
        self._backoff = backoff
        self._sleep = sleep

    def updates(self, registration_id: str, deadline: float) -> Iterator[Any]:
        last: Any = None
        failures = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WatchTimeout(self._still(last))
            call = self._registration.WatchRegistration(
                R.WatchRegistrationRequest(registration_id=registration_id), timeout=remaining)
            try:
                for reply in call:
                    failures = 0
                    if reply == last:
                        continue  # the first message of a re-opened stream: shown already
                    last = reply
                    yield reply
                    if reply.status in self._until:
                        return
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise WatchTimeout(self._still(last)) from None
                if error.code() not in _RECONNECT:
                    raise
            finally:
                call.cancel()
            failures += 1  # ended or cut without a status to stop at: watch again
            self._sleep(min(self._backoff.delay(failures), max(deadline - time.monotonic(), 0)))

    @staticmethod
    def _still(last: Any) -> str:
        if last is None:
            return "nothing received"
        return f"still {R.RegistrationStatus.Name(last.status)} at the deadline"
