"""Invariants that must survive concurrency: no double spend, effects once under redelivery, and
every snapshot a reader takes while workers write is internally consistent.

The first test races units of work in this process; the others run real `dramatiq workers.actors`
processes (2 × 4 threads) against the real Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import UTC, datetime, timedelta

import redis
from sqlalchemy import func, select

from domain import CreditPolicy, InsufficientCredits, JobAlreadyCharged
from infra.db import Database
from infra.db.tables import (
    credit_lots,
    customers,
    dead_letters,
    holds,
    ledger_entries,
    processed_events,
)
from messages import (
    EVENTS_QUEUE,
    CreditsAdjusted,
    JobCancelled,
    JobCompleted,
    PaymentSucceeded,
    Publisher,
)
from service_layer import handlers
from service_layer.errors import CustomerNotFound
from service_layer.handlers import Outcome
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import (
    HOLD_KINDS,
    WorkerProcesses,
    assert_serial_chain,
    entries_by_customer,
    eventually,
    reconciliation,
)

CHARGE_KINDS = ("debited", "captured")
OUTCOMES = ("event_applied", "event_duplicate", "event_rejected")


def recent_base() -> datetime:
    """Event times the workers accept (their window is relative to the real clock): two days ago."""
    return (datetime.now(UTC) - timedelta(days=2)).replace(minute=0, second=0, microsecond=0)


async def count(db: Database, table) -> int:
    async with db.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar()


def queue_drained(redis_client: redis.Redis) -> bool:
    """No event message waiting, in flight (fetched, unacked) or delayed for a retry."""
    return (
        redis_client.hlen(f"dramatiq:{EVENTS_QUEUE}.msgs") == 0
        and redis_client.hlen(f"dramatiq:{EVENTS_QUEUE}.DQ.msgs") == 0
    )


async def wait_drained(db: Database, redis_client: redis.Redis, processed: int, dead: int, timeout: float) -> None:
    async def done() -> bool:
        return (
            await count(db, processed_events) >= processed
            and await count(db, dead_letters) >= dead
            and queue_drained(redis_client)
        )

    await eventually(
        done,
        timeout=timeout,
        interval=0.2,
        message=f"{processed} processed events, {dead} dead letter(s), an empty queue",
    )
    await asyncio.sleep(0.3)  # anything still finishing would show in the counts below


def final_outcomes(workers: WorkerProcesses) -> Counter:
    """How each message ended (its last outcome line), counted."""
    last: dict[str, str] = {}
    for record in workers.records():
        if record.get("event") in OUTCOMES and "message_id" in record:
            last[record["message_id"]] = record["event"]
    return Counter(last.values())


# --------------------------------------------------------------------------- double spend


async def test_concurrent_bookings_never_hold_more_than_is_available(db: Database) -> None:
    """64 bookings of 9 credits race for 10 credits: exactly one wins, 63 are refused, 1 stays available."""
    policy = CreditPolicy()
    at = datetime(2026, 3, 2, 9, tzinfo=UTC)
    pay = PaymentSucceeded(event_id="ds-pay", occurred_at=at, customer_id="cust-ds", payment_id="ds-pay", credits=10)
    assert await handlers.apply_event(pay, SqlUnitOfWork(db), policy) == Outcome.APPLIED

    async def book(n: int) -> str:
        try:
            _, created = await handlers.place_hold(
                SqlUnitOfWork(db), policy, "cust-ds", f"ds-job-{n}", 9, at + timedelta(minutes=1)
            )
        except InsufficientCredits as refusal:
            assert (refusal.wanted, refusal.available) == (9, 1)
            return "refused"
        assert created
        return "held"

    results = await asyncio.gather(*(book(n) for n in range(64)))
    assert Counter(results) == {"held": 1, "refused": 63}

    view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), "cust-ds", at + timedelta(minutes=2))
    assert (view.balance, view.available, len(view.holds)) == (10, 1, 1)
    async with db.connect() as connection:
        statuses = Counter((await connection.execute(select(holds.c.status))).scalars())
        kinds = Counter((await connection.execute(select(ledger_entries.c.kind))).scalars())
    assert statuses == {"active": 1}
    assert kinds == {"issued": 1, "held": 1}
    assert await reconciliation(db) == []


async def test_a_job_completed_concurrently_many_times_is_charged_once(db: Database) -> None:
    """The same completion under 32 event ids, and one event delivered 32 times, all at once."""
    policy = CreditPolicy()
    at = datetime(2026, 3, 2, 9, tzinfo=UTC)
    pay = PaymentSucceeded(event_id="dc-pay", occurred_at=at, customer_id="cust-dc", payment_id="dc-pay", credits=10)
    await handlers.apply_event(pay, SqlUnitOfWork(db), policy)
    same_job = [
        JobCompleted(
            event_id=f"dc-done-{n}",
            occurred_at=at + timedelta(minutes=1),
            customer_id="cust-dc",
            job_id="dc-job",
            credits=3,
        )
        for n in range(32)
    ]
    one_event = [
        JobCompleted(
            event_id="dc-once",
            occurred_at=at + timedelta(minutes=2),
            customer_id="cust-dc",
            job_id="dc-other",
            credits=2,
        )
    ] * 32

    async def apply(event) -> str:
        try:
            return (await handlers.apply_event(event, SqlUnitOfWork(db), policy)).value
        except JobAlreadyCharged:
            return "already charged"

    results = Counter(await asyncio.gather(*(apply(event) for event in same_job + one_event)))
    assert results == {"applied": 2, "already charged": 31, "duplicate": 31}
    view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), "cust-dc", at + timedelta(minutes=3))
    assert (view.balance, view.available) == (5, 5)
    assert await count(db, processed_events) == 3
    assert await reconciliation(db) == []


async def test_sweeps_racing_events_expire_and_lapse_each_thing_once(db: Database) -> None:
    """Two expiry sweeps, a lapse sweep, and each customer's own events (which catch up on the same
    due lot and hold) all at once: every lot expires once, every hold lapses once, nothing is lost."""
    policy = CreditPolicy(credit_expiration_months=1, hold_ttl_days=1)
    start = datetime(2026, 1, 5, 9, tzinfo=UTC)
    now = start + timedelta(days=70)
    people = [f"sweep-{n:02d}" for n in range(20)]
    for customer in people:
        pay = PaymentSucceeded(
            event_id=f"{customer}-pay",
            occurred_at=start,
            customer_id=customer,
            payment_id=f"{customer}-pay",
            credits=10,
        )
        await handlers.apply_event(pay, SqlUnitOfWork(db), policy)
        await handlers.place_hold(SqlUnitOfWork(db), policy, customer, f"{customer}-a", 4, start)

    def uow() -> SqlUnitOfWork:
        return SqlUnitOfWork(db)

    async def customer_side(customer: str) -> None:
        debit = JobCompleted(
            event_id=f"{customer}-done", occurred_at=now, customer_id=customer, job_id=f"{customer}-c", credits=3
        )
        top_up = PaymentSucceeded(
            event_id=f"{customer}-pay-2",
            occurred_at=now,
            customer_id=customer,
            payment_id=f"{customer}-pay-2",
            credits=5,
        )
        for event in random.Random(customer).sample([debit, top_up], 2):
            await handlers.apply_event(event, uow(), policy)

    await asyncio.gather(
        handlers.expire_due_credits(uow, now, batch_size=3),
        handlers.expire_due_credits(uow, now, batch_size=7),
        handlers.lapse_due_holds(uow, now, batch_size=5),
        *(customer_side(customer) for customer in people),
    )
    # Whatever the sweeps passed over (held by an event), a later run finds nothing left to do.
    assert await handlers.expire_due_credits(uow, now, batch_size=50) == handlers.SweepResult(0, 0)
    assert await handlers.lapse_due_holds(uow, now, batch_size=50) == handlers.SweepResult(0, 0)

    grouped = await entries_by_customer(db)
    for customer in people:
        entries = grouped[customer]
        assert [e["credits"] for e in entries if e["kind"] == "expired"] == [-10], customer
        assert [e["job_id"] for e in entries if e["kind"] == "lapsed"] == [f"{customer}-a"], customer
        assert sum(e["credits"] for e in entries if e["kind"] not in HOLD_KINDS) == 2, customer
        assert_serial_chain(customer, entries)
    async with db.connect() as connection:
        balances = dict((await connection.execute(select(customers.c.customer_id, customers.c.balance))).all())
        statuses = Counter((await connection.execute(select(holds.c.status))).scalars())
    assert balances == {customer: 2 for customer in people}
    assert statuses == {"lapsed": 20}
    assert await reconciliation(db) == []


# --------------------------------------------------------------------------- duplicates through the workers


async def test_redelivered_events_take_effect_once(
    db: Database, redis_client: redis.Redis, redis_url: str, start_workers
) -> None:
    """300 events, each published 1–5 times, shuffled, on 2 processes × 4 threads: every effect once;
    an event id reused with another payload is dead-lettered (EventConflict) and changes nothing."""
    rng = random.Random(20261121)
    base = recent_base()
    events: list = []
    expected: dict[str, int] = {}
    for c in range(30):
        customer = f"dup-{c:02d}"
        paid = [rng.randint(5, 30) for _ in range(2)]
        spent = [rng.randint(1, 5) for _ in range(8)]
        events += [
            PaymentSucceeded(
                event_id=f"{customer}-pay-{i}",
                occurred_at=base + timedelta(minutes=i),
                customer_id=customer,
                payment_id=f"{customer}-pay-{i}",
                credits=credits,
            )
            for i, credits in enumerate(paid)
        ]
        events += [
            JobCompleted(
                event_id=f"{customer}-done-{j}",
                occurred_at=base + timedelta(minutes=5 + j),
                customer_id=customer,
                job_id=f"{customer}-job-{j}",
                credits=credits,
            )
            for j, credits in enumerate(spent)
        ]
        expected[customer] = sum(paid) - sum(spent)
    assert len(events) == 300
    original = events[0]
    conflicting = original.model_copy(update={"credits": original.credits + 100})

    workers = start_workers(processes=2, threads=4)
    publisher = Publisher.from_url(redis_url)
    try:
        # The original goes first, so the conflicting payload is the one refused, whatever the order.
        publisher.publish(original)
        await eventually(lambda: _applied(db, original.event_id), timeout=30, message="the original event applied")
        deliveries = [event for event in events for _ in range(rng.randint(1, 5))] + [conflicting]
        rng.shuffle(deliveries)
        for event in deliveries:
            publisher.publish(event)
        await wait_drained(db, redis_client, processed=len(events), dead=1, timeout=75)
    finally:
        publisher.close()

    messages = 1 + len(deliveries)
    assert final_outcomes(workers) == {"event_applied": 300, "event_rejected": 1, "event_duplicate": messages - 301}
    async with db.connect() as connection:
        balances = dict((await connection.execute(select(customers.c.customer_id, customers.c.balance))).all())
        lot_amounts = dict((await connection.execute(select(credit_lots.c.payment_id, credit_lots.c.amount))).all())
        letters = (await connection.execute(select(dead_letters.c.message, dead_letters.c.error))).all()
    assert balances == expected
    assert lot_amounts[original.payment_id] == original.credits  # the conflicting payload changed nothing
    assert len(letters) == 1 and conflicting.event_id in letters[0].message and "different payload" in letters[0].error
    grouped = await entries_by_customer(db)
    kinds = Counter(entry["kind"] for entries in grouped.values() for entry in entries)
    assert kinds == {"issued": 60, "debited": 240}
    for customer, entries in grouped.items():
        assert_serial_chain(customer, entries)
        assert Counter(e["job_id"] for e in entries if e["kind"] in CHARGE_KINDS) == {
            f"{customer}-job-{j}": 1 for j in range(8)
        }
    assert await count(db, processed_events) == 300
    assert await reconciliation(db) == []


async def _applied(db: Database, event_id: str) -> bool:
    async with db.connect() as connection:
        return (
            await connection.execute(select(processed_events.c.event_id).where(processed_events.c.event_id == event_id))
        ).first() is not None


# --------------------------------------------------------------------------- conservation while reading


async def snapshot_of_one(db: Database, customer_id: str, at: datetime) -> bool:
    """One REPEATABLE READ snapshot of a customer: the view, its row and its entries must agree.
    Returns whether the customer existed yet."""
    async with SqlUnitOfWork(db, read_only=True) as uow:
        account = await uow.accounts.get(customer_id)
        if account is None:
            return False
        row = (
            await uow.connection.execute(
                select(customers.c.balance, customers.c.overdraft).where(customers.c.customer_id == customer_id)
            )
        ).one()
        summed = (
            await uow.connection.execute(
                select(func.coalesce(func.sum(ledger_entries.c.credits), 0)).where(
                    ledger_entries.c.customer_id == customer_id, ledger_entries.c.kind.not_in(HOLD_KINDS)
                )
            )
        ).scalar()
        view = account.view(at)
    lots = sum(lot.remaining for lot in view.lots)
    context = f"{customer_id}: view {view}, row {tuple(row)}, entries sum {summed}"
    assert view.balance == lots - row.overdraft, context
    assert view.available == view.balance - sum(h.credits for h in view.holds), context
    assert row.balance == summed == view.balance, context  # nothing expires within the test's times
    assert row.overdraft == 0 or lots == 0, context
    assert all(0 < lot.remaining <= lot.amount for lot in view.lots), context
    return True


async def check_credit_view(db: Database, customer_id: str, at: datetime) -> None:
    """The production read path: internally consistent on its own."""
    try:
        view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), customer_id, at)
    except CustomerNotFound:
        return
    lots = sum(lot.remaining for lot in view.lots)
    # Overdraft exists only once no credit is left: with lots, balance is what they hold.
    assert view.balance == lots if view.lots else view.balance <= 0, view
    assert view.available == view.balance - sum(h.credits for h in view.holds), view


async def snapshot_reconciles(db: Database) -> None:
    """The whole ledger, read in one REPEATABLE READ snapshot, reconciles."""
    assert await reconciliation(db, snapshot=True) == []


async def test_every_snapshot_is_consistent_while_workers_apply_events(
    db: Database, redis_client: redis.Redis, redis_url: str, start_workers
) -> None:
    """~2,000 events for 50 customers on 2 processes × 4 threads, while this process books jobs and
    reads snapshots without pause: each snapshot is consistent, and the end reconciles exactly."""
    rng = random.Random(1121)
    base = recent_base()
    policy = CreditPolicy()  # the workers' default policy
    events: list = []
    expected: dict[str, int] = {}
    booked: list[tuple[str, str, int]] = []
    for c in range(50):
        customer = f"cons-{c:02d}"
        balance = 0
        for i in range(4):
            credits = rng.randint(5, 25)
            balance += credits
            events.append(
                PaymentSucceeded(
                    event_id=f"{customer}-pay-{i}",
                    occurred_at=base + timedelta(minutes=10 * i),
                    customer_id=customer,
                    payment_id=f"{customer}-pay-{i}",
                    credits=credits,
                )
            )
        for i in range(4):
            credits = rng.choice([-5, -2, 3, 8])
            balance += credits
            events.append(
                CreditsAdjusted(
                    event_id=f"{customer}-adj-{i}",
                    occurred_at=base + timedelta(minutes=10 * i + 5),
                    customer_id=customer,
                    credits=credits,
                    reason="load",
                    actor="test",
                )
            )
        for j in range(24):
            credits = rng.randint(1, 4)
            balance -= credits
            events.append(
                JobCompleted(
                    event_id=f"{customer}-done-{j}",
                    occurred_at=base + timedelta(minutes=j + 1),
                    customer_id=customer,
                    job_id=f"{customer}-job-{j}",
                    credits=credits,
                )
            )
        # Booked jobs (this process places their holds meanwhile): 0-3 complete, 2-5 are cancelled.
        for k in range(6):
            credits = rng.randint(1, 3)
            booked.append((customer, f"{customer}-booked-{k}", credits))
            if k < 4:
                balance -= credits
                events.append(
                    JobCompleted(
                        event_id=f"{customer}-booked-done-{k}",
                        occurred_at=base + timedelta(minutes=30 + k),
                        customer_id=customer,
                        job_id=f"{customer}-booked-{k}",
                        credits=credits,
                    )
                )
            if k >= 2:
                events.append(
                    JobCancelled(
                        event_id=f"{customer}-booked-cancel-{k}",
                        occurred_at=base + timedelta(minutes=31 + k),
                        customer_id=customer,
                        job_id=f"{customer}-booked-{k}",
                    )
                )
        expected[customer] = balance
    assert len(events) == 2000
    rng.shuffle(events)

    workers = start_workers(processes=2, threads=4)
    publisher = Publisher.from_url(redis_url)
    done = asyncio.Event()
    stats: Counter = Counter()
    read_at = base + timedelta(days=1)  # after every event, before any lot or hold could expire

    async def reader(seed: int) -> None:
        pick = random.Random(seed)
        while not done.is_set():
            customer = f"cons-{pick.randrange(50):02d}"
            stats["snapshots"] += await snapshot_of_one(db, customer, read_at)
            await check_credit_view(db, customer, read_at)
            if pick.random() < 0.1:
                await snapshot_reconciles(db)
                stats["ledger snapshots"] += 1
            await asyncio.sleep(0.005)

    async def booker() -> None:
        pending = list(booked)
        random.Random(7).shuffle(pending)
        for customer, job_id, credits in pending:
            try:
                await handlers.place_hold(SqlUnitOfWork(db), policy, customer, job_id, credits, read_at)
                stats["holds"] += 1
            except (CustomerNotFound, InsufficientCredits, JobAlreadyCharged):
                stats["bookings refused"] += 1
            await asyncio.sleep(0.01)

    try:
        readers = [asyncio.create_task(reader(seed)) for seed in (1, 2)]
        for event in events:
            publisher.publish(event)
        await booker()
        await wait_drained(db, redis_client, processed=len(events), dead=0, timeout=80)
        done.set()
        await asyncio.gather(*readers)
    finally:
        done.set()
        publisher.close()

    assert stats["snapshots"] >= 50 and stats["ledger snapshots"] >= 3 and stats["holds"] > 0, stats
    assert final_outcomes(workers) == {"event_applied": 2000}
    assert await count(db, dead_letters) == 0
    async with db.connect() as connection:
        balances = dict((await connection.execute(select(customers.c.customer_id, customers.c.balance))).all())
        lowest = (await connection.execute(select(func.min(credit_lots.c.remaining)))).scalar()
    assert balances == expected
    assert lowest >= 0
    grouped = await entries_by_customer(db)
    for customer, entries in grouped.items():
        assert_serial_chain(customer, entries)
        charged = Counter(e["job_id"] for e in entries if e["kind"] in CHARGE_KINDS)
        assert max(charged.values()) == 1 and len(charged) == 28
    for c in range(50):
        assert await snapshot_of_one(db, f"cons-{c:02d}", read_at)
    await snapshot_reconciles(db)
    assert await reconciliation(db) == []
