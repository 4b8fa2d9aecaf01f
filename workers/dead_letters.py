"""Dead letters archived in PostgreSQL: list them, and re-enqueue the ones worth another try.

A message dead-lettered for bad input or a conflict will be refused again; one that ran out
of retries during a long outage will now go through. Replaying is always safe: events are
idempotent by event_id, and the periodic jobs are idempotent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import dramatiq
from dramatiq.common import q_name
from sqlalchemy import insert, select, update

from infra.db import Database
from infra.db.tables import dead_letters

#: Options Dramatiq adds while delivering; dropped so a replay starts with a fresh retry budget.
DELIVERY_OPTIONS = ("retries", "eta", "redis_message_id", "traceback", "requeue_timestamp", "dead_message_ttl")


@dataclass(frozen=True)
class DeadLetter:
    id: int
    message_id: str
    actor_name: str
    error: str | None
    failed_at: datetime
    replayed_at: datetime | None


async def list_dead_letters(db: Database, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
    query = select(dead_letters).order_by(dead_letters.c.id).limit(limit)
    if not include_replayed:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    async with db.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [DeadLetter(r.id, r.message_id, r.actor_name, r.error, r.failed_at, r.replayed_at) for r in rows]


async def replay(db: Database, broker: dramatiq.Broker, ids: Sequence[int], now: datetime, force: bool = False) -> list[str]:
    """Re-enqueue the archived messages ``ids``. Returns one line per id saying what happened."""
    outcomes = []
    async with db.connect() as connection:
        rows = {r.id: r for r in (await connection.execute(select(dead_letters).where(dead_letters.c.id.in_(ids)))).all()}
    for dead_letter_id in ids:
        row = rows.get(dead_letter_id)
        if row is None:
            outcomes.append(f"{dead_letter_id}: no such dead letter")
            continue
        if row.replayed_at is not None and not force:
            outcomes.append(f"{dead_letter_id}: already replayed at {row.replayed_at.isoformat()} (use --force to replay again)")
            continue
        original = dramatiq.Message.decode(row.message.encode())
        message = dramatiq.Message(
            queue_name=q_name(original.queue_name),
            actor_name=original.actor_name,
            args=original.args,
            kwargs=original.kwargs,
            options={k: v for k, v in original.options.items() if k not in DELIVERY_OPTIONS},
            message_id=original.message_id,
        )
        # Enqueue first, then mark: a crash in between can only cause a harmless second replay.
        broker.enqueue(message)
        async with db.begin() as connection:
            await connection.execute(update(dead_letters).where(dead_letters.c.id == dead_letter_id).values(replayed_at=now))
        outcomes.append(f"{dead_letter_id}: re-enqueued message {message.message_id} to {message.queue_name}")
    return outcomes


async def archive_from_broker(db: Database, broker: dramatiq.Broker, queues: Sequence[str] | None = None) -> int:
    """Copy into the table every dead letter the broker holds that the table lacks.

    A message refused while the database was unreachable is dead-lettered in the broker only
    (its archive insert failed); Redis keeps it a week and loses it on a restart, RabbitMQ
    keeps it a week. This catches up.
    """
    from dramatiq import Message
    from dramatiq.errors import DecodeError

    from infra.broker import dead_letter_bodies

    found: dict[str, dict] = {}
    for queue in sorted(queues if queues is not None else broker.get_declared_queues()):
        for data in dead_letter_bodies(broker, queue):
            try:
                message = Message.decode(data)
            except DecodeError:
                continue  # undecodable envelopes are logged when they are dead-lettered
            found[message.message_id] = {
                "message_id": message.message_id,
                "queue_name": q_name(message.queue_name),
                "actor_name": message.actor_name,
                "message": message.encode().decode("utf-8", "replace"),
                "error": "archived later from the broker: the database was unreachable when it was dead-lettered",
            }
    if not found:
        return 0
    async with db.begin() as connection:
        known = set((await connection.execute(select(dead_letters.c.message_id).where(dead_letters.c.message_id.in_(list(found))))).scalars())
        missing = [row for message_id, row in found.items() if message_id not in known]
        if missing:
            await connection.execute(insert(dead_letters), missing)
    return len(missing)


#: The name before RabbitMQ.
archive_from_redis = archive_from_broker
