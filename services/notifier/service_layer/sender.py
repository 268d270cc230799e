"""The asyncio task that delivers PENDING notifications, concurrently, over the SMTP pool.

It claims due rows (woken when the consumer commits new ones, and polling every
second as a fallback, which also picks up rows left behind by a crashed process once
their claim lease expires), keeps up to `capacity` claimed rows in hand and one send
per SMTP connection in progress, and records the outcomes in batches: SENT, retry
later (transient failure: backoff with jitter), or FAILED (permanent failure, invalid
recipient, or out of attempts). All database work runs in threads (asyncio.to_thread);
the consumer's checkpoint never waits for SMTP.

Each attempt is a span (tracing on, libs.tracing), child of the notification's stored
traceparent (the consumer span that recorded it), so the email ends the registration's
trace. A sent email's lag (from the fact's time: Register's acceptance, the decision) is
observed in `coursesignup_email_lag_seconds`.

A claim lasts `claim_lease_seconds` (by default twice the SMTP timeout plus 5 s, so a
crashed sender's rows are picked up again within that time). A claimed row waiting
for a connection behind slow sends is not sent once the send could outlast its claim
(another sender might take the row then): it is handed back, its attempt uncounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Histogram

from libs import tracing
from libs.backoff import Backoff
from libs.logs import pseudonym
from libs.metrics import LAG_BUCKETS
from services.notifier.domain.messages import validate_recipient
from services.notifier.domain.model import (
    ClaimedNotification,
    Delivered,
    DeliveryError,
    GaveUp,
    NotAttempted,
    Notification,
    Outcome,
    RetryLater,
    RetryPolicy,
    TransientDeliveryError,
)
from services.notifier.service_layer.metrics import DeliveryCounters

log = logging.getLogger(__name__)

EMAILS = Counter("coursesignup_emails_total", "Email attempts by notification kind and outcome "
                 "(sent; retry: a transient failure, tried again later; failed: given up).", ["kind", "outcome"])
_OUTCOME_LABEL = {Delivered: "sent", RetryLater: "retry", GaveUp: "failed"}
EMAIL_LAG = Histogram("coursesignup_email_lag_seconds", "Time from the fact an email tells of (Register's acceptance "
                      "for the received email, the decision for the others) to the email being sent, by kind.",
                      ["kind"], buckets=LAG_BUCKETS)

# Writing outcomes failed (database down): the batch is kept and written again after this.
RECORDING_BACKOFF = Backoff(base_seconds=0.4, cap_seconds=5.0)


class Mailer(Protocol):
    max_connections: int

    async def send(self, message: bytes, recipient: str) -> None: ...


class Store(Protocol):
    def claim_due(self, *, now: float, limit: int, lease_seconds: float) -> list[ClaimedNotification]: ...

    def record_outcomes(self, outcomes: list[Outcome]) -> None: ...

    def release(self, claims: list[ClaimedNotification], now: float) -> None: ...


# Builds the message (bytes to send) for a notification and its validated recipient address.
Composer = Callable[[Notification, str], bytes]


def _without_address(text: str, address: str) -> str:
    """`text` (an SMTP reply or error, which often quotes the recipient) fit for a log:
    the address as given, as normalized, and its local part become its pseudonym."""
    forms = {address.strip()}
    with contextlib.suppress(DeliveryError):
        forms.add(validate_recipient(address))
    forms |= {form.rpartition("@")[0] for form in forms if len(form.rpartition("@")[0]) >= 3}
    forms.discard("")
    if not forms:
        return text
    pattern = re.compile("|".join(re.escape(form) for form in sorted(forms, key=len, reverse=True)), re.IGNORECASE)
    return pattern.sub(pseudonym(address), text)


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
        self._capacity = capacity or mailer.max_connections * 16
        self._send_timeout = send_timeout_seconds
        self._claim_lease = claim_lease_seconds or 2 * send_timeout_seconds + 5
        if self._claim_lease <= send_timeout_seconds:
            raise ValueError("the claim lease must be longer than the SMTP timeout")
        # A send starts only if it ends (at the latest) this long before the claim lapses,
        # leaving time to record its outcome.
        self._record_slack = (self._claim_lease - send_timeout_seconds) / 2
        self._send_slots = asyncio.Semaphore(mailer.max_connections)
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
        self.counters = DeliveryCounters()

    @property
    def sent(self) -> int:
        return self.counters.sent

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

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
        """Stops claiming, lets sends in progress finish for `grace_seconds` (claimed rows not
        yet sending are handed back at once), records outcomes."""
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
        # Claims come in batches (fewer transactions competing for the GIL): once half
        # the capacity is free again, or whenever nothing is in hand.
        refill_at = max(1, self._capacity // 2)
        while not self._stopping:
            self._wake.clear()
            free = self._capacity - len(self._in_flight)
            if free >= refill_at or (free > 0 and not self._in_flight):
                claimed = await self._claim(free)
                if claimed == free:
                    # More may be due right now: claim again as soon as there is room.
                    self._waiting_for_slots = True
                    if self._capacity - len(self._in_flight) >= refill_at:
                        continue
            else:
                self._waiting_for_slots = True
            try:
                await asyncio.wait_for(self._wake.wait(), self._poll_seconds)
            except TimeoutError:
                pass

    async def _claim(self, limit: int) -> int:
        try:
            claimed = await asyncio.to_thread(
                self._store.claim_due, now=time.time(), limit=limit, lease_seconds=self._claim_lease
            )
        except Exception as error:  # noqa: BLE001 - the database may come back
            log.warning("claiming notifications failed",
                        extra={"error": f"{type(error).__name__}: {str(error)[:300]}"})
            return 0
        for claim in claimed:
            task = asyncio.create_task(self._deliver(claim))
            self._in_flight[task] = claim
            task.add_done_callback(self._finished)
        return len(claimed)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(task, None)
        if self._waiting_for_slots and len(self._in_flight) <= self._capacity // 2:
            self._waiting_for_slots = False
            self._wake.set()

    # sending ------------------------------------------------------------------------

    async def _deliver(self, claim: ClaimedNotification) -> None:
        async with self._send_slots:
            outcome = await self._attempt(claim)
        self._count(outcome)
        if not isinstance(outcome, NotAttempted):
            EMAILS.labels(claim.notification.kind.value, _OUTCOME_LABEL[type(outcome)]).inc()
            if isinstance(outcome, Delivered) and claim.notification.event_time is not None:
                EMAIL_LAG.labels(claim.notification.kind.value).observe(
                    max(0.0, outcome.send_time.timestamp() - claim.notification.event_time))
        self._log(claim, outcome)
        self._outcomes.append(outcome)
        self._outcomes_ready.set()
        if isinstance(outcome, RetryLater | NotAttempted) and self._loop is not None:
            # Claim it again once it is due and recorded, rather than at the next poll.
            due = outcome.next_attempt_at if isinstance(outcome, RetryLater) else time.time()
            self._loop.call_later(max(0.0, due - time.time()) + self._record_window * 2, self._wake.set)

    async def _attempt(self, claim: ClaimedNotification) -> Outcome:
        # Shutting down, or too late to finish before the claim lapses: hand it back unsent.
        if self._stopping or time.time() + self._send_timeout > claim.claimed_until - self._record_slack:
            return NotAttempted(claim.id, claim.attempt)
        span = tracing.start_span("send email", {"traceparent": claim.notification.trace_parent}, SpanKind.CLIENT, {
            "coursesignup.notification.kind": claim.notification.kind.value,
            "coursesignup.registration_id": claim.notification.registration_id,
            "coursesignup.attempt": claim.attempt,
        }) if tracing.enabled() else None
        if span is None:
            return await self._send(claim)
        outcome_label = "interrupted"  # cancelled by shutdown
        try:
            outcome = await self._send(claim)
            outcome_label = _OUTCOME_LABEL[type(outcome)]
            return outcome
        finally:
            tracing.end_span(span, None if outcome_label == "sent" else outcome_label,
                             **{"coursesignup.outcome": outcome_label})

    async def _send(self, claim: ClaimedNotification) -> Outcome:
        notification = claim.notification
        try:
            recipient = validate_recipient(notification.recipient)
            message = self._compose(notification, recipient)
            await self._mailer.send(message, recipient)
        except DeliveryError as error:
            return self._retry.after_failure(claim, error, time.time())
        except Exception as error:
            # Not log.exception: the exception's message may quote the address.
            log.error("unexpected error sending a notification",
                      extra={"registration_id": notification.registration_id,
                             "error": _without_address(f"{type(error).__name__}: {error}"[:300],
                                                       notification.recipient),
                             "traceback": "".join(traceback.format_tb(error.__traceback__))[-3000:]})
            return self._retry.after_failure(
                claim, TransientDeliveryError(f"unexpected error: {type(error).__name__}: {error}"), time.time()
            )
        return Delivered(claim.id, claim.attempt, datetime.now(UTC))

    def _count(self, outcome: Outcome) -> None:  # the figures GetDeliveryStats reports
        if isinstance(outcome, Delivered):
            self.counters.sent += 1
        elif isinstance(outcome, RetryLater):
            self.counters.retried += 1
        elif isinstance(outcome, GaveUp):
            self.counters.failed += 1

    @staticmethod
    def _log(claim: ClaimedNotification, outcome: Outcome) -> None:
        if isinstance(outcome, Delivered) and not log.isEnabledFor(logging.DEBUG):
            return  # the common case, thousands a second: skip building the fields
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
                     extra={**fields, "error": _without_address(outcome.error[:300], notification.recipient),
                            "retry_in_seconds": round(outcome.next_attempt_at - time.time(), 2)})
        elif isinstance(outcome, GaveUp):
            log.warning("notification failed",
                        extra={**fields, "error": _without_address(outcome.error[:300], notification.recipient)})
        elif isinstance(outcome, NotAttempted):
            log.info("notification handed back unsent: its claim would lapse during the send", extra=fields)

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
                    await asyncio.sleep(RECORDING_BACKOFF.delay(failures))
                    self._outcomes_ready.set()
                    continue
            if self._closing and not self._outcomes:
                return
