"""The expiry sweep in batches on PostgreSQL: bounded work per call, nothing skipped, nothing twice."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from domain import CreditPolicy
from infra.db.tables import credit_lots, ledger_entries
from messages import PaymentSucceeded
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import reconciliation

ISSUED = datetime(2024, 3, 1, tzinfo=UTC)


async def test_a_sweep_stops_at_its_batch_budget_and_the_next_call_finishes(db):
    policy = CreditPolicy()
    for n in range(7):
        event = PaymentSucceeded(
            event_id=f"pay-{n}",
            customer_id=f"c{n}",
            occurred_at=ISSUED + timedelta(hours=n),
            payment_id=f"in_{n}",
            credits=n + 1,
        )
        await handlers.apply_event(event, SqlUnitOfWork(db), policy)
    now = ISSUED + timedelta(days=400)

    first = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size=2, max_batches=2)
    assert (first.customers, first.entries, first.more) == (4, 4, True)

    rest = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size=2, max_batches=None)
    assert (rest.customers, rest.entries, rest.more) == (3, 3, False)

    again = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size=2)
    assert (again.customers, again.entries) == (0, 0)

    async with db.connect() as connection:
        left = (await connection.execute(select(func.sum(credit_lots.c.remaining)))).scalar_one()
        expired = (
            await connection.execute(
                select(func.sum(ledger_entries.c.credits)).where(ledger_entries.c.kind == "expired")
            )
        ).scalar_one()
    assert left == 0
    assert expired == -sum(range(1, 8))
    assert await reconciliation(db) == []


async def test_a_sweep_passes_over_customers_another_transaction_holds(db):
    policy = CreditPolicy()
    for n in range(5):
        event = PaymentSucceeded(
            event_id=f"pay-{n}", customer_id=f"c{n}", occurred_at=ISSUED, payment_id=f"in_{n}", credits=2
        )
        await handlers.apply_event(event, SqlUnitOfWork(db), policy)
    now = ISSUED + timedelta(days=400)

    # c0 is busy (an event worker holds its row lock) and its lots are the first due.
    async with SqlUnitOfWork(db) as busy:
        await busy.accounts.lock("c0", create=False)
        swept = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size=1)
    assert (swept.customers, swept.entries, swept.more) == (4, 4, False)

    later = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size=1)
    assert (later.customers, later.entries) == (1, 1)
    assert await reconciliation(db) == []
