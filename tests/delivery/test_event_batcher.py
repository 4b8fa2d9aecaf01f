"""workers.batching.EventBatcher on its own: pure asyncio, fake apply functions that record their calls.

A fake transaction can be held open with an asyncio.Event, so what queues up behind it, how
it is cut into batches and how many transactions run at once are observed deterministically.
The fakes return a value (or raise an exception) unique to each event, so every caller can be
checked to receive exactly its own result.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
import structlog

from messages import JobCompleted
from workers.batching import EventBatcher

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def event(n: int) -> JobCompleted:
    return JobCompleted(event_id=f"ev-{n}", occurred_at=T0, customer_id=f"cust-{n % 3}", job_id=f"job-{n}")


def result_of(e: JobCompleted) -> str:
    """What the fakes return for an event: unique, so a result handed to the wrong caller shows."""
    return f"outcome:{e.event_id}"


class Refused(Exception):
    """What the fake apply_one raises for a bad event (one instance per event)."""


class Crash(BaseException):
    """Not an Exception: the batcher must not treat it as an ordinary failed batch."""


class Fakes:
    """apply_many / apply_one that record their calls and can be held, made to fail or crash."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        #: While cleared, every call blocks after being recorded (a transaction held open).
        self.gate = asyncio.Event()
        self.gate.set()
        self.active = 0
        self.max_active = 0
        self.fail_many: Exception | None = None
        self.crash_many = False
        #: event id -> the exception apply_one raises for it.
        self.bad: dict[str, Exception] = {}
        self.contexts: list[dict] = []

    async def _enter(self, kind: str, events: Sequence[JobCompleted]) -> None:
        self.calls.append((kind, tuple(e.event_id for e in events)))
        self.contexts.append(dict(structlog.contextvars.get_contextvars()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.gate.wait()
        finally:
            self.active -= 1

    async def apply_many(self, events: Sequence[JobCompleted]) -> list[str]:
        await self._enter("many", events)
        if self.crash_many:
            raise Crash("the drain dies")
        if self.fail_many is not None:
            raise self.fail_many
        return [result_of(e) for e in events]

    async def apply_one(self, e: JobCompleted) -> str:
        await self._enter("one", [e])
        if e.event_id in self.bad:
            raise self.bad[e.event_id]
        return result_of(e)

    def batcher(self, max_batch: int, in_flight: int) -> EventBatcher:
        return EventBatcher(self.apply_many, self.apply_one, max_batch=max_batch, in_flight=in_flight)


async def until(predicate, message: str = "condition", steps: int = 1000) -> None:
    """Let the loop run until ``predicate()`` holds (only event-loop turns, no wall-clock waits)."""
    for _ in range(steps):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {message}")


async def settle() -> None:
    """A few loop turns: whatever can run now has run."""
    for _ in range(20):
        await asyncio.sleep(0)


@pytest.fixture
async def tasks():
    """Caller tasks a test starts; any left pending at the end are cancelled (no leak into other tests)."""
    started: list[asyncio.Task] = []
    yield started
    before = asyncio.all_tasks()
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)
    # Drain tasks stranded by a failing test: cancel those too.
    leftovers = [
        t for t in before if t is not asyncio.current_task() and not t.done() and "_drain" in repr(t.get_coro())
    ]
    for task in leftovers:
        task.cancel()
    await asyncio.gather(*leftovers, return_exceptions=True)


def call(tasks: list, batcher: EventBatcher, e: JobCompleted) -> asyncio.Task:
    task = asyncio.create_task(batcher.apply(e))
    tasks.append(task)
    return task


# --------------------------------------------------------------------------- batching


async def test_events_waiting_behind_a_transaction_are_taken_in_batches_in_arrival_order(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=3, in_flight=1)
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: fakes.calls == [("one", ("ev-0",))], "the first event's transaction to start")

    queued = [call(tasks, batcher, event(n)) for n in range(1, 8)]
    await settle()
    # Nothing else starts while the only transaction allowed is held open, nobody is answered.
    assert fakes.calls == [("one", ("ev-0",))]
    assert not any(t.done() for t in [first, *queued])

    fakes.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued), 5)
    assert results == [result_of(event(n)) for n in range(8)]
    # Up to max_batch at a time, in arrival order; the lone remainder goes to apply_one.
    assert fakes.calls == [
        ("one", ("ev-0",)),
        ("many", ("ev-1", "ev-2", "ev-3")),
        ("many", ("ev-4", "ev-5", "ev-6")),
        ("one", ("ev-7",)),
    ]
    assert fakes.max_active == 1


async def test_a_free_transaction_slot_takes_everything_that_arrived_together(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=32, in_flight=2)
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1, "the first transaction to start")
    together = [call(tasks, batcher, event(n)) for n in range(1, 6)]
    await until(lambda: len(fakes.calls) == 2, "the second transaction to start")
    await settle()
    assert fakes.calls == [("one", ("ev-0",)), ("many", ("ev-1", "ev-2", "ev-3", "ev-4", "ev-5"))]
    assert fakes.active == 2
    assert not any(t.done() for t in [first, *together]), "answered before its transaction ended"
    fakes.gate.set()
    assert await asyncio.wait_for(asyncio.gather(first, *together), 5) == [result_of(event(n)) for n in range(6)]


async def test_a_lone_event_goes_to_apply_one(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=32, in_flight=2)
    assert await asyncio.wait_for(batcher.apply(event(0)), 5) == result_of(event(0))
    # Under light load (one at a time) every event goes alone, as before batching.
    assert await asyncio.wait_for(batcher.apply(event(1)), 5) == result_of(event(1))
    assert fakes.calls == [("one", ("ev-0",)), ("one", ("ev-1",))]


@pytest.mark.parametrize("in_flight", [1, 2, 3])
async def test_in_flight_bounds_the_transactions_running_at_once(tasks, in_flight):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=2, in_flight=in_flight)
    fakes.gate.clear()
    callers = []
    for n in range(12):
        callers.append(call(tasks, batcher, event(n)))
        await settle()  # each arrives on its own: a free slot takes it alone
    assert fakes.active == in_flight
    assert fakes.calls == [("one", (f"ev-{n}",)) for n in range(in_flight)]
    fakes.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*callers), 5)
    assert results == [result_of(event(n)) for n in range(12)]
    assert fakes.max_active == in_flight
    # Each event applied exactly once, the rest in batches of at most max_batch.
    applied = [event_id for _, ids in fakes.calls for event_id in ids]
    assert sorted(applied) == sorted(f"ev-{n}" for n in range(12))
    assert all(len(ids) <= 2 for _, ids in fakes.calls)
    assert all(kind == ("many" if len(ids) > 1 else "one") for kind, ids in fakes.calls)


async def test_the_drain_does_not_run_in_a_callers_logging_context(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=8, in_flight=1)

    async def caller(n: int) -> str:
        structlog.contextvars.bind_contextvars(event_id=f"ev-{n}")
        return await batcher.apply(event(n))

    fakes.gate.clear()
    first = asyncio.create_task(caller(0))
    tasks.append(first)
    await until(lambda: len(fakes.calls) == 1)
    rest = [asyncio.create_task(caller(n)) for n in (1, 2)]
    tasks.extend(rest)
    await settle()
    fakes.gate.set()
    await asyncio.wait_for(asyncio.gather(first, *rest), 5)
    assert fakes.calls == [("one", ("ev-0",)), ("many", ("ev-1", "ev-2"))]
    assert fakes.contexts == [{}, {}], "a transaction serving many events logged as one of them"


# --------------------------------------------------------------------------- failures


async def test_a_failed_batch_is_applied_again_one_at_a_time_each_caller_getting_its_own_result(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=8, in_flight=1)
    fakes.fail_many = RuntimeError("the batch failed (say, one job was charged already)")
    bad_3, bad_5 = Refused("ev-3 is bad"), Refused("ev-5 is bad")
    fakes.bad = {"ev-3": bad_3, "ev-5": bad_5}

    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1)
    queued = [call(tasks, batcher, event(n)) for n in range(1, 7)]
    await settle()
    fakes.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)

    assert fakes.calls == [("one", ("ev-0",)), ("many", tuple(f"ev-{n}" for n in range(1, 7)))] + [
        ("one", (f"ev-{n}",)) for n in range(1, 7)
    ]
    expected = [result_of(event(n)) for n in range(7)]
    assert results[:3] == expected[:3] and results[4] == expected[4] and results[6] == expected[6]
    # Each bad event's caller gets its own exception, the very object raised for it.
    assert results[3] is bad_3
    assert results[5] is bad_5


async def test_one_bad_event_among_good_ones_fails_alone(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=4, in_flight=1)
    fakes.fail_many = Refused("batch refused because of ev-2")
    only_bad = Refused("ev-2 is bad")
    fakes.bad = {"ev-2": only_bad}
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1)
    queued = [call(tasks, batcher, event(n)) for n in range(1, 5)]
    await settle()
    fakes.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
    assert results == [result_of(event(0)), result_of(event(1)), only_bad, result_of(event(3)), result_of(event(4))]
    assert results[2] is only_bad and results[2] is not fakes.fail_many


async def test_a_caller_cancelled_while_waiting_breaks_neither_the_others_nor_the_drain(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=8, in_flight=1)
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1)
    queued = [call(tasks, batcher, event(n)) for n in range(1, 5)]
    await settle()
    queued[1].cancel()  # ev-2's caller gives up
    await settle()
    fakes.gate.set()
    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 2] == [result_of(event(n)) for n in (0, 1, 3, 4)]
    # The drain goes on serving: a later event is applied.
    assert await asyncio.wait_for(batcher.apply(event(9)), 5) == result_of(event(9))


async def test_a_cancelled_caller_whose_event_fails_after_its_batch_failed_breaks_nothing(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=8, in_flight=1)
    fakes.fail_many = RuntimeError("batch failed")
    fakes.bad = {"ev-2": Refused("ev-2 is bad")}
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1)
    queued = [call(tasks, batcher, event(n)) for n in range(1, 5)]
    await settle()
    fakes.gate.set()
    # Cancel ev-2's caller while its batch is being re-applied one at a time.
    await until(lambda: ("one", ("ev-1",)) in fakes.calls, "the batch to be split")
    queued[1].cancel()
    results = await asyncio.wait_for(asyncio.gather(first, *queued, return_exceptions=True), 5)
    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 2] == [result_of(event(n)) for n in (0, 1, 3, 4)]
    assert await asyncio.wait_for(batcher.apply(event(9)), 5) == result_of(event(9))


async def test_a_base_exception_in_a_batch_fails_its_callers_instead_of_leaving_them_waiting(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=8, in_flight=1)
    fakes.crash_many = True
    others = asyncio.all_tasks()
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1)
    [drain] = [t for t in asyncio.all_tasks() - others if t not in tasks]
    queued = [call(tasks, batcher, event(n)) for n in range(1, 4)]
    await settle()
    fakes.gate.set()
    _, pending = await asyncio.wait([first, *queued], timeout=2)
    [crash] = await asyncio.gather(drain, return_exceptions=True)
    assert isinstance(crash, Crash), "the drain task must end with what killed it"
    assert not pending, "callers left waiting after their batch crashed"
    assert first.result() == result_of(event(0))
    # Not an ordinary failure: nothing was re-applied alone; each caller got an ordinary
    # exception (its message is retried; a CancelledError would escape the actor's retries).
    assert fakes.calls == [("one", ("ev-0",)), ("many", ("ev-1", "ev-2", "ev-3"))]
    assert all(isinstance(t.exception(), RuntimeError) for t in queued)
    # A later event still gets applied (a new drain starts).
    fakes.crash_many = False
    assert await asyncio.wait_for(batcher.apply(event(9)), 5) == result_of(event(9))


@pytest.mark.parametrize("how", ["drain task cancelled", "BaseException from apply_many"])
async def test_a_dying_drain_leaves_no_caller_waiting_forever(tasks, how):
    """The drain dies (shutdown cancels it, or a BaseException) while more events wait behind its batch."""
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=2, in_flight=1)
    others = asyncio.all_tasks()
    fakes.gate.clear()
    first = call(tasks, batcher, event(0))
    await until(lambda: len(fakes.calls) == 1)
    [drain] = [t for t in asyncio.all_tasks() - others if t not in tasks]
    queued = [call(tasks, batcher, event(n)) for n in range(1, 5)]
    await settle()
    if how == "drain task cancelled":
        drain.cancel()
    else:
        fakes.crash_many = True  # ev-0 (alone) succeeds, the batch behind it crashes
    fakes.gate.set()
    _, pending = await asyncio.wait([first, *queued], timeout=2)
    await asyncio.gather(drain, return_exceptions=True)  # its exception is retrieved, not left to the GC
    stuck = sorted(f"ev-{[first, *queued].index(t)}" for t in pending)
    assert not stuck, f"callers waiting forever after the drain died ({how}): {stuck}"


async def test_an_event_arriving_as_the_last_drain_finishes_is_still_applied(tasks):
    """A caller whose apply() runs after the drain left its loop but before the drain task's
    done callback removed it from the running drains must still get a drain."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()
    fakes = Fakes()

    async def apply_one(e: JobCompleted) -> str:
        result = await fakes.apply_one(e)
        if e.event_id == "ev-0" and not woken.done():
            woken.set_result(None)  # another task wakes in the same loop turn as the drain ends
        return result

    batcher = EventBatcher(fakes.apply_many, apply_one, max_batch=8, in_flight=1)

    async def arrives_just_then() -> str:
        await woken
        return await batcher.apply(event(1))

    late = asyncio.create_task(arrives_just_then())
    tasks.append(late)
    assert await asyncio.wait_for(batcher.apply(event(0)), 5) == result_of(event(0))
    done, _ = await asyncio.wait([late], timeout=2)
    assert late in done, f"ev-1 never applied: calls {fakes.calls}"
    assert late.result() == result_of(event(1))


# --------------------------------------------------------------------------- construction


@pytest.mark.parametrize(("max_batch", "in_flight"), [(0, 1), (1, 0), (-1, 2), (2, -1), (0, 0)])
async def test_the_constructor_refuses_sizes_below_one(max_batch, in_flight):
    fakes = Fakes()
    with pytest.raises(ValueError, match="at least 1"):
        EventBatcher(fakes.apply_many, fakes.apply_one, max_batch=max_batch, in_flight=in_flight)


async def test_sizes_of_one_are_accepted_and_then_every_event_goes_alone(tasks):
    fakes = Fakes()
    batcher = fakes.batcher(max_batch=1, in_flight=1)
    fakes.gate.clear()
    callers = [call(tasks, batcher, event(n)) for n in range(4)]
    await settle()
    fakes.gate.set()
    assert await asyncio.wait_for(asyncio.gather(*callers), 5) == [result_of(event(n)) for n in range(4)]
    assert fakes.calls == [("one", (f"ev-{n}",)) for n in range(4)]
