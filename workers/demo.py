"""The main job: months of a service business's customers, through the real producer and actors.

Payments load credits, completed jobs spend them, light users let credits expire, churned
customers run dry and show up in the 14-day report. Events go through the real
``Publisher`` onto the (embedded or real) Redis broker and are applied by a real Dramatiq
worker; a few are published twice or out of order, as a real front end would.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import func, select

from messages import CreditsAdjusted, Event, JobCompleted, PaymentSucceeded, Publisher


@dataclass
class SimulatedCustomer:
    customer_id: str
    monthly_credits: int
    jobs_per_month: float
    billing_day: int
    join_month: int
    churn_month: int | None


def _say(text: str = "") -> None:
    print(text, flush=True)


def _customers(rng: random.Random, count: int, months: int, prefix: str) -> list[SimulatedCustomer]:
    people = []
    for n in range(count):
        monthly = rng.choice((1, 1, 2, 4))
        # Heavy users overspend (overdraft, depletion); light users let credits expire.
        usage = rng.choice((0.1, 0.25, 0.5, 0.9, 1.2, 1.5))
        # A third were members from the start (their unused credits reach expiry); the rest join later.
        joined = 0 if rng.random() < 0.34 else rng.randrange(1, months)
        churn = rng.randrange(joined + 1, months + 1) if rng.random() < 0.3 else None
        people.append(SimulatedCustomer(f"{prefix}{n:04d}", monthly, monthly * usage, rng.randrange(1, 29), joined, churn))
    return people


def _month_events(rng: random.Random, people: list[SimulatedCustomer], month_start: datetime, month: int, run: str) -> list[Event]:
    events: list[Event] = []
    month_end = _next_month(month_start)
    span = (month_end - month_start).total_seconds()
    for person in people:
        if month < person.join_month:
            continue
        paying = person.churn_month is None or month < person.churn_month
        if paying:
            paid_at = month_start + timedelta(days=person.billing_day - 1, hours=rng.randrange(8, 20))
            events.append(PaymentSucceeded(
                event_id=f"{run}:pay:{person.customer_id}:{month}", customer_id=person.customer_id,
                occurred_at=paid_at, payment_id=f"in_{uuid.uuid4().hex[:16]}", credits=person.monthly_credits,
                amount_cents=person.monthly_credits * 2500, currency="USD",
            ))
        # Jobs arrive as a Poisson process: exponential gaps between them.
        rate = (person.jobs_per_month if paying else person.jobs_per_month * 0.5) / span
        at = month_start + timedelta(seconds=rng.expovariate(rate))
        j = 0
        while at < month_end:
            events.append(JobCompleted(
                event_id=f"{run}:job:{person.customer_id}:{month}:{j}", customer_id=person.customer_id,
                occurred_at=at, job_id=f"job-{month}-{j}",
            ))
            j += 1
            at += timedelta(seconds=rng.expovariate(rate))
        if rng.random() < 0.01:
            events.append(CreditsAdjusted(
                event_id=f"{run}:adj:{person.customer_id}:{month}", customer_id=person.customer_id,
                occurred_at=month_start + timedelta(days=10), credits=2, reason="goodwill after a late arrival", actor="demo-admin",
            ))
    events.sort(key=lambda e: e.occurred_at)
    # The real world: ~2% published twice, ~2% delayed past later events.
    delivered = []
    for event in events:
        delivered.append(event)
        if rng.random() < 0.02:
            delivered.append(event)
    for _ in range(len(delivered) // 50):
        i = rng.randrange(len(delivered))
        delivered.append(delivered.pop(i))
    return delivered


def _next_month(moment: datetime) -> datetime:
    return (moment.replace(day=28) + timedelta(days=4)).replace(day=1)


def run_demo(customers: int = 200, months: int = 14, seed: int = 7) -> int:
    from infra.settings import get_settings
    from workers.runtime import Runtime, configure_runtime

    settings = get_settings()
    if not settings.database_url:
        # A fresh embedded database per run, so the story always starts from zero.
        path = Path(tempfile.mkdtemp(prefix="credits-demo-")) / "credits.sqlite3"
        settings = settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{path}"})
    # The story is set in the past: accept events as old as its first month.
    settings = settings.model_copy(update={"event_max_age_days": max(settings.event_max_age_days, (months + 1) * 31)})
    configure_runtime(Runtime(settings))

    from alembic import command

    from infra.db.engine import alembic_config

    command.upgrade(alembic_config(settings.effective_database_url), "head")

    import logging

    from workers.actors import broker, expire_credits
    from workers.inprocess import drain, running_worker

    logging.getLogger().setLevel(logging.WARNING)  # the story is on stdout; warnings and errors still show
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:6]
    prefix = f"demo-{run}-"
    people = _customers(rng, customers, months, prefix)
    now = datetime.now(timezone.utc)
    first_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for _ in range(months):
        first_month = (first_month - timedelta(days=1)).replace(day=1)

    where = "embedded SQLite + in-process Redis" if not settings.broker_address else "PostgreSQL + a message broker"
    _say(f"credits demo: {customers} customers over {months} months, {where}")
    _say(f"database: {settings.effective_database_url}")
    _say(f"{'month':<8} {'events':>7} {'issued':>7} {'spent':>7} {'expired':>8} {'depleted':>9} {'overdrawn':>10}")

    publisher = Publisher(broker)
    started = time.monotonic()
    published = 0
    threads = 2
    with running_worker(broker, threads=threads) as worker:
        month_start = first_month
        for month in range(months):
            events = [e for e in _month_events(rng, people, month_start, month, run) if e.occurred_at <= now]
            for event in events:
                publisher.publish(event)
            published += len(events)
            drain(broker, worker)
            month_end = min(_next_month(month_start), now)
            expire_credits.send(as_of=month_end.isoformat())
            drain(broker, worker)
            stats = asyncio.run(_month_stats(settings.effective_database_url, prefix, month_start, _next_month(month_start)))
            _say(f"{month_start:%Y-%m}  {len(events):>7} {stats['issued']:>7} {stats['spent']:>7} {stats['expired']:>8} {stats['depleted']:>9} {stats['overdrawn']:>10}")
            month_start = _next_month(month_start)
    elapsed = time.monotonic() - started
    summary = asyncio.run(_summary(settings, prefix, now))
    _print_summary(summary, published, elapsed, settings.depleted_report_days)
    return 0 if summary["reconciles"] and summary["dead_letters"] == 0 else 1


async def _month_stats(url: str, prefix: str, start: datetime, end: datetime) -> dict:
    from infra.db import Database
    from infra.db.tables import customers, ledger_entries

    db = Database(url)
    try:
        async with db.connect() as conn:
            rows = await conn.execute(
                select(ledger_entries.c.kind, func.sum(ledger_entries.c.credits))
                .where(ledger_entries.c.customer_id.startswith(prefix), ledger_entries.c.occurred_at >= start, ledger_entries.c.occurred_at < end)
                .group_by(ledger_entries.c.kind)
            )
            by_kind = {kind: total or 0 for kind, total in rows}
            depleted = (await conn.execute(select(func.count()).where(customers.c.customer_id.startswith(prefix), customers.c.credits_depleted_at.is_not(None)))).scalar_one()
            overdrawn = (await conn.execute(select(func.count()).where(customers.c.customer_id.startswith(prefix), customers.c.overdraft > 0))).scalar_one()
    finally:
        await db.dispose()
    return {
        "issued": by_kind.get("issued", 0) + max(by_kind.get("adjusted", 0), 0),
        "spent": -(by_kind.get("debited", 0) + by_kind.get("captured", 0)),
        "expired": -by_kind.get("expired", 0),
        "depleted": depleted,
        "overdrawn": overdrawn,
    }


async def _summary(settings, prefix: str, now: datetime) -> dict:
    from infra.db import Database
    from infra.db.tables import credit_lots, customers, dead_letters, ledger_entries, processed_events
    from service_layer import views

    db = Database(settings.effective_database_url)
    try:
        async with db.connect() as conn:
            kinds = Counter({k: t for k, t in await conn.execute(
                select(ledger_entries.c.kind, func.sum(ledger_entries.c.credits)).where(ledger_entries.c.customer_id.startswith(prefix)).group_by(ledger_entries.c.kind)
            )})
            entries_total = sum(v for k, v in kinds.items() if k not in ("held", "released", "lapsed"))
            remaining = (await conn.execute(select(func.coalesce(func.sum(credit_lots.c.remaining), 0)).where(credit_lots.c.customer_id.startswith(prefix)))).scalar_one()
            overdraft = (await conn.execute(select(func.coalesce(func.sum(customers.c.overdraft), 0)).where(customers.c.customer_id.startswith(prefix)))).scalar_one()
            applied = (await conn.execute(select(func.count()).where(processed_events.c.customer_id.startswith(prefix)))).scalar_one()
            dead = (await conn.execute(select(func.count()).select_from(dead_letters))).scalar_one()
            count = (await conn.execute(select(func.count()).where(customers.c.customer_id.startswith(prefix)))).scalar_one()
        total, report = await views.depleted_customers(db, now, settings.depleted_report_days, limit=15, offset=0)
    finally:
        await db.dispose()
    return {
        "kinds": kinds, "entries_total": entries_total, "remaining": remaining, "overdraft": overdraft,
        "reconciles": entries_total == remaining - overdraft, "applied": applied, "dead_letters": dead,
        "customers": count, "report_total": total, "report": report,
    }


def _print_summary(s: dict, published: int, elapsed: float, days: int) -> None:
    k = s["kinds"]
    _say()
    _say("summary")
    _say(f"  events published        {published:>8}  ({published - s['applied']} duplicates ignored)")
    _say(f"  events applied          {s['applied']:>8}  in {elapsed:.1f}s ({s['applied'] / elapsed:.0f}/s)")
    _say(f"  customers               {s['customers']:>8}")
    _say(f"  credits issued          {k.get('issued', 0):>8}")
    _say(f"  credits adjusted        {k.get('adjusted', 0):>8}")
    _say(f"  credits spent           {-(k.get('debited', 0) + k.get('captured', 0)):>8}")
    _say(f"  credits expired         {-k.get('expired', 0):>8}")
    _say(f"  credits outstanding     {s['remaining']:>8}  (overdraft owed: {s['overdraft']})")
    _say(f"  ledger reconciles       {'yes' if s['reconciles'] else 'NO'}  (entries sum {s['entries_total']} = lots {s['remaining']} - overdraft {s['overdraft']})")
    _say(f"  dead letters            {s['dead_letters']:>8}")
    _say()
    _say(f"out of credits for more than {days} days: {s['report_total']} customer(s) (oldest first, first 15)")
    _say(f"  {'customer':<22} {'depleted since':<26} {'days':>5}")
    for row in s["report"]:
        _say(f"  {row.customer_id:<22} {row.credits_depleted_at:%Y-%m-%d %H:%M %Z}       {row.days_depleted:>5}")


if __name__ == "__main__":
    sys.exit(run_demo())
