"""What one read of the web's /metrics figures costs the database, by hand.

    .venv/bin/python -m bench.metrics_scrape --events 1000000

A scratch database (bench/scratch.py) is seeded with set-based SQL: ``--events`` rows of
processed_events (14 types, a payload of the usual size), a dead letter per 10,000 events,
a dunning case per 100 events, a payout per 1,000, a pending notification per 1,000 and a
customer per 10 (a tenth of them out of credits for weeks), then ``VACUUM ANALYZE``d.

Timed, ``--repetitions`` times each after one warm-up: ``read_figures`` (every query of a
scrape) with the 0008 indexes, then the same with them dropped (what a scrape would cost
without them). Printed: p50 and max in ms. A scrape is served from the cache between reads
(METRICS_CACHE_SECONDS), so this is the database's cost per cache period, not per scrape.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from datetime import UTC, datetime

import asyncpg

from bench.scratch import scratch_database
from infra.db import Database
from messages.events import EVENT_TYPES
from service_layer.business_figures import read_figures

SEED = """
INSERT INTO processed_events (event_id, event_type, customer_id, fingerprint, payload)
SELECT 'evt-' || i, (ARRAY[{types}])[1 + i % {ntypes}], 'cust-' || (i % ($1 / 10 + 1)), md5(i::text),
       json_build_object('event_id', 'evt-' || i, 'customer_id', 'cust-' || i, 'credits', 10, 'occurred_at', now(), 'job_id', 'job-' || i)
FROM generate_series(1, $1) AS i;
INSERT INTO dead_letters (message_id, queue_name, actor_name, message)
SELECT 'm-' || i, 'credit_events', 'apply_event', '{{"kwargs":{{"event":"{{\\"type\\":\\"job.completed\\"}}"}}}}'
FROM generate_series(1, $1 / 10000) AS i;
INSERT INTO dunning_cases (customer_id, invoice_id, status, first_failed_at)
SELECT 'cust-' || i, 'in_' || i, (ARRAY['retrying','past_due','recovered','closed'])[1 + i % 4], now()
FROM generate_series(1, $1 / 100) AS i;
INSERT INTO payouts (payee_id, period, method, gateway, amount_cents, currency, status, idempotency_key, created_at)
SELECT 'payee-' || i, 'week-1', 'manual', 'manual', 2000, 'USD', (ARRAY['paid','pending','failed'])[1 + i % 3], 'k-' || i, now()
FROM generate_series(1, $1 / 1000) AS i;
INSERT INTO notifications (key, customer_id, kind, subject, body, created_at, status, send_after)
SELECT 'n-' || i, 'cust-' || i, 'test', 's', 'b', now(), 'pending', now() FROM generate_series(1, $1 / 1000) AS i;
INSERT INTO customers (customer_id, credits_depleted_at)
SELECT 'cust-' || i, CASE WHEN i % 10 = 0 THEN now() - interval '30 days' END FROM generate_series(0, $1 / 10) AS i;
"""


async def seed(dsn: str, events: int) -> None:
    types = ", ".join(f"'{kind}'" for kind in EVENT_TYPES)
    connection = await asyncpg.connect(dsn)
    try:
        for statement in SEED.format(types=types, ntypes=len(EVENT_TYPES)).split(";\n"):
            if statement.strip():
                await connection.execute(statement, events)
        await connection.execute("VACUUM ANALYZE")
    finally:
        await connection.close()


async def timed(db: Database, repetitions: int) -> list[float]:
    now = datetime.now(UTC)
    await read_figures(db, now, 14, 60_000)
    times = []
    for _ in range(repetitions):
        started = time.perf_counter()
        await read_figures(db, now, 14, 60_000)
        times.append((time.perf_counter() - started) * 1000)
    return times


async def main(events: int, repetitions: int) -> None:
    async with scratch_database() as scratch:
        await seed(scratch.dsn, events)
        db = Database(scratch.url)
        try:
            rows = [("with the 0008 indexes", await timed(db, repetitions))]
            async with db.begin() as connection:
                await connection.exec_driver_sql("DROP INDEX ix_processed_events_type")
                await connection.exec_driver_sql("DROP INDEX ix_dunning_cases_status")
            rows.append(("without them", await timed(db, repetitions)))
        finally:
            await db.dispose()
    print(f"{events:,} processed events; read_figures, ms over {repetitions} reads")
    for label, times in rows:
        print(f"  {label:<24} p50 {statistics.median(times):8.1f}   max {max(times):8.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repetitions", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.repetitions))
