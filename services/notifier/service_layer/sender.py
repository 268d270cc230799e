"""The asyncio task that delivers PENDING notifications, concurrently, over the SMTP pool.

It claims due rows (woken when the consumer commits new ones, and polling every
second as a fallback, which also picks up rows left behind by a crashed process once
their claim lease expires), keeps up to `capacity` sends in flight, and records the
outcomes in batches: SENT, retry later (transient failure: backoff with jitter), or
FAILED (permanent failure, invalid recipient, or out of attempts). All database work
runs in threads (asyncio.to_thread); the consumer's checkpoint never waits for SMTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Protocol

from libs.logs import pseudonym
from services.notifier.domain.messages import validate_recipient
from services.notifier.domain.model import (
    ClaimedNotification,
    Delivered,
    DeliveryError,
    GaveUp,
    Notification,
    Outcome,
    RetryLater,
    RetryPolicy,
    TransientDeliveryError,
)

log = logging.getLogger(__name__)


class Mailer(Protocol):
    max_connections: int

    async def send(self, message: EmailMessage, recipient: str) -> None: ...


class Store(Protocol):
    def claim_due(self, *, now: float, limit: int, lease_seconds: float) -> list[ClaimedNotification]: ...

    def record_outcomes(self, outcomes: list[Outcome]) -> None: ...

    def release(self, claims: list[ClaimedNotification], now: float) -> None: ...


# Builds the message for a notification and its validated recipient address.
Composer = Callable[[Notification, str], EmailMessage]


class Sender:
    def __init__(
        self,
        *,
        store: Store,
        mailer: Mailer,
        compose: Composer,
        retry: RetryPolicy | None = None,
        capacity: int | None = None,
        claim_lease_seconds: float | None = None,
        poll_seconds: float = 1.0,
        send_timeout_seconds: float = 10.0,
        record_window_seconds: float = 0.05,
    ) -> None:
        self._store = store
        self._mailer = mailer
        self._compose = compose
        self._retry = retry or RetryPolicy()
        # Messages queued per connection keep every connection busy, and claiming in
        # larger batches means fewer database transactions competing for the GIL.
        self._capacity = capacity or mailer.max_connections * 8
        # A claim must outlive the wait for a connection plus the send itself.
        queue_depth = self._capacity / mailer.max_connections
        self._claim_lease = claim_lease_seconds or send_timeout_seconds * (queue_depth + 2) + 5
        self._poll_seconds = poll_seconds
        self._record_window = record_window_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._waiting_for_slots = False
        self._in_flight: dict[asyncio.Task[None], ClaimedNotification] = {}
        self._outcomes: list[Outcome] = []
        self._outcomes_ready = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._recorder: asyncio.Task[None] | None = None
        self.sent = 0

    # lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._recorder = self._loop.create_task(self._record_outcomes(), name="notifier-recorder")
        self._task = self._loop.create_task(self._run(), name="notifier-sender")

    def wake_threadsafe(self) -> None:
        """Called from the consumer's thread after it committed new notifications."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:
            pass  # the loop is closing; polling after a restart picks the rows up

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stops claiming, lets sends in flight finish for `grace_seconds`, records outcomes."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._in_flight:
            _, unfinished = await asyncio.wait(list(self._in_flight), timeout=grace_seconds)
            interrupted = [self._in_flight[task] for task in unfinished]
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            if interrupted:
                log.info("sends interrupted by shutdown", extra={"count": len(interrupted)})
                try:
                    await asyncio.to_thread(self._store.release, interrupted, time.time())
                except Exception:
                    log.exception("could not release interrupted claims")
        self._closing = True
        self._outcomes_ready.set()
        if self._recorder is not None:
            await self._recorder

    # claiming ---------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self._capacity - len(self._in_flight)
            claimed: list[ClaimedNotification] = []
            if free > 0:
                try:
                    claimed = await asyncio.to_thread(
                        self._store.claim_due, now=time.time(), limit=free, lease_seconds=self._claim_lease
                    )
                except Exception as error:  # noqa: BLE001 - the database may come back
                    log.warning("claiming notifications failed",
                                extra={"error": f"{type(error).__name__}: {str(error)[:300]}"})
                for claim in claimed:
                    task = asyncio.create_task(self._deliver(claim))
                    self._in_flight[task] = claim
                    task.add_done_callback(self._finished)
                if claimed and len(claimed) == free:
                    continue  # more may be due right now
            else:
                self._waiting_for_slots = True
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            except TimeoutError:
                pass

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if self._waiting_for_slots and len(self._in_flight) <= self._capacity // 2:
            self._waiting_for_slots = False
            self._wake.set()

    # sending ------------------------------------------------------------------------

    async def _deliver(self, claim: ClaimedNotification) -> None:
        notification = claim.notification
        try:
            recipient = validate_recipient(notification.recipient)
            message = self._compose(notification, recipient)
            await self._mailer.send(message, recipient)
        except DeliveryError as error:
            outcome = self._retry.after_failure(claim, error, time.time())
        except Exception as error:
            log.exception("unexpected error sending a notification",
                          extra={"registration_id": notification.registration_id})
            outcome = self._retry.after_failure(
                claim, TransientDeliveryError(f"unexpected error: {type(error).__name__}: {error}"), time.time()
            )
        else:
            outcome = Delivered(claim.id, claim.attempt, datetime.now(UTC))
        self._log(claim, outcome)
        self._outcomes.append(outcome)
        self._outcomes_ready.set()

    @staticmethod
    def _log(claim: ClaimedNotification, outcome: Outcome) -> None:
        notification = claim.notification
        fields = {
            "registration_id": notification.registration_id,
            "kind": notification.kind.value,
            "recipient": pseudonym(notification.recipient),
            "attempt": claim.attempt,
        }
        if isinstance(outcome, Delivered):
            log.debug("notification sent", extra=fields)
        elif isinstance(outcome, RetryLater):
            log.info("notification will be retried",
                     extra={**fields, "error": outcome.error[:300],
                            "retry_in_seconds": round(outcome.next_attempt_at - time.time(), 2)})
        elif isinstance(outcome, GaveUp):
            log.warning("notification failed", extra={**fields, "error": outcome.error[:300]})

    # recording ------------------------------------------------------------------------

    async def _record_outcomes(self) -> None:
        """Writes outcomes in batches: whatever accumulated in a short window."""
        failures = 0
        while True:
            await self._outcomes_ready.wait()
            if not self._closing:
                # Gather a few more outcomes per transaction.
                await asyncio.sleep(self._record_window)
            self._outcomes_ready.clear()
            batch, self._outcomes = self._outcomes, []
            if batch:
                try:
                    await asyncio.to_thread(self._store.record_outcomes, batch)
                    self.sent += sum(isinstance(o, Delivered) for o in batch)
                    failures = 0
                except Exception as error:  # noqa: BLE001 - keep them and try again
                    failures += 1
                    log.warning("recording outcomes failed",
                                extra={"error": f"{type(error).__name__}: {str(error)[:300]}",
                                       "count": len(batch)})
                    if self._closing and failures >= 3:
                        # Unrecorded rows stay claimed; they are sent again after the lease.
                        return
                    self._outcomes[:0] = batch
                    await asyncio.sleep(min(5.0, 0.2 * 2**failures))
                    self._outcomes_ready.set()
                    continue
            if self._closing and not self._outcomes:
                return
