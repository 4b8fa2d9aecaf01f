"""Dead letters archived in PostgreSQL: list them, and re-enqueue the ones worth another try.

A message dead-lettered for bad input or a conflict will be refused again; one that ran out
of retries during a long outage will now go through. Replaying is always safe: events are
idempotent by event_id, and the periodic jobs are idempotent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import dramatiq
from dramatiq.common import q_name
from sqlalchemy import insert, select, update

from infra.db import Database
from infra.db.tables import dead_letters
from infra.logging import redactor, scrub

#: `show` prints a dead letter whole (masked): a message is at most MAX_MESSAGE_BYTES, this is well above.
_WHOLE = 1_000_000
_redact_whole = redactor(_WHOLE)

#: Options Dramatiq adds while delivering; dropped so a replay starts with a fresh retry budget.
DELIVERY_OPTIONS = ("retries", "eta", "redis_message_id", "traceback", "requeue_timestamp", "dead_message_ttl")


#: `credits dead-letters list` shows this much of each error; `show` prints it whole.
LISTED_ERROR_CHARS = 100


@dataclass(frozen=True)
class DeadLetter:
    id: int
    message_id: str
    actor_name: str
    error: str | None
    failed_at: datetime
    replayed_at: datetime | None
    queue_name: str = ""
    #: The Dramatiq message as it was dead-lettered (JSON text).
    message: str = ""


def _dead_letter(row) -> DeadLetter:
    return DeadLetter(
        row.id, row.message_id, row.actor_name, row.error, row.failed_at, row.replayed_at, row.queue_name, row.message
    )


async def list_dead_letters(db: Database, include_replayed: bool = False, limit: int = 100) -> list[DeadLetter]:
    query = select(dead_letters).order_by(dead_letters.c.id).limit(limit)
    if not include_replayed:
        query = query.where(dead_letters.c.replayed_at.is_(None))
    async with db.connect() as connection:
        rows = (await connection.execute(query)).all()
    return [_dead_letter(r) for r in rows]


async def get_dead_letter(db: Database, dead_letter_id: int) -> DeadLetter | None:
    async with db.connect() as connection:
        row = (await connection.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id))).first()
    return _dead_letter(row) if row is not None else None


def summary_line(row: DeadLetter) -> str:
    """One line of `credits dead-letters list`: the error cut at a word, personal data masked."""
    replayed = f" replayed {row.replayed_at:%Y-%m-%d %H:%M}" if row.replayed_at else ""
    error = clip(scrub(row.error or ""), LISTED_ERROR_CHARS)
    return f"{row.id:>6}  {row.failed_at:%Y-%m-%d %H:%M:%S}  {row.actor_name:<16} {error}{replayed}"


def clip(text: str, width: int) -> str:
    """``text`` on one line, at most ``width`` characters, cut at a word boundary with an ellipsis."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 1]
    space = cut.rfind(" ")
    if space > width // 2:  # a word boundary not too far back; else one very long word is cut
        cut = cut[:space]
    return cut.rstrip(" ,;:.") + "…"


def full_text(row: DeadLetter) -> str:
    """Everything about one dead letter, for `credits dead-letters show`: the whole error and the
    message, its event decoded, with personal data masked by the log's own redaction."""
    lines = [
        f"dead letter {row.id}",
        f"  message id   {row.message_id}",
        f"  actor        {row.actor_name} (queue {row.queue_name})",
        f"  failed at    {row.failed_at.isoformat()}",
        f"  replayed at  {row.replayed_at.isoformat() if row.replayed_at else 'never'}",
        "error:",
        _indent(scrub(row.error or "(none recorded)", _WHOLE)),
        "message:",
        _indent(json.dumps(_masked_message(row.message), indent=2, ensure_ascii=False, default=str)),
    ]
    return "\n".join(lines)


def _masked_message(text: str) -> object:
    try:
        message = json.loads(text)
    except ValueError:
        return scrub(text, _WHOLE)  # not JSON (an undecodable envelope): masked as text
    if isinstance(message, dict) and isinstance(message.get("kwargs"), dict):
        # An event travels as JSON text inside the message: decode it so its fields are masked by name.
        message["kwargs"] = {k: _json_or_text(v) for k, v in message["kwargs"].items()}
    return _redact_whole(None, None, {"message": message})["message"]


def _json_or_text(value: object) -> object:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines() or [""])


async def replay(
    db: Database, broker: dramatiq.Broker, ids: Sequence[int], now: datetime, force: bool = False
) -> list[str]:
    """Re-enqueue the archived messages ``ids``. Returns one line per id saying what happened."""
    outcomes = []
    async with db.connect() as connection:
        rows = {
            r.id: r for r in (await connection.execute(select(dead_letters).where(dead_letters.c.id.in_(ids)))).all()
        }
    for dead_letter_id in ids:
        row = rows.get(dead_letter_id)
        if row is None:
            outcomes.append(f"{dead_letter_id}: no such dead letter")
            continue
        if row.replayed_at is not None and not force:
            outcomes.append(
                f"{dead_letter_id}: already replayed at {row.replayed_at.isoformat()} (use --force to replay again)"
            )
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
            await connection.execute(
                update(dead_letters).where(dead_letters.c.id == dead_letter_id).values(replayed_at=now)
            )
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
        known = set(
            (
                await connection.execute(
                    select(dead_letters.c.message_id).where(dead_letters.c.message_id.in_(list(found)))
                )
            ).scalars()
        )
        missing = [row for message_id, row in found.items() if message_id not in known]
        if missing:
            await connection.execute(insert(dead_letters), missing)
    return len(missing)


#: The name before RabbitMQ.
archive_from_redis = archive_from_broker
