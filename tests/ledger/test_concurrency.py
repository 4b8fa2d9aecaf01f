"""Concurrent events on several worker processes never lose an update nor overdraw a lot.

Two real worker processes × four threads consume one queue; the per-customer row lock is all
that serialises them. Any lost update shows up as a wrong final balance, a broken
`balance_after` chain, a job charged twice or not at all, or a negative lot.
"""

from __future__ import annotations

import random
from collections import Counter
from datetime import timedelta

import redis
from sqlalchemy import func, select

from infra.db.tables import credit_lots, customers, dead_letters, ledger_entries, processed_events
from messages import CreditsAdjusted, Publisher
from tests.support import assert_serial_chain, entries_by_customer, reconciliation, wait_until
from tests.support.delivery import T0, dead_lettered, job, payment, scalar, wait_for_outcomes

CHARGE_KINDS = ("debited", "captured")


def both_processes_busy(message_broker, redis_client: redis.Redis) -> bool:
    """Redis: two worker ids (one per process) hold fetched, unacked event messages at once.
    RabbitMQ: both processes are attached as consumers while the queue still has work."""
    if message_broker.kind == "rabbitmq":
        return message_broker.consumers("credit_events") == 2 and message_broker.waiting("credit_events") > 0
    holding = {
        key.decode().split(".")[1]
        for key in redis_client.scan_iter("dramatiq:__acks__.*.credit_events")
        if redis_client.scard(key) > 0
    }
    return len(holding) == 2


async def test_hundreds_of_jobs_for_one_customer_on_two_processes(db, message_broker, start_workers):
    workers = start_workers(processes=2, threads=4, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    issued, jobs = 150, 300

    message_ids = [publisher.publish(payment("conc-pay", "cust-hot", issued))]
    message_ids += [
        publisher.publish(job(f"conc-done-{n}", "cust-hot", f"conc-job-{n}", at=T0 + timedelta(minutes=n + 1)))
        for n in range(jobs)
    ]
    # Both processes really are consuming at the same time (each holds fetched, unacked messages).
    redis_client = redis.Redis.from_url(message_broker.url) if message_broker.kind == "redis" else None
    wait_until(
        lambda: both_processes_busy(message_broker, redis_client),
        timeout=30,
        message="both worker processes busy at once",
    )
    outcomes = wait_for_outcomes(workers, message_ids, timeout=90)
    assert Counter(outcomes.values()) == {"event_applied": jobs + 1}

    async with db.connect() as connection:
        customer = (
            (await connection.execute(select(customers).where(customers.c.customer_id == "cust-hot"))).mappings().one()
        )
        lots = (await connection.execute(select(credit_lots.c.amount, credit_lots.c.remaining))).all()
        charges = Counter(
            (
                await connection.execute(
                    select(ledger_entries.c.job_id).where(
                        ledger_entries.c.kind.in_(CHARGE_KINDS), ledger_entries.c.credits == -1
                    )
                )
            ).scalars()
        )
        lowest = (await connection.execute(select(func.min(credit_lots.c.remaining)))).scalar()
    # Exactly issued − jobs, the shortfall held as overdraft, the lot spent to zero and no further.
    assert (customer["balance"], customer["overdraft"]) == (issued - jobs, jobs - issued)
    assert lots == [(issued, 0)] and lowest == 0
    assert customer["credits_depleted_at"] is not None
    # Every job charged exactly once.
    assert charges == {f"conc-job-{n}": 1 for n in range(jobs)}
    entries = (await entries_by_customer(db))["cust-hot"]
    assert Counter(e["kind"] for e in entries) == {"issued": 1, "debited": jobs}
    assert_serial_chain("cust-hot", entries)
    assert await reconciliation(db) == []
    assert await scalar(db, select(func.count()).select_from(processed_events)) == jobs + 1
    assert await scalar(db, select(func.count()).select_from(dead_letters)) == 0
    assert dead_lettered(message_broker) == {}
    publisher.close()


async def test_many_customers_interleaved_with_redeliveries(db, message_broker, start_workers):
    workers = start_workers(processes=2, threads=4, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    rng = random.Random(20260302)
    events, expected = [], {}
    for c in range(25):
        customer = f"cust-{c:02d}"
        paid = [rng.randint(1, 30), rng.randint(1, 30)]
        spent = [rng.randint(1, 5) for _ in range(12)]
        adjusted = rng.choice([-7, -2, 3, 9])
        events += [
            payment(f"{customer}-pay-{i}", customer, credits, at=T0 + timedelta(days=5 * i))
            for i, credits in enumerate(paid)
        ]
        events += [
            job(
                f"{customer}-done-{j}",
                customer,
                f"{customer}-job-{j}",
                at=T0 + timedelta(days=1, hours=j),
                credits=credits,
            )
            for j, credits in enumerate(spent)
        ]
        events.append(
            CreditsAdjusted(
                event_id=f"{customer}-adj",
                customer_id=customer,
                occurred_at=T0 + timedelta(days=2),
                credits=adjusted,
                reason="goodwill",
                actor="ops",
            )
        )
        expected[customer] = sum(paid) + adjusted - sum(spent)
    # At-least-once delivery: a fifth of the events arrive twice; everything arrives shuffled.
    deliveries = events + rng.sample(events, len(events) // 5)
    rng.shuffle(deliveries)
    message_ids = [publisher.publish(event) for event in deliveries]
    outcomes = wait_for_outcomes(workers, message_ids, timeout=90)
    assert Counter(outcomes.values()) == {
        "event_applied": len(events),
        "event_duplicate": len(deliveries) - len(events),
    }

    async with db.connect() as connection:
        rows = {r.customer_id: r for r in (await connection.execute(select(customers))).all()}
        remaining = dict(
            (
                await connection.execute(
                    select(credit_lots.c.customer_id, func.sum(credit_lots.c.remaining)).group_by(
                        credit_lots.c.customer_id
                    )
                )
            ).all()
        )
        lowest = (await connection.execute(select(func.min(credit_lots.c.remaining)))).scalar()
    assert {c: rows[c].balance for c in expected} == expected
    assert {c: rows[c].overdraft for c in expected} == {c: max(0, -b) for c, b in expected.items()}
    assert {c: remaining.get(c, 0) for c in expected} == {c: max(0, b) for c, b in expected.items()}
    assert lowest >= 0
    grouped = await entries_by_customer(db)
    for customer, entries in grouped.items():
        assert_serial_chain(customer, entries)
        jobs = Counter(e["job_id"] for e in entries if e["kind"] in CHARGE_KINDS)
        assert jobs == {f"{customer}-job-{j}": 1 for j in range(12)}
    assert sum(len(entries) for entries in grouped.values()) == len(events)
    assert await reconciliation(db) == []
    assert await scalar(db, select(func.count()).select_from(processed_events)) == len(events)
    assert dead_lettered(message_broker) == {}
    publisher.close()
