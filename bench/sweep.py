"""Expiry sweep throughput against its ceiling, measured in one process.

    .venv/bin/python -m bench.sweep --lots 20000

Both runs start from the same data in a scratch PostgreSQL database (created and dropped):
N customers with one due lot each. The baseline is one set-based statement making the same
writes (zero the lots, one expiry entry and lot movement each, balances, depletion times,
a depletion notice per customer left with nothing); the sweep is `expire_due_credits`, which
makes them through the domain rules, a batch of customers per transaction. Reported:
lots per second for each and the sweep as a fraction of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from sqlalchemy import text

from bench.scratch import scratch_database
from infra.db import Database
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork

TABLES = "customers, credit_lots, ledger_entries, lot_movements, holds, processed_events, dead_letters, notifications"

# The same writes as the sweep, in one statement: each due lot zeroed (its expired part
# recorded), one expiry entry and one lot movement per lot, each customer's balance and
# depletion time, and a depletion notice for each customer left with nothing.
SET_BASED = """
WITH due AS (
    SELECT l.id, l.customer_id, l.remaining, l.expires_at FROM credit_lots l
    WHERE l.remaining > 0 AND l.expires_at <= :now
    FOR UPDATE
), zeroed AS (
    UPDATE credit_lots l SET remaining = 0, expired = l.expired + due.remaining FROM due WHERE l.id = due.id
), entries AS (
    INSERT INTO ledger_entries (customer_id, kind, credits, balance_after, overdraft_change, occurred_at, event_id, lot_id, note)
    SELECT due.customer_id, 'expired', -due.remaining, c.balance - due.remaining, 0, due.expires_at, 'sweep', due.id, 'expired'
    FROM due JOIN customers c USING (customer_id)
    RETURNING id, lot_id, -credits AS credits
), movements AS (
    INSERT INTO lot_movements (entry_id, lot_id, credits) SELECT id, lot_id, credits FROM entries
), balances AS (
    UPDATE customers c SET balance = c.balance - d.credits,
        credits_depleted_at = CASE WHEN c.balance = d.credits THEN d.last_expiry ELSE c.credits_depleted_at END, updated_at = now()
    FROM (SELECT customer_id, sum(remaining) AS credits, max(expires_at) AS last_expiry FROM due GROUP BY customer_id) d
    WHERE c.customer_id = d.customer_id
    RETURNING c.customer_id, c.balance, c.credits_depleted_at
)
INSERT INTO notifications (key, customer_id, kind, subject, body, created_at, status, send_after)
SELECT 'credits_depleted:' || customer_id || ':' || credits_depleted_at, customer_id, 'credits_depleted',
       'You are out of credits', 'You have no credits left.', now(), 'no_address', now()
FROM balances WHERE balance = 0
ON CONFLICT DO NOTHING
"""


async def _seed(db: Database, lots: int) -> None:
    async with db.begin() as connection:
        await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        await connection.execute(
            text("INSERT INTO customers (customer_id, balance) SELECT 'c' || g, 5 FROM generate_series(1, :n) g"),
            {"n": lots},
        )
        await connection.execute(
            text(
                "INSERT INTO credit_lots (customer_id, source, event_id, amount, remaining, issued_at, expires_at) "
                "SELECT 'c' || g, 'payment', 'e' || g, 5, 5, now() - interval '13 months', "
                "now() - interval '1 month' + make_interval(secs => g) FROM generate_series(1, :n) g"
            ),
            {"n": lots},
        )
        await connection.execute(text("ANALYZE"))  # as autovacuum would before the hourly sweep


async def _check_writes(db: Database, lots: int, who: str) -> None:
    """Both runs must have made the same writes: every lot zeroed with its entry, movement,
    balance and depletion notice."""
    async with db.connect() as connection:
        counts = (
            await connection.execute(
                text(
                    "SELECT (SELECT count(*) FROM credit_lots WHERE remaining = 0 AND expired = amount),"
                    " (SELECT count(*) FROM ledger_entries WHERE kind = 'expired'), (SELECT count(*) FROM lot_movements),"
                    " (SELECT count(*) FROM customers WHERE balance = 0 AND credits_depleted_at IS NOT NULL),"
                    " (SELECT count(*) FROM notifications WHERE kind = 'credits_depleted')"
                )
            )
        ).one()
    if tuple(counts) != (lots,) * 5:
        raise AssertionError(
            f"{who} wrote (lots, entries, movements, depleted customers, notices) = {tuple(counts)}, expected {lots} each"
        )


async def run(lots: int, batch_size: int) -> None:
    async with scratch_database() as scratch:
        db = Database(scratch.url)
        now = datetime.now(UTC)

        await _seed(db, lots)
        started = time.perf_counter()
        async with db.begin() as connection:
            await connection.execute(text(SET_BASED), {"now": now})
        baseline = lots / (time.perf_counter() - started)
        await _check_writes(db, lots, "set-based statement")

        await _seed(db, lots)
        started = time.perf_counter()
        result = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size)
        sweep = lots / (time.perf_counter() - started)
        assert result.entries == lots, result
        await _check_writes(db, lots, "expire_due_credits")
        await db.dispose()
    print(f"lots {lots}, batch {batch_size}")
    print(f"  set-based statement (ceiling)  {baseline:>10,.0f} lots/s")
    print(f"  expire_due_credits             {sweep:>10,.0f} lots/s")
    print(f"  sweep / ceiling                {sweep / baseline:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lots", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(run(args.lots, args.batch_size))


if __name__ == "__main__":
    main()
