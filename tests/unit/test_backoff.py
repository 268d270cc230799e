"""The one backoff: its delays, and the retry loops built on it."""

from __future__ import annotations

import asyncio
import logging
import random
import time

import pytest
from tenacity import retry_if_exception_type, retry_if_result

from libs.backoff import Backoff


def test_delays_double_per_attempt_with_jitter_between_half_and_all_of_the_ceiling() -> None:
    backoff = Backoff(base_seconds=0.5, cap_seconds=3.0)
    random.seed(9)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (5, 3.0), (60, 3.0), (5000, 3.0)]:
        assert backoff.ceiling(attempt) == ceiling
        delays = [backoff.delay(attempt) for _ in range(300)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        # Spread over the whole range, so workers failing together do not retry together.
        assert min(delays) < ceiling * 0.55 and max(delays) > ceiling * 0.95


def test_attempts_are_numbered_from_one_and_base_must_not_exceed_cap() -> None:
    with pytest.raises(ValueError):
        Backoff(base_seconds=0.5, cap_seconds=1.0).delay(0)
    with pytest.raises(ValueError):
        Backoff(base_seconds=2.0, cap_seconds=1.0)
    with pytest.raises(ValueError):
        Backoff(base_seconds=0.0, cap_seconds=1.0)


def test_a_retry_loop_sleeps_the_backoff_delays_and_returns_once_the_call_succeeds() -> None:
    slept: list[float] = []
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise ConnectionError("down")
        return "up"

    retrying = Backoff(base_seconds=0.1, cap_seconds=0.3).retrying(
        retry=retry_if_exception_type(ConnectionError), attempts=10, sleep=slept.append
    )
    assert retrying(flaky) == "up"
    assert calls == 4
    assert len(slept) == 3
    for delay, ceiling in zip(slept, [0.1, 0.2, 0.3]):
        assert ceiling / 2 <= delay <= ceiling


class AlwaysFailing:
    """A call that raises `error_type` every time, counting the calls."""

    def __init__(self, error_type: type[Exception]) -> None:
        self.error_type = error_type
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        raise self.error_type(f"down {self.calls}")


def test_a_retry_loop_stops_after_its_attempts_and_raises_the_last_error() -> None:
    always_down = AlwaysFailing(ConnectionError)
    retrying = Backoff(base_seconds=0.01, cap_seconds=0.01).retrying(
        retry=retry_if_exception_type(ConnectionError), attempts=3, sleep=lambda _s: None
    )
    with pytest.raises(ConnectionError, match="down 3"):
        retrying(always_down)
    assert always_down.calls == 3


def test_errors_that_are_not_retryable_propagate_at_once() -> None:
    broken = AlwaysFailing(KeyError)
    retrying = Backoff(base_seconds=0.01, cap_seconds=0.01).retrying(
        retry=retry_if_exception_type(ConnectionError), attempts=5, sleep=lambda _s: None
    )
    with pytest.raises(KeyError):
        retrying(broken)
    assert broken.calls == 1


def test_a_retry_loop_gives_up_at_its_deadline() -> None:
    always_down = AlwaysFailing(ConnectionError)
    retrying = Backoff(base_seconds=0.02, cap_seconds=0.05).retrying(
        retry=retry_if_exception_type(ConnectionError), deadline_seconds=0.3
    )
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        retrying(always_down)
    elapsed = time.monotonic() - started
    # The deadline is checked after each failure: one more delay (<= cap) at the most.
    assert 0.3 <= elapsed < 0.3 + 0.05 + 0.2
    assert always_down.calls > 3


def test_each_retry_is_logged_with_the_error_and_the_delay(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("refused")

    retrying = Backoff(base_seconds=0.2, cap_seconds=0.2).retrying(
        retry=retry_if_exception_type(ConnectionError), attempts=2, sleep=lambda _s: None,
        log=logging.getLogger("test.backoff"), message="database not reachable; retrying",
        extra={"component": "db"},
    )
    with caplog.at_level(logging.WARNING, logger="test.backoff"):
        retrying(flaky)
    [record] = caplog.records
    assert record.getMessage() == "database not reachable; retrying"
    assert record.__dict__["error"] == "ConnectionError: refused"
    assert 0.1 <= record.__dict__["retry_in_seconds"] <= 0.2
    assert record.__dict__["attempt"] == 1
    assert record.__dict__["component"] == "db"


def test_a_result_can_call_for_a_retry_and_the_last_one_is_kept_when_attempts_run_out() -> None:
    results = iter([[1, 2], [2], [2], [2]])
    retrying = Backoff(base_seconds=0.01, cap_seconds=0.01).retrying(
        retry=retry_if_result(bool), attempts=3, sleep=lambda _s: None,
        retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
    )
    assert retrying(lambda: next(results)) == [2]
    assert next(results) == [2], "three attempts, not four"


def test_the_async_loop_uses_the_same_backoff() -> None:
    calls = 0
    slept: list[float] = []

    async def flaky() -> int:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise TimeoutError
        return calls

    async def record_sleep(seconds: float) -> None:
        slept.append(seconds)

    retrying = Backoff(base_seconds=0.1, cap_seconds=1.0).async_retrying(
        retry=retry_if_exception_type(TimeoutError), attempts=5, sleep=record_sleep
    )
    assert asyncio.run(retrying(flaky)) == 3
    assert 0.05 <= slept[0] <= 0.1 and 0.1 <= slept[1] <= 0.2
