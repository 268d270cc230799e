"""The one backoff for every retry in the mesh, built on tenacity.

After failed attempt n (1-based) the delay is drawn uniformly from [c/2, c], where
c = min(cap, base * 2**(n-1)): exponential growth, capped, with enough jitter that
workers failing together do not retry together, and never less than half the ceiling
(so a run of retries cannot collapse into a busy loop the way full jitter can).

The delay is one tenacity wait object (a fixed part plus tenacity's random exponential),
used two ways:
- `Backoff.retrying` / `Backoff.async_retrying`: a tenacity retry loop for call sites
  that retry a call in place (stop after attempts and/or a deadline, which errors
  retry, a log line per retry);
- `Backoff.delay(n)`: the same formula for call sites that only schedule the next
  attempt themselves (a per-record timer, a shard's not-before time, an email's
  persisted next attempt).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_base,
    stop_after_attempt,
    stop_after_delay,
    stop_any,
    stop_never,
    wait_exponential,
    wait_random_exponential,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

__all__ = ["DEPENDENCY_WAIT_BACKOFF", "DEPENDENCY_WAIT_SECONDS", "Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: after attempt n, U(c/2, c), c = min(cap, base * 2**(n-1))."""

    base_seconds: float
    cap_seconds: float
    wait: wait_base = field(init=False, repr=False, compare=False)
    _floor: wait_base = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.base_seconds <= self.cap_seconds:
            raise ValueError(f"backoff needs 0 < base <= cap, got base={self.base_seconds} cap={self.cap_seconds}")
        half_base, half_cap = self.base_seconds / 2, self.cap_seconds / 2
        # c/2 fixed plus U(0, c/2): tenacity's exponential and random exponential share the ceiling.
        floor = wait_exponential(multiplier=half_base, max=half_cap)
        object.__setattr__(self, "_floor", floor)
        object.__setattr__(self, "wait", floor + wait_random_exponential(multiplier=half_base, max=half_cap))

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return float(self.wait(_after_attempt(attempt)))

    def ceiling(self, attempt: int) -> float:
        """The largest delay `delay(attempt)` can return (the smallest is half of it)."""
        return 2 * float(self._floor(_after_attempt(attempt)))

    def retrying(self, *, retry: retry_base, **limits: Any) -> Retrying:
        """A tenacity loop with this backoff: the last error is re-raised once it stops.

        `limits`: `attempts`, `deadline_seconds` (either ends the loop), `log`, `message`
        and `extra` (one warning per retry, with the error and the delay); anything else
        goes to tenacity (`sleep`, `retry_error_callback`, ...).
        """
        return Retrying(**self._options(retry, **limits))

    def async_retrying(self, *, retry: retry_base, **limits: Any) -> AsyncRetrying:
        """The asyncio form of `retrying`."""
        return AsyncRetrying(**self._options(retry, **limits))

    def _options(
        self,
        retry: retry_base,
        attempts: int | None = None,
        deadline_seconds: float | None = None,
        log: logging.Logger | None = None,
        message: str = "retrying",
        extra: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        return {
            "wait": self.wait,
            "stop": _stop(attempts, deadline_seconds),
            "retry": retry,
            "reraise": True,
            "before_sleep": _log_retry(log, message, extra) if log else None,
            **options,
        }


def _after_attempt(attempt: int) -> RetryCallState:
    """The state tenacity's wait strategies see after failed attempt `attempt`."""
    if attempt < 1:
        raise ValueError(f"attempts are numbered from 1, got {attempt}")
    state = RetryCallState(cast(Any, None), None, (), {})
    state.attempt_number = attempt
    return state


def _stop(attempts: int | None, deadline_seconds: float | None) -> stop_base:
    stops: list[stop_base] = []
    if attempts is not None:
        stops.append(stop_after_attempt(attempts))
    if deadline_seconds is not None:
        stops.append(stop_after_delay(deadline_seconds))
    return stop_any(*stops) if stops else stop_never


def _log_retry(
    log: logging.Logger, message: str, extra: Mapping[str, Any] | None
) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        fields: dict[str, Any] = {**(extra or {}), "attempt": state.attempt_number}
        if state.next_action is not None:
            fields["retry_in_seconds"] = round(state.next_action.sleep, 2)
        if state.outcome is not None and state.outcome.failed:
            error = state.outcome.exception()
            fields["error"] = f"{type(error).__name__}: {str(getattr(error, 'orig', None) or error)[:300]}"
        log.warning(message, extra=fields)

    return before_sleep


# How a service starting waits for what it depends on (its database, Kinesis), the same
# way for each: a dependency that starts later or restarts meanwhile is waited for, with
# one log line per retry, health NOT_SERVING, instead of the service exiting.
DEPENDENCY_WAIT_BACKOFF = Backoff(base_seconds=0.2, cap_seconds=5.0)
DEPENDENCY_WAIT_SECONDS = 300.0
