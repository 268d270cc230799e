"""Delivery figures for operators: counters kept by the sender, and a periodic JSON log line.

The counters are this process's since it started; the queue figures (pending, due,
retrying, failed) come from the database, so they cover every notifier process that
shares it. The same snapshot answers GetDeliveryStats and goes into the log line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from services.notifier.domain.model import QueueStats

log = logging.getLogger(__name__)


@dataclass
class DeliveryCounters:
    """What one sender did since `start_time`: one count per attempt outcome."""

    start_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Accepted by the SMTP server.
    sent: int = 0
    # Recorded as permanently failed (refused, invalid address, out of attempts).
    failed: int = 0
    # Failed transiently and scheduled for another attempt.
    retried: int = 0


@dataclass(frozen=True)
class DeliveryStats:
    counters: DeliveryCounters
    in_flight: int
    queue: QueueStats

    def log_fields(self) -> dict[str, float | int | str]:
        return {
            "since": self.counters.start_time.isoformat(),
            "sent": self.counters.sent,
            "failed": self.counters.failed,
            "retried": self.counters.retried,
            "in_flight": self.in_flight,
            "pending": self.queue.pending,
            "due": self.queue.due,
            "retrying": self.queue.retrying,
            "failed_total": self.queue.failed,
            "oldest_pending_seconds": round(self.queue.oldest_pending_seconds, 3),
        }


async def collect(counters: DeliveryCounters, in_flight: int,
                  queue_stats: Callable[[float], QueueStats]) -> DeliveryStats:
    """This process's counters (copied now) and the queue, read from the database in a thread."""
    copy = dataclasses.replace(counters)
    queue = await asyncio.to_thread(queue_stats, time.time())
    return DeliveryStats(copy, in_flight, queue)


async def log_periodically(
    stats: Callable[[], Awaitable[DeliveryStats]], interval_seconds: float, stop: asyncio.Event
) -> None:
    """Logs one "notifier metrics" line every `interval_seconds` until `stop` is set."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_seconds)
            return
        except TimeoutError:
            pass
        try:
            figures = await stats()
        except Exception as error:  # noqa: BLE001 - the database may be down; try next time
            log.warning("could not read delivery metrics",
                        extra={"error": f"{type(error).__name__}: {str(error)[:300]}"})
            continue
        log.info("notifier metrics", extra=figures.log_fields())
