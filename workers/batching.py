"""Group commit for a worker process: events that arrive together share one transaction.

Each actor call waits for its own event's outcome, so a message is still acknowledged only
after the transaction holding its effect has committed; a crash loses nothing (the
messages are redelivered and the event log recognises what had committed). No event is
held back to fill a batch: a transaction takes whatever has queued up while the previous
ones were running, so under light load every event goes alone, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence

import structlog

from messages import Event
from service_layer.apply import Outcome

log = structlog.get_logger("credits.batching")

ApplyMany = Callable[[Sequence[Event]], Awaitable[list[Outcome]]]
ApplyOne = Callable[[Event], Awaitable[Outcome]]


class EventBatcher:
    """Apply events through at most ``in_flight`` transactions of up to ``max_batch`` events each.

    A batch that fails for any reason is applied again one event at a time, so one bad or
    duplicate event gets its own error and never fails or delays the others' effects.
    Create it on the event loop that will use it.
    """

    def __init__(self, apply_many: ApplyMany, apply_one: ApplyOne, max_batch: int, in_flight: int) -> None:
        if max_batch < 1 or in_flight < 1:
            raise ValueError("max_batch and in_flight must be at least 1")
        self._apply_many = apply_many
        self._apply_one = apply_one
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._waiting: list[tuple[Event, asyncio.Future[Outcome]]] = []
        self._drains: set[asyncio.Task[None]] = set()

    async def apply(self, event: Event) -> Outcome:
        """The event's outcome once its transaction has committed; raises what applying it raised."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((event, future))
        if len(self._drains) < self._in_flight:
            # A fresh context: the drain serves many events and must not log as this one.
            drain = asyncio.create_task(self._drain(), context=contextvars.Context())
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)  # also when cancelled before it ran
        return await future

    async def _drain(self) -> None:
        batch: list[tuple[Event, asyncio.Future[Outcome]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                await self._settle(batch)
        except BaseException as error:
            # Cancelled at shutdown, or a bug: no caller may wait forever. Their messages are
            # retried (nothing of a failed transaction was written).
            stranded, self._waiting = batch + self._waiting, []
            for _, future in stranded:
                if not future.done():
                    future.set_exception(
                        error if isinstance(error, Exception) else RuntimeError("the event batcher was stopped")
                    )
            raise
        finally:
            # Leave the count of drains before yielding to the loop: an event queued after
            # the loop above found nothing to do must find room to start a drain.
            self._drains.discard(asyncio.current_task())

    async def _settle(self, batch: list[tuple[Event, asyncio.Future[Outcome]]]) -> None:
        if len(batch) > 1:
            try:
                outcomes = await self._apply_many([event for event, _ in batch])
            except Exception as error:
                log.info("event_batch_split", size=len(batch), reason=type(error).__name__)
            else:
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    _resolve(future, outcome)
                return
        for event, future in batch:
            try:
                outcome = await self._apply_one(event)
            except Exception as error:
                if not future.done():
                    future.set_exception(error)
            else:
                _resolve(future, outcome)


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome) -> None:
    if not future.done():  # its caller may have been cancelled meanwhile; the effect stands
        future.set_result(outcome)
