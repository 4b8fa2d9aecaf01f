"""Delivery helpers: the workers' outcome lines, dead letters, ledger rows, events to publish."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import insert, select

from infra.db import Database
from infra.db.tables import (
    credit_lots,
    customers,
    dead_letters,
    ledger_entries,
    processed_events,
)
from messages import APPLY_EVENT_ACTOR, EVENTS_QUEUE, JobCompleted, PaymentSucceeded
from tests.support import ROOT, BrokerUnderTest, WorkerProcesses, eventually, wait_until

EVENTS_XQ = f"dramatiq:{EVENTS_QUEUE}.XQ"
#: The log line each actor run ends with (LogContext binds the message id to it).
OUTCOMES = ("event_applied", "event_duplicate", "event_rejected")
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- shared helpers


def log_records(workers: WorkerProcesses) -> list[dict]:
    """The workers' JSON log lines, parsed (non-JSON lines are skipped)."""
    return workers.records()


def outcomes_of(workers: WorkerProcesses) -> dict[str, list[dict]]:
    """message id → every outcome line written for it, in log order."""
    seen: dict[str, list[dict]] = {}
    for record in log_records(workers):
        if record.get("event") in OUTCOMES and "message_id" in record:
            seen.setdefault(record["message_id"], []).append(record)
    return seen


def wait_for_outcomes(workers: WorkerProcesses, message_ids, timeout: float = 30.0) -> dict[str, str]:
    """Wait until every message has an outcome line; returns message id → its (single) outcome."""
    message_ids = list(message_ids)
    wait_until(
        lambda: all(m in outcomes_of(workers) for m in message_ids),
        timeout=timeout,
        message=f"outcomes for {len(message_ids)} message(s)",
    )
    seen = outcomes_of(workers)
    return {m: seen[m][-1]["event"] for m in message_ids}


def retry_lines(workers: WorkerProcesses, message_id: str) -> list[str]:
    return [
        r["event"]
        for r in log_records(workers)
        if str(r.get("event", "")).startswith(f"Retrying message '{message_id}'")
    ]


def dead_lettered(source: redis.Redis | BrokerUnderTest, queue: str = EVENTS_QUEUE) -> dict[str, dict]:
    """The broker's dead-letter queue: message id → decoded message. ``source``: the broker
    under test, or a Redis client (whose zset and hash must agree)."""
    if isinstance(source, BrokerUnderTest):
        return source.dead_lettered(queue)
    xq = f"dramatiq:{queue}.XQ"
    members = {m.decode() for m in source.zrange(xq, 0, -1)}
    bodies = {k.decode(): json.loads(v) for k, v in source.hgetall(f"{xq}.msgs").items()}
    assert members == set(bodies), f"{xq} and {xq}.msgs disagree: {members} vs {set(bodies)}"
    return {body["message_id"]: body for body in bodies.values()}


async def dead_letter_rows(db: Database) -> dict[str, dict]:
    """The dead_letters table: message id → row."""
    async with db.connect() as connection:
        rows = (await connection.execute(select(dead_letters))).mappings().all()
    return {row["message_id"]: dict(row) for row in rows}


async def scalar(db: Database, query):
    async with db.connect() as connection:
        return (await connection.execute(query)).scalar()


async def customer_row(db: Database, customer_id: str) -> dict | None:
    async with db.connect() as connection:
        row = (
            (await connection.execute(select(customers).where(customers.c.customer_id == customer_id)))
            .mappings()
            .first()
        )
    return dict(row) if row else None


async def entries_of(db: Database, customer_id: str) -> list[dict]:
    async with db.connect() as connection:
        rows = (
            (
                await connection.execute(
                    select(ledger_entries)
                    .where(ledger_entries.c.customer_id == customer_id)
                    .order_by(ledger_entries.c.id)
                )
            )
            .mappings()
            .all()
        )
    return [dict(row) for row in rows]


async def ledger_snapshot(db: Database) -> dict:
    """Everything the ledger holds, as comparable values (timestamps of bookkeeping left out)."""
    async with db.connect() as connection:
        snapshot = {
            "customers": (
                await connection.execute(
                    select(
                        customers.c.customer_id,
                        customers.c.balance,
                        customers.c.overdraft,
                        customers.c.credits_depleted_at,
                    ).order_by(customers.c.customer_id)
                )
            ).all(),
            "lots": (await connection.execute(select(credit_lots).order_by(credit_lots.c.id))).all(),
            "entries": (
                await connection.execute(
                    select(*(c for c in ledger_entries.c if c.name != "recorded_at")).order_by(ledger_entries.c.id)
                )
            ).all(),
            "processed": (
                await connection.execute(
                    select(processed_events.c.event_id, processed_events.c.fingerprint).order_by(
                        processed_events.c.event_id
                    )
                )
            ).all(),
        }
    return snapshot


async def wait_for_dead_letter_rows(db: Database, message_ids, timeout: float = 30.0) -> dict[str, dict]:
    message_ids = set(message_ids)

    async def archived() -> bool:
        return message_ids <= set(await dead_letter_rows(db))

    await eventually(archived, timeout=timeout, message=f"dead_letters rows for {sorted(message_ids)}")
    return await dead_letter_rows(db)


def raw_broker(target: str | BrokerUnderTest) -> dramatiq.Broker:
    """A bare producer broker, to enqueue messages the Publisher would never write."""
    if isinstance(target, BrokerUnderTest):
        return target.raw_broker()
    return RedisBroker(url=target, middleware=[])


def publish_raw(broker: dramatiq.Broker, *, args: tuple = (), kwargs: dict | None = None) -> str:
    message = dramatiq.Message(
        queue_name=EVENTS_QUEUE, actor_name=APPLY_EVENT_ACTOR, args=args, kwargs=kwargs or {}, options={}
    )
    return broker.enqueue(message).message_id


def payment(event_id: str, customer_id: str, credits: int, at: datetime = T0) -> PaymentSucceeded:
    return PaymentSucceeded(
        event_id=event_id, customer_id=customer_id, occurred_at=at, payment_id=f"in_{event_id}", credits=credits
    )


def job(
    event_id: str, customer_id: str, job_id: str, at: datetime = T0 + timedelta(hours=1), credits: int = 1
) -> JobCompleted:
    return JobCompleted(event_id=event_id, customer_id=customer_id, occurred_at=at, job_id=job_id, credits=credits)


def credits_cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


async def archive(db, message: dramatiq.Message, error: str) -> int:
    """A dead letter as ArchiveDeadLetters writes it, e.g. after retries ran out in a long outage."""
    async with db.begin() as connection:
        return (
            await connection.execute(
                insert(dead_letters)
                .values(
                    message_id=message.message_id,
                    queue_name=message.queue_name,
                    actor_name=message.actor_name,
                    message=message.encode().decode(),
                    error=error,
                )
                .returning(dead_letters.c.id)
            )
        ).scalar_one()
