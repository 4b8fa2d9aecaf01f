"""Debit throughput for customers with a short history against customers with a long one.

    .venv/bin/python -m bench.debit_scaling --entries 100000

A scratch PostgreSQL database (created, migrated, dropped) holds two groups of
``--customers`` customers. Every customer of the *short* group has 10 ledger entries behind
it; every customer of the *long* group has ``--entries``: that many spent debits with their
lot movements and event records, drawn from 1 spent lot per 100 debits, as years of use
would leave them. Both groups then have one open lot with plenty of credits, and the
tables are analysed (as autovacuum would).

Each group then takes the same ``--debits`` JobCompleted events (one credit, a new job each,
round robin over its customers), applied through ``handlers.apply_event`` with one task per
customer at a time, so customers proceed in parallel and each customer's debits in turn.
The short group runs first and last and its two rates are averaged, so warming caches does not
favour either. Reported: debits/s for each and long ÷ short (the target is ≥ 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.scratch import scratch_database
from domain import CreditPolicy
from infra.db import Database
from messages import JobCompleted
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork

POLICY = CreditPolicy()
SHORT_HISTORY = 10
DEBITS_PER_SPENT_LOT = 100

# One customer's history, set-based: spent lots, debits drawn from them, their movements and
# event records, then one open lot. $1 customer id, $2 number of past debits.
SEED_CUSTOMER = [
    "INSERT INTO customers (customer_id, balance) VALUES ($1::text, 1000000)",
    """INSERT INTO credit_lots (customer_id, source, event_id, amount, remaining, issued_at, expires_at)
       SELECT $1::text, 'payment', $1::text || '-pay-' || g, 100, 0, now() - interval '11 months', now() + interval '1 month'
       FROM generate_series(1, greatest($2::int / 100, 1)) g""",
    """INSERT INTO ledger_entries (customer_id, kind, credits, balance_after, occurred_at, event_id, job_id)
       SELECT $1::text, 'debited', -1, 0, now() - interval '10 months' + make_interval(secs => g), $1::text || '-old-' || g, $1::text || '-oldjob-' || g
       FROM generate_series(1, $2::int) g""",
    """INSERT INTO lot_movements (entry_id, lot_id, credits)
       SELECT e.id, l.id, 1
       FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM ledger_entries WHERE customer_id = $1::text) e
       JOIN (SELECT id, row_number() OVER (ORDER BY id) AS n FROM credit_lots WHERE customer_id = $1::text) l
         ON l.n = (e.n - 1) / 100 + 1""",
    """INSERT INTO processed_events (event_id, event_type, customer_id, fingerprint, payload)
       SELECT event_id, 'JobCompleted', $1::text, md5(event_id), '{}'::json FROM ledger_entries WHERE customer_id = $1::text""",
    """INSERT INTO credit_lots (customer_id, source, event_id, amount, remaining, issued_at, expires_at)
       VALUES ($1::text, 'payment', $1::text || '-open', 1000000, 1000000, now() - interval '1 day', now() + interval '11 months')""",
]


async def _seed(pg: asyncpg.Connection, customer_ids: list[str], history: int) -> None:
    for customer_id in customer_ids:
        async with pg.transaction():
            for statement in SEED_CUSTOMER:
                await pg.execute(statement, *((customer_id, history) if "$2" in statement else (customer_id,)))


async def _debit(db: Database, group: str, customer_ids: list[str], debits: int) -> float:
    """Debits per second: one task per customer, each applying its share in turn."""
    now = datetime.now(UTC)
    per_customer = {customer_id: [] for customer_id in customer_ids}
    for i in range(debits):
        customer_id = customer_ids[i % len(customer_ids)]
        per_customer[customer_id].append(
            JobCompleted(
                event_id=f"{group}-new-{i}",
                occurred_at=now - timedelta(seconds=debits - i),
                customer_id=customer_id,
                job_id=f"{group}-job-{i}",
                credits=1,
            )
        )

    async def run_customer(events: list[JobCompleted]) -> None:
        for event in events:
            await handlers.apply_event(event, SqlUnitOfWork(db), POLICY)

    started = time.perf_counter()
    await asyncio.gather(*(run_customer(events) for events in per_customer.values()))
    return debits / (time.perf_counter() - started)


async def run(customers: int, entries: int, debits: int) -> None:
    async with scratch_database() as scratch:
        pg = await asyncpg.connect(scratch.dsn)
        short = [f"short-{i}" for i in range(customers)]
        long = [f"long-{i}" for i in range(customers)]
        seeding = time.perf_counter()
        await _seed(pg, short, SHORT_HISTORY)
        await _seed(pg, long, entries)
        await pg.execute("VACUUM ANALYZE")
        seeded = time.perf_counter() - seeding
        rows = await pg.fetchval("SELECT count(*) FROM ledger_entries")
        await pg.close()

        db = Database(scratch.url, pool_size=customers)
        short_first = await _debit(db, "short1", short, debits)
        long_rate = await _debit(db, "long", long, debits)
        short_last = await _debit(db, "short2", short, debits)
        await db.dispose()

    short_rate = (short_first + short_last) / 2
    print(
        f"{customers} customers per group, {debits:,} debits per run, {rows:,} ledger entries seeded in {seeded:.0f} s, {os.cpu_count()} CPUs"
    )
    print(f"  {'':44} {'debits/s':>9}")
    print(f"  {f'{SHORT_HISTORY} entries per customer (before, after)':44} {short_first:>9,.0f} {short_last:>9,.0f}")
    print(f"  {f'{entries:,} entries per customer':44} {long_rate:>9,.0f}")
    print(f"  {'long / short':44} {long_rate / short_rate:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=16)
    parser.add_argument(
        "--entries", type=int, default=100_000, help="ledger entries behind each customer of the long group"
    )
    parser.add_argument("--debits", type=int, default=4000)
    args = parser.parse_args()
    asyncio.run(run(args.customers, args.entries, args.debits))


if __name__ == "__main__":
    main()
