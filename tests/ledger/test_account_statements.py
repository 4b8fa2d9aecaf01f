"""The account repository on PostgreSQL: live state only, `create` honoured, a constant number of
statements per batch, and a lock that waited never hands back a stale snapshot."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

from sqlalchemy import event, select

from domain import CreditPolicy
from infra.db import Database
from infra.db.tables import customers
from messages import JobCancelled, JobCompleted, PaymentSucceeded
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import reconciliation

POLICY = CreditPolicy()
START = datetime(2025, 1, 6, tzinfo=UTC)


async def apply(db: Database, *events) -> None:
    for e in events:
        await handlers.apply_event(e, SqlUnitOfWork(db), POLICY)


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    """The SQL statements sent to the database inside the block (BEGIN and COMMIT are not statements)."""
    sent: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        sent.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", record)


async def test_lock_many_loads_live_state_only(db):
    await apply(
        db,
        PaymentSucceeded(event_id="pay-spent", occurred_at=START, customer_id="c", payment_id="in_spent", credits=2),
        PaymentSucceeded(
            event_id="pay-open",
            occurred_at=START + timedelta(hours=1),
            customer_id="c",
            payment_id="in_open",
            credits=10,
        ),
        JobCompleted(
            event_id="job-a", occurred_at=START + timedelta(hours=2), customer_id="c", job_id="a", credits=2
        ),  # spends in_spent
    )
    async with SqlUnitOfWork(db) as uow:
        [account] = await uow.accounts.lock_many(["c"], {})
        account.place_hold("held", 1, START + timedelta(hours=3), "hold-1", POLICY)
        account.place_hold("released", 1, START + timedelta(hours=3), "hold-2", POLICY)
        account.release_hold("released", START + timedelta(hours=4), "release-2")
        await uow.accounts.save(account)
        await uow.commit()

    async with SqlUnitOfWork(db) as uow:
        [plain] = await uow.accounts.lock_many(["c"], {"c": ["a", "b"]})
        [asked] = await uow.accounts.lock_many(["c"], {}, {"c": ["in_spent"], "other": ["in_open"]})
    # The spent lot stays in the database unless its payment is asked about; the released hold stays too.
    assert [(lot.payment_id, lot.remaining) for lot in plain.lots] == [("in_open", 10)]
    assert list(plain.holds) == ["held"]
    assert plain.charged_jobs == {"a"}
    assert sorted((lot.payment_id, lot.remaining) for lot in asked.lots) == [("in_open", 10), ("in_spent", 0)]
    assert asked.charged_jobs == set()


async def test_lock_many_creates_only_the_ids_in_create(db):
    await apply(
        db, PaymentSucceeded(event_id="pay", occurred_at=START, customer_id="known", payment_id="in_1", credits=3)
    )
    async with SqlUnitOfWork(db) as uow:
        accounts = await uow.accounts.lock_many(["unknown", "new", "known"], {}, create=["new"])
        assert [(a.customer_id, a.book_balance) for a in accounts] == [("known", 3), ("new", 0)]
        assert await uow.accounts.lock("unknown", create=False) is None
        await uow.commit()
    async with db.connect() as connection:
        stored = (
            (await connection.execute(select(customers.c.customer_id).order_by(customers.c.customer_id)))
            .scalars()
            .all()
        )
    assert stored == ["known", "new"]


async def test_a_batch_of_twenty_costs_the_statements_of_a_batch_of_one(db):
    # Customers with history (spent lots, charged jobs, closed holds) and live holds to capture.
    history = []
    for n in range(20):
        customer = f"c{n}"
        history += [
            PaymentSucceeded(
                event_id=f"pay-{n}", occurred_at=START, customer_id=customer, payment_id=f"in_{n}", credits=5
            ),
            JobCompleted(
                event_id=f"old-{n}",
                occurred_at=START + timedelta(hours=1),
                customer_id=customer,
                job_id=f"old-{n}",
                credits=1,
            ),
        ]
    await apply(db, *history)
    at = START + timedelta(days=1)

    async def batch(customers_: range, tag: str) -> int:
        events = [
            JobCompleted(event_id=f"{tag}-{n}", occurred_at=at, customer_id=f"c{n}", job_id=f"{tag}-{n}", credits=1)
            for n in customers_
        ]
        events += [
            JobCancelled(event_id=f"{tag}-x-{n}", occurred_at=at, customer_id=f"c{n}", job_id="none")
            for n in customers_
        ]
        with statements(db) as sent:
            await handlers.apply_events(events, SqlUnitOfWork(db), POLICY)
        return len(sent)

    one, twenty = await batch(range(1), "one"), await batch(range(20), "twenty")
    assert one == twenty <= 3  # lock and load, claim the event ids, write (then commit)
    assert await reconciliation(db) == []


async def test_a_sweep_batch_costs_the_same_statements_whatever_its_size(db):
    await apply(
        db,
        *[
            PaymentSucceeded(
                event_id=f"pay-{n}", occurred_at=START, customer_id=f"c{n}", payment_id=f"in_{n}", credits=2
            )
            for n in range(41)
        ],
    )
    now = START + timedelta(days=400)

    async def one_batch(size: int) -> int:
        with statements(db) as sent:
            result = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size=size, max_batches=1)
        assert result.customers == size
        return len(sent)

    # Find the due customers, lock and load, queue the depletion notices, write.
    assert await one_batch(1) == await one_batch(40) <= 4
    assert await reconciliation(db) == []


async def test_a_lock_that_waited_loads_what_the_holder_committed(db):
    """The load shares a statement (and so a snapshot) with the lock: when it had to wait for a
    writer, it must still see that writer's lots, not the snapshot taken before the wait."""
    await apply(db, PaymentSucceeded(event_id="pay", occurred_at=START, customer_id="c", payment_id="in_1", credits=3))
    async with SqlUnitOfWork(db) as holder:
        [account] = await holder.accounts.lock_many(["c"], {})
        account.issue(4, START + timedelta(hours=1), "more", POLICY)
        await holder.accounts.save(account)

        async def waiter() -> list:
            async with SqlUnitOfWork(db) as uow:
                return await uow.accounts.lock_many(["c", "d"], {})

        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.5)
        assert not waiting.done()
        await holder.commit()
    [c, d] = await waiting
    assert (c.customer_id, c.book_balance, sorted(lot.remaining for lot in c.lots)) == ("c", 7, [3, 4])
    assert (d.customer_id, d.book_balance) == ("d", 0)


async def test_a_customer_created_meanwhile_is_loaded_with_what_its_creator_wrote(db):
    async with SqlUnitOfWork(db) as creator:
        [account] = await creator.accounts.lock_many(["new"], {})
        account.issue(5, START, "first", POLICY)
        await creator.accounts.save(account)

        async def waiter() -> list:
            async with SqlUnitOfWork(db) as uow:
                return await uow.accounts.lock_many(["new"], {})

        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.5)
        await creator.commit()
    [loaded] = await waiting
    assert (loaded.customer_id, [lot.remaining for lot in loaded.lots]) == ("new", [5])
