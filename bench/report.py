"""The admins' 14-day report (customers out of credits too long) against its own SQL, measured in one process.

    .venv/bin/python -m bench.report --customers 1000000

A scratch PostgreSQL database (created with a random name, migrated with alembic, dropped at
the end) is seeded with set-based SQL, then ``VACUUM ANALYZE``d as autovacuum would:

* ``--customers`` customers: ~90% with credits (``credits_depleted_at`` NULL), ~10% out of
  credits, depleted at times spread over the last 120 days, skewed towards recent ones so
  that about half of them have been out for more than 14 days (the report's rows);
* ``dunning_cases`` for a few percent of customers: an open or settled case for ~30% of the
  depleted customers and ~0.5% of the others (retrying, action_required,
  needs_payment_method, past_due with or without ``subscription_cancelled_at``, recovered,
  closed), plus an older recovered case for ~2% of all customers, so "the latest case" has
  something to choose from.

The random draws are seeded, so a run on the same ``--customers`` sees the same data.

Measured, each ``--repetitions`` times after ``--warm-up`` rounds, interleaved round robin (one
of each per round, so background load on the machine falls on every row alike), with the
report's clock fixed so that every row sees the same cutoff and the same rows:

* baseline: the report's own two statements (count, then the first page of the route's
  default size) sent with asyncpg on one connection. They are the exact SQL text and
  parameters SQLAlchemy sends for ``views.depleted_customers``, captured from the engine's
  ``before_cursor_execute`` event, so nothing is re-typed here;
* the count statement alone, and the count plus the last page (a deep OFFSET), the same way;
* ``views.depleted_customers`` through the project's ``Database`` (SQLAlchemy async): pool
  check-out with pre-ping, BEGIN, the two statements, rollback, rows to dataclasses;
* the routes through a real uvicorn server on 127.0.0.1, run in a thread of this process like
  ``tests.support.InProcessServer``, called with httpx (keep-alive, admin bearer token):
  ``GET /api/admin/credits-report`` (first and last page) and ``GET /api/admin/at-risk-count``
  (the menu bubble). These include httpx and the server sharing this process's GIL.

Before timing, the route, the view and the SQL must give the same total and the same first
page. Printed: the scale; how many custom and generic plans PostgreSQL used for the timed
prepared statements (``pg_prepared_statements``); ``EXPLAIN (ANALYZE, BUFFERS)`` of the count,
the first page and the last page (run once after timing, with the same parameters); then p50
and p99 in ms per row, the baseline's p50 divided by each row's p50, and whether the route's
p50 meets the spec's 50 ms. Writes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import httpx
from sqlalchemy import event

from api.app import create_app
from bench.scratch import ScratchDatabase, scratch_database
from infra.clock import FixedClock
from infra.db import Database
from infra.settings import load_settings
from service_layer import views
from tests.support import InProcessServer

#: The route's default ``limit`` (api/app.py, credits_report); checked against its answer.
ROUTE_PAGE_SIZE = 100
#: The spec's target for the report's p50.
TARGET_P50_MS = 50.0
ADMIN_TOKEN = "bench-admin-token-" + uuid.uuid4().hex
FRONTEND_TOKEN = "bench-frontend-token-" + uuid.uuid4().hex

PLAN_KINDS = "SELECT statement, custom_plans, generic_plans FROM pg_prepared_statements"

SEED_CUSTOMERS = """
INSERT INTO customers (customer_id, balance, overdraft, credits_depleted_at, created_at, updated_at)
SELECT customer_id,
       CASE WHEN depleted_at IS NULL THEN 1 + floor(random() * 200)::int ELSE 0 END,
       0,
       depleted_at,
       created_at,
       coalesce(depleted_at, created_at)
FROM (
    SELECT 'c' || g AS customer_id,
           -- ~10% depleted; age = 120 days x u^3.1 puts half of them under 14 days.
           CASE WHEN random() < 0.10 THEN now() - interval '120 days' * power(random(), 3.1) END AS depleted_at,
           now() - interval '1200 days' - interval '1 day' * floor(random() * 800) AS created_at
    FROM generate_series(1, $1::int) AS g
) AS drawn
"""

#: The current case of ~30% of depleted customers and ~0.5% of the others, in every status.
SEED_CURRENT_CASES = """
INSERT INTO dunning_cases (customer_id, invoice_id, status, first_failed_at, attempts_made, next_retry_at,
                           last_failure_at, last_decline_code, last_failure_message, subscription_id,
                           closed_at, subscription_cancelled_at)
SELECT customer_id,
       'in_' || customer_id || '_current',
       status,
       first_failed_at,
       CASE status WHEN 'retrying' THEN floor(random() * 4)::int WHEN 'past_due' THEN 4 ELSE 1 + floor(random() * 3)::int END,
       CASE WHEN status = 'retrying' THEN now() + interval '1 hour' * (1 + floor(random() * 160)) END,
       first_failed_at + interval '1 day' * floor(random() * 14),
       CASE WHEN status IN ('recovered', 'closed') THEN NULL ELSE 'insufficient_funds' END,
       CASE WHEN status IN ('recovered', 'closed') THEN NULL ELSE 'Your card has insufficient funds.' END,
       'sub_' || customer_id,
       CASE WHEN status IN ('recovered', 'closed') THEN first_failed_at + interval '5 days' END,
       CASE WHEN status = 'past_due' AND random() < 0.33 THEN first_failed_at + interval '15 days' END
FROM (
    SELECT customer_id,
           now() - interval '1 day' * (1 + floor(random() * 45)) AS first_failed_at,
           (ARRAY['retrying', 'retrying', 'retrying', 'retrying', 'action_required', 'needs_payment_method',
                  'past_due', 'past_due', 'past_due', 'recovered', 'closed'])[1 + floor(random() * 11)::int] AS status
    FROM customers
    WHERE random() < CASE WHEN credits_depleted_at IS NULL THEN 0.005 ELSE 0.30 END
) AS drawn
"""

#: An older, settled case for ~2% of all customers: history the latest-case lookup must skip.
SEED_PAST_CASES = """
INSERT INTO dunning_cases (customer_id, invoice_id, status, first_failed_at, attempts_made, subscription_id, closed_at)
SELECT customer_id, 'in_' || customer_id || '_past', 'recovered', first_failed_at, 2, 'sub_' || customer_id, first_failed_at + interval '3 days'
FROM (
    SELECT customer_id, now() - interval '1 day' * (150 + floor(random() * 250)) AS first_failed_at
    FROM customers
    WHERE random() < 0.02
) AS drawn
"""


@dataclass(frozen=True)
class Statement:
    """One statement exactly as SQLAlchemy hands it to asyncpg: SQL text and positional parameters."""

    sql: str
    parameters: tuple


@dataclass(frozen=True)
class Latency:
    p50: float
    p99: float


Probe = Callable[[], Awaitable[object]]


async def _seed(pg: asyncpg.Connection, customers: int) -> dict[str, int]:
    """Set-based seeding, then VACUUM ANALYZE; returns row counts."""
    await pg.execute("SELECT setseed(0.42)")
    async with pg.transaction():
        await pg.execute(SEED_CUSTOMERS, customers)
        await pg.execute(SEED_CURRENT_CASES)
        await pg.execute(SEED_PAST_CASES)
    await pg.execute("VACUUM ANALYZE customers")
    await pg.execute("VACUUM ANALYZE dunning_cases")
    return {
        "depleted": await pg.fetchval("SELECT count(*) FROM customers WHERE credits_depleted_at IS NOT NULL"),
        "dunning_cases": await pg.fetchval("SELECT count(*) FROM dunning_cases"),
        "customers_with_cases": await pg.fetchval("SELECT count(DISTINCT customer_id) FROM dunning_cases"),
    }


async def _report_statements(
    db: Database, now: datetime, days: int, limit: int, offset: int
) -> tuple[Statement, Statement]:
    """The (count, page) statements ``views.depleted_customers`` sends, captured as sent."""
    sent: list[Statement] = []

    def capture(connection, cursor, statement, parameters, context, executemany) -> None:
        sent.append(Statement(statement, tuple(parameters or ())))

    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await views.depleted_customers(db, now, days, limit, offset)
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    if len(sent) != 2:
        raise RuntimeError(
            f"expected views.depleted_customers to send 2 statements (count, page), saw {len(sent)}: {[s.sql[:60] for s in sent]}"
        )
    return sent[0], sent[1]


async def _explain(pg: asyncpg.Connection, statement: Statement) -> list[str]:
    rows = await pg.fetch("EXPLAIN (ANALYZE, BUFFERS) " + statement.sql, *statement.parameters)
    return [row[0] for row in rows]


async def _measure(probes: dict[str, Probe], repetitions: int, warm_up: int) -> dict[str, Latency]:
    """Every probe once per round, in order; the first ``warm_up`` rounds are not recorded."""
    samples: dict[str, list[float]] = {name: [] for name in probes}
    for round_number in range(warm_up + repetitions):
        for name, probe in probes.items():
            started = time.perf_counter()
            await probe()
            elapsed_ms = (time.perf_counter() - started) * 1000
            if round_number >= warm_up:
                samples[name].append(elapsed_ms)
    latencies = {}
    for name, values in samples.items():
        values.sort()
        latencies[name] = Latency(
            p50=statistics.median(values), p99=values[min(len(values) - 1, int(len(values) * 0.99))]
        )
    return latencies


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise RuntimeError(f"{response.request.url} answered {response.status_code}: {response.text[:300]}")
    return response


async def run(customers: int, repetitions: int, warm_up: int) -> None:
    async with scratch_database() as scratch:
        await _run_on(scratch, customers, repetitions, warm_up)


async def _run_on(scratch: ScratchDatabase, customers: int, repetitions: int, warm_up: int) -> None:
    url = scratch.url
    pg = db = None
    try:
        # Prepared statements kept for the whole run, as SQLAlchemy's asyncpg dialect keeps its own.
        pg = await asyncpg.connect(scratch.dsn, max_cached_statement_lifetime=0)
        seeding_started = time.perf_counter()
        counts = await _seed(pg, customers)
        seeding_seconds = time.perf_counter() - seeding_started

        settings = load_settings(
            database_url=url, redis_url=None, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN
        )
        days = settings.depleted_report_days
        now = datetime.now(UTC)
        db = Database(url, pool_size=settings.db_pool_size)

        count, first_page = await _report_statements(db, now, days, ROUTE_PAGE_SIZE, 0)
        total = await pg.fetchval(count.sql, *count.parameters)
        if total == 0:
            raise RuntimeError("the seeded data has nobody in the report; nothing to measure")
        last_offset = (total - 1) // ROUTE_PAGE_SIZE * ROUTE_PAGE_SIZE
        _, last_page = await _report_statements(db, now, days, ROUTE_PAGE_SIZE, last_offset)

        async with (
            InProcessServer(create_app(settings, clock=FixedClock(now))) as server,
            httpx.AsyncClient(
                base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60
            ) as http,
        ):
            # Every path answers the same before anything is timed.
            report = _checked(await http.get("/api/admin/credits-report")).json()
            view_total, view_page = await views.depleted_customers(db, now, days, ROUTE_PAGE_SIZE, 0)
            bubble = _checked(await http.get("/api/admin/at-risk-count")).json()["count"]
            sql_page = [row["customer_id"] for row in await pg.fetch(first_page.sql, *first_page.parameters)]
            if report["limit"] != ROUTE_PAGE_SIZE or report["days"] != days:
                raise RuntimeError(
                    f"the route's defaults moved: limit {report['limit']}, days {report['days']}; update ROUTE_PAGE_SIZE"
                )
            if not (report["total"] == view_total == bubble == total):
                raise RuntimeError(
                    f"totals differ: route {report['total']}, view {view_total}, bubble {bubble}, SQL {total}"
                )
            if not ([c["customer_id"] for c in report["customers"]] == [c.customer_id for c in view_page] == sql_page):
                raise RuntimeError("the first page differs between the route, the view and the SQL")

            async def report_sql() -> None:
                await pg.fetchval(count.sql, *count.parameters)
                await pg.fetch(first_page.sql, *first_page.parameters)

            async def count_sql() -> None:
                await pg.fetchval(count.sql, *count.parameters)

            async def last_page_sql() -> None:
                await pg.fetchval(count.sql, *count.parameters)
                await pg.fetch(last_page.sql, *last_page.parameters)

            async def get(path: str) -> None:
                _checked(await http.get(path))

            probes: dict[str, Probe] = {
                "baseline: count + first page, asyncpg": report_sql,
                "count alone, asyncpg": count_sql,
                "views.depleted_customers, first page": lambda: views.depleted_customers(
                    db, now, days, ROUTE_PAGE_SIZE, 0
                ),
                "GET /api/admin/credits-report": lambda: get("/api/admin/credits-report"),
                "GET /api/admin/at-risk-count": lambda: get("/api/admin/at-risk-count"),
                f"count + last page (offset {last_offset:,}), asyncpg": last_page_sql,
                "views.depleted_customers, last page": lambda: views.depleted_customers(
                    db, now, days, ROUTE_PAGE_SIZE, last_offset
                ),
                "GET /api/admin/credits-report, last page": lambda: get(
                    f"/api/admin/credits-report?offset={last_offset}"
                ),
            }
            latencies = await _measure(probes, repetitions, warm_up)

        # Which plans PostgreSQL ran the timed statements with: EXPLAIN below shows a custom
        # plan (parameters known); after five executions a prepared statement may go generic.
        plan_kinds = {
            row["statement"]: (row["custom_plans"], row["generic_plans"]) for row in await pg.fetch(PLAN_KINDS)
        }
        custom_count, generic_count = plan_kinds.get(count.sql, (0, 0))
        custom_page, generic_page = plan_kinds.get(first_page.sql, (0, 0))  # the last page is the same text
        plans = {
            "count": await _explain(pg, count),
            "first page": await _explain(pg, first_page),
            f"last page (offset {last_offset:,})": await _explain(pg, last_page),
        }
        server_version = await pg.fetchval("SHOW server_version")
    finally:
        if db is not None:
            await db.dispose()
        if pg is not None:
            await pg.close()

    print(
        f"customers {customers:,}: {counts['depleted']:,} depleted, {total:,} of them for more than {days} days (the report); "
        f"{counts['dunning_cases']:,} dunning cases over {counts['customers_with_cases']:,} customers; seeded in {seeding_seconds:.0f} s"
    )
    print(
        f"PostgreSQL {server_version}, {os.cpu_count()} CPUs, {repetitions} repetitions after {warm_up} warm-up rounds, page size {ROUTE_PAGE_SIZE}"
    )
    print(
        f"plans used while timing (pg_prepared_statements, baseline connection): count {custom_count} custom / {generic_count} generic, "
        f"page (first and last) {custom_page} custom / {generic_page} generic; EXPLAIN shows the custom plan"
    )
    for label, plan in plans.items():
        print(f"\nEXPLAIN (ANALYZE, BUFFERS), {label}:")
        for line in plan:
            print(f"    {line}")

    baseline = latencies["baseline: count + first page, asyncpg"].p50
    print(f"\n  {'':52} {'p50 ms':>8} {'p99 ms':>8} {'baseline/this':>14}")
    for label, latency in latencies.items():
        print(f"  {label:52} {latency.p50:>8.2f} {latency.p99:>8.2f} {baseline / latency.p50:>14.2f}")
    print("  (baseline/this: the baseline's p50 over the row's p50; below 1 the row is slower than the baseline)")
    route = latencies["GET /api/admin/credits-report"].p50
    verdict = "holds" if route <= TARGET_P50_MS else "does NOT hold"
    print(f"\n  spec: p50 of GET /api/admin/credits-report <= {TARGET_P50_MS:.0f} ms {verdict} ({route:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--repetitions", type=int, default=200)
    parser.add_argument("--warm-up", type=int, default=20)
    args = parser.parse_args()
    if args.customers < 1 or args.repetitions < 1 or args.warm_up < 0:
        parser.error("--customers and --repetitions must be positive, --warm-up not negative")
    asyncio.run(run(args.customers, args.repetitions, args.warm_up))


if __name__ == "__main__":
    main()
