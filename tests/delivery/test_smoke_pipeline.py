"""The pipeline end to end: producer → real Redis → real dramatiq worker process → PostgreSQL."""

from datetime import UTC, datetime

from sqlalchemy import select

from infra.db.tables import customers
from messages import JobCompleted, PaymentSucceeded, Publisher
from tests.support import eventually, reconciliation


async def test_payment_then_job_reaches_the_ledger(db, redis_client, redis_url, start_workers):
    start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    at = datetime(2026, 1, 5, 12, tzinfo=UTC)
    publisher.publish(
        PaymentSucceeded(event_id="pay-1", customer_id="cust-1", occurred_at=at, payment_id="in_1", credits=4)
    )
    publisher.publish(JobCompleted(event_id="job-1", customer_id="cust-1", occurred_at=at.replace(day=6), job_id="j-1"))

    async def balance_is_three() -> bool:
        async with db.connect() as connection:
            return (
                await connection.execute(select(customers.c.balance).where(customers.c.customer_id == "cust-1"))
            ).scalar() == 3

    await eventually(balance_is_three, message="both events applied")
    assert await reconciliation(db) == []
