"""The notifier's retry rules and claim timing, without I/O: backoff with jitter, attempts, claim lease."""

from __future__ import annotations

import asyncio
import random

import pytest

from services.notifier.domain.model import (
    ClaimedNotification,
    GaveUp,
    Notification,
    NotificationKind,
    Outcome,
    PermanentDeliveryError,
    RetryLater,
    RetryPolicy,
    TransientDeliveryError,
)
from services.notifier.service_layer.sender import Sender
from services.notifier.settings import NotifierSettings

NOTIFICATION = Notification("reg-1", NotificationKind.ENROLLED, "ana@example.com", "en", "Ana", "c1", "Physics")


def _claim(attempt: int) -> ClaimedNotification:
    return ClaimedNotification(7, attempt, NOTIFICATION)


def test_backoff_doubles_per_attempt_with_jitter_between_half_and_all_of_it_up_to_the_cap() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_seconds=0.5, max_delay_seconds=3.0)
    random.seed(5)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        delays = [policy.delay(attempt) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 4, "jittered, so retries do not arrive in lockstep"


def test_a_transient_failure_is_retried_until_the_attempts_run_out() -> None:
    policy = RetryPolicy(max_attempts=3, base_delay_seconds=1.0)
    error = TransientDeliveryError("451 4.3.0 busy")
    retry = policy.after_failure(_claim(2), error, now=1000.0)
    assert isinstance(retry, RetryLater)
    assert 1001.0 <= retry.next_attempt_at <= 1002.0
    assert retry.error == "451 4.3.0 busy"
    assert policy.after_failure(_claim(3), error, now=1000.0) == GaveUp(7, 3, "451 4.3.0 busy")


def test_a_permanent_failure_is_never_retried() -> None:
    outcome = RetryPolicy(max_attempts=5).after_failure(_claim(1), PermanentDeliveryError("550 no such user"), 0.0)
    assert outcome == GaveUp(7, 1, "550 no such user")


class _RecordingStore:
    def __init__(self) -> None:
        self.leases: list[float] = []

    def claim_due(self, *, now: float, limit: int, lease_seconds: float) -> list[ClaimedNotification]:
        self.leases.append(lease_seconds)
        return []

    def record_outcomes(self, outcomes: list[Outcome]) -> None:
        pass

    def release(self, claims: list[ClaimedNotification], now: float) -> None:
        pass


class _IdleMailer:
    max_connections = 2

    async def send(self, message: bytes, recipient: str) -> None:
        raise AssertionError("nothing to send")


def _first_claim_lease(**options: float | None) -> float:
    store = _RecordingStore()

    async def run() -> None:
        sender = Sender(store=store, mailer=_IdleMailer(), compose=lambda n, r: b"", **options)  # type: ignore[arg-type]
        sender.start()
        while not store.leases:
            await asyncio.sleep(0.01)
        await sender.stop()

    asyncio.run(run())
    return store.leases[0]


def test_a_claim_lasts_twice_the_smtp_timeout_plus_five_seconds_unless_configured() -> None:
    assert _first_claim_lease(send_timeout_seconds=10.0) == 25.0
    assert _first_claim_lease(send_timeout_seconds=2.0) == 9.0
    assert _first_claim_lease(send_timeout_seconds=2.0, claim_lease_seconds=4.0) == 4.0


def test_a_claim_lease_no_longer_than_the_smtp_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than the SMTP timeout"):
        Sender(store=_RecordingStore(), mailer=_IdleMailer(), compose=lambda n, r: b"",
               send_timeout_seconds=10.0, claim_lease_seconds=10.0)


def test_retry_and_claim_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"NOTIFIER_MAX_ATTEMPTS": "3", "NOTIFIER_RETRY_BASE_SECONDS": "0.25",
                       "NOTIFIER_RETRY_MAX_SECONDS": "30", "NOTIFIER_CLAIM_SECONDS": "40",
                       "NOTIFIER_METRICS_LOG_SECONDS": "15"}.items():
        monkeypatch.setenv(key, value)
    settings = NotifierSettings()
    assert (settings.notifier_max_attempts, settings.notifier_retry_base_seconds, settings.notifier_retry_max_seconds,
            settings.notifier_claim_seconds, settings.notifier_metrics_log_seconds) == (3, 0.25, 30.0, 40.0, 15.0)
    assert NotifierSettings.model_fields["notifier_claim_seconds"].default is None
