"""Following a registration until it is decided.

The API has no WatchRegistration stream yet (issue 11), so `PollingWatcher` asks
GetRegistration again with a growing delay (the mesh's one `Backoff`) and yields each
change of status. A streaming watcher only has to yield the same `Registration` messages
from WatchRegistration to take its place: the command depends on `RegistrationWatcher`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from coursesignup.registration.v1 import registration_pb2
from libs.backoff import Backoff

R = registration_pb2
PENDING = R.REGISTRATION_STATUS_PENDING
# Every status but PENDING is a decision that never changes.
TERMINAL = frozenset({
    R.REGISTRATION_STATUS_ENROLLED,
    R.REGISTRATION_STATUS_DECLINED_FULL,
    R.REGISTRATION_STATUS_DECLINED_DUPLICATE,
    R.REGISTRATION_STATUS_DECLINED_UNKNOWN_COURSE,
})
# Decisions usually come within a second: ask soon, then back off to every few seconds.
POLL_BACKOFF = Backoff(base_seconds=0.2, cap_seconds=3.0)


class WatchTimeout(Exception):
    """No decision within the time the user allowed."""


class RegistrationWatcher(Protocol):
    def updates(self, registration_id: str, deadline: float) -> Iterator[Any]:
        """Yields the registration now and at each change of status, ending after a terminal
        one; raises WatchTimeout once `time.monotonic()` passes `deadline`."""
        ...


class PollingWatcher:
    def __init__(self, registration: Any, call_timeout: float, backoff: Backoff = POLL_BACKOFF,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._registration = registration
        self._call_timeout = call_timeout
        self._backoff = backoff
        self._sleep = sleep

    def updates(self, registration_id: str, deadline: float) -> Iterator[Any]:
        last_status = None
        attempt = 0
        while True:
            remaining = deadline - time.monotonic()
            reply = self._registration.GetRegistration(
                R.GetRegistrationRequest(registration_id=registration_id),
                timeout=max(0.1, min(self._call_timeout, remaining)),
            )
            if reply.status != last_status:
                last_status = reply.status
                attempt = 0
                yield reply
            if reply.status in TERMINAL:
                return
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WatchTimeout(f"still {R.RegistrationStatus.Name(reply.status)} at the deadline")
            self._sleep(min(self._backoff.delay(attempt), remaining))
