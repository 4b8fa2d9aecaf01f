"""Expiry sweep throughput against its ceiling, measured in one process.

    .venv/bin/python -m bench.sweep --lots 20000

Both runs start from the same data in a scratch PostgreSQL database (created and dropped):
N customers with one due lot each. The baseline is one set-based statement doing the raw
work (zero the lots, write one expiry entry each); the sweep is `expire_due_credits`, which
also writes lot movements, balances and depletion times through the domain rules. Reported:
lots per second for each and the sweep as a fraction of the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from datetime import datetime, timezone

import asyncpg
from alembic import command
from sqlalchemy import text

from infra.db import Database
from infra.db.engine import alembic_config
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork

ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = "customers, credit_lots, ledger_entries, lot_movements, holds, processed_events, dead_letters"

SET_BASED = """
WITH due AS (
    UPDATE credit_lots SET remaining = 0
    WHERE remaining > 0 AND expires_at <= :now
    RETURNING customer_id, id, remaining AS before, expires_at
)
INSERT INTO ledger_entries (customer_id, kind, credits, balance_after, overdraft_change, occurred_at, event_id, note)
SELECT customer_id, 'expired', -5, 0, 0, expires_at, 'bench', 'expired' FROM due
"""


async def _seed(db: Database, lots: int) -> None:
    async with db.begin() as connection:
        await connection.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
        await connection.execute(text("INSERT INTO customers (customer_id, balance) SELECT 'c' || g, 5 FROM generate_series(1, :n) g"), {"n": lots})
        await connection.execute(
            text(
                "INSERT INTO credit_lots (customer_id, source, event_id, amount, remaining, issued_at, expires_at) "
                "SELECT 'c' || g, 'payment', 'e' || g, 5, 5, now() - interval '13 months', "
                "now() - interval '1 month' + make_interval(secs => g) FROM generate_series(1, :n) g"
            ),
            {"n": lots},
        )


async def run(lots: int, batch_size: int) -> None:
    name = f"credits_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    try:
        await asyncio.to_thread(command.upgrade, alembic_config(url), "head")
        db = Database(url)
        now = datetime.now(timezone.utc)

        await _seed(db, lots)
        started = time.perf_counter()
        async with db.begin() as connection:
            await connection.execute(text(SET_BASED), {"now": now})
        baseline = lots / (time.perf_counter() - started)

        await _seed(db, lots)
        started = time.perf_counter()
        result = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), now, batch_size)
        sweep = lots / (time.perf_counter() - started)
        assert result.entries == lots, result
        await db.dispose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
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
