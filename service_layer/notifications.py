"""Delivering the notifications outbox: each message at most once, retried while surely unsent."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import structlog

from domain import notifications as notices
from service_layer.ports import UnitOfWorkFactory

log = structlog.get_logger("credits.notifications")

#: A sender holds a claimed batch this long; one that dies mid-send leaves it `uncertain`.
SEND_LEASE = timedelta(minutes=10)
RETRY_BACKOFF = timedelta(minutes=1)
RETRY_BACKOFF_MAX = timedelta(hours=6)
#: Refusals of a message (4xx for it, not outages) before it is given up as failed.
MAX_ATTEMPTS = 12


class Undelivered(Exception):
    """``retry``: worth another try. ``maybe_sent``: the server may have it (never send again).
    ``ours``: the fault is ours or the server's, not the message's (unreachable, bad login):
    such tries do not count toward giving up, so an outage of any length loses nothing."""

    def __init__(self, reason: str, *, retry: bool, maybe_sent: bool, ours: bool = False) -> None:
        super().__init__(reason)
        self.retry = retry
        self.maybe_sent = maybe_sent
        self.ours = ours


class Mailer(Protocol):
    async def send(self, to_address: str, subject: str, body: str, message_id: str) -> None: ...


@dataclass
class Delivery:
    sent: int = 0
    retrying: int = 0
    failed: int = 0
    uncertain: int = 0


async def deliver(
    new_uow: UnitOfWorkFactory,
    mailer: Mailer,
    now: Callable[[], datetime],
    batch: int = 50,
    max_batches: int = 20,
    budget: timedelta = timedelta(minutes=4),
) -> Delivery:
    """Send due notifications. Each is marked `sending` and committed before it is sent.

    Stops taking new ones after ``budget`` (well inside the worker's time limit, so a send is
    never cut off mid-way by it); the next run goes on.
    """
    result = Delivery()
    started = time.monotonic()
    async with new_uow() as uow:
        result.uncertain += await uow.notifications.abandon_stale(now())
        await uow.commit()
    for _ in range(batch * max_batches):
        if time.monotonic() - started > budget.total_seconds():
            break
        # One at a time: the lease covers one send, so a slow server never outlives it.
        async with new_uow() as uow:
            claimed = await uow.notifications.claim(now(), SEND_LEASE, 1)
            await uow.commit()
        if not claimed:
            break
        for row in claimed:
            status, error, retry_at, refused = await _send(mailer, row, now)
            async with new_uow() as uow:
                await uow.notifications.finish(row.id, status, now(), error, retry_at, refused)
                await uow.commit()
            counter = "retrying" if status == "pending" else status
            setattr(result, counter, getattr(result, counter) + 1)
            log.info(
                "notification_" + ("retrying" if status == "pending" else status),
                key=row.key,
                kind=row.kind,
                error=error,
            )
    return result


async def _send(mailer: Mailer, row, now: Callable[[], datetime]) -> tuple[str, str | None, datetime | None, bool]:
    """Send one claimed notification: its new status, the error, when to retry, and whether the server refused it."""
    try:
        await mailer.send(row.to_address, row.subject, row.body, message_id(row.key))
    except Exception as failure:
        if not isinstance(failure, Undelivered):
            # Unknown: it may have gone out. At most once, so it is not sent again.
            log.exception("notification_send_error", key=row.key)
            failure = Undelivered(f"{type(failure).__name__}: {failure}", retry=False, maybe_sent=True)
        error = str(failure)[:2000]
        if failure.maybe_sent:
            return "uncertain", error, None, False
        # Outages and our own settings never use up the tries a refused message gets.
        refused = not failure.ours
        if failure.retry and (failure.ours or row.refusals + 1 < MAX_ATTEMPTS):
            return "pending", error, now() + min(RETRY_BACKOFF * 2 ** min(row.attempts, 20), RETRY_BACKOFF_MAX), refused
        return "failed", error, None, refused
    return "sent", None, None, False


def message_id(key: str) -> str:
    """A well-formed Message-ID of its own for each notification, whatever its customer id holds."""
    return f"<{hashlib.sha256(key.encode()).hexdigest()[:32]}@credits>"


async def warn_expiring_credits(new_uow: UnitOfWorkFactory, now: datetime, days_before: int, batch: int = 1_000) -> int:
    """Queue one warning per lot expiring within ``days_before`` days (the key makes it once)."""
    queued = 0
    while True:
        async with new_uow() as uow:
            lots = await uow.notifications.lots_expiring(now, now + timedelta(days=days_before), batch)
            warnings = [
                (notices.credits_expiring(lot.customer_id, lot.id, lot.remaining, lot.expires_at), now) for lot in lots
            ]
            queued += len(await uow.notifications.enqueue_many(warnings))
            await uow.notifications.mark_warned([(lot.id, lot.expires_at) for lot in lots], now)
            await uow.commit()
        if len(lots) < batch:
            return queued
