"""The business at a glance, read from the ledger for the web's /metrics.

A few counts, each from an index (processed_events and dunning_cases by their 0008 indexes,
the outbox and at-risk customers by partial indexes), in one read under a statement timeout:
a slow database makes a scrape fail, never pile up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, literal, select, text

from infra.db import Database
from infra.db.tables import customers, dead_letters, dunning_cases, notifications, payouts, processed_events
from infra.metrics import LEDGER_OUTCOMES
from messages.events import EVENT_TYPES
from messages.wire import APPLY_EVENT_ACTOR
from service_layer.views import depleted_longer_than

DUNNING_STATES = ("retrying", "action_required", "needs_payment_method", "past_due", "recovered", "closed")
PAYOUT_STATUSES = ("pending", "failed", "exported", "paid")
#: The event's type inside a stored Dramatiq message: its JSON text is a string in `kwargs`,
#: so its quotes are escaped (\"type\":\"job.completed\").
_DEAD_EVENT_TYPE = r'\\"type\\"\s*:\s*\\"([a-z_.]+)\\"'


@dataclass(frozen=True)
class BusinessFigures:
    events: dict[tuple[str, str], int]
    dead_letters: dict[str, int]
    dead_letters_waiting: dict[str, int]
    outbox_pending: int
    outbox_oldest_due_seconds: float
    dunning_cases: dict[str, int]
    payouts: dict[str, int]
    at_risk_customers: int


async def read_figures(db: Database, now: datetime, at_risk_days: int, timeout_ms: int) -> BusinessFigures:
    async with db.connect() as connection:
        if not db.is_sqlite:
            # SET LOCAL takes no bind parameters; the value is a validated integer setting.
            await connection.execute(text(f"SET LOCAL statement_timeout = {int(timeout_ms)}"))
        events = await _events(connection)
        letters = (
            await connection.execute(
                select(
                    dead_letters.c.actor_name, func.count(), func.count().filter(dead_letters.c.replayed_at.is_(None))
                ).group_by(dead_letters.c.actor_name)
            )
        ).all()
        pending, oldest_due = (
            await connection.execute(
                select(func.count(), func.min(notifications.c.send_after)).where(notifications.c.status == "pending")
            )
        ).one()
        if oldest_due is not None and oldest_due > now:
            oldest_due = None  # pending, but none due yet
        dunning = await _counts(connection, dunning_cases.c.status, DUNNING_STATES)
        paid = await _counts(connection, payouts.c.status, PAYOUT_STATUSES)
        at_risk = (
            await connection.execute(
                select(func.count()).select_from(customers).where(*depleted_longer_than(now, at_risk_days))
            )
        ).scalar_one()
    return BusinessFigures(
        events=events,
        dead_letters={actor: total for actor, total, _ in letters},
        dead_letters_waiting={actor: waiting for actor, _, waiting in letters},
        outbox_pending=pending,
        outbox_oldest_due_seconds=(now - oldest_due).total_seconds() if oldest_due is not None else 0.0,
        dunning_cases=dunning,
        payouts=paid,
        at_risk_customers=at_risk,
    )


async def _events(connection) -> dict[tuple[str, str], int]:
    """Events recorded (processed_events) and dead-lettered (dead_letters), by type."""
    events: Counter[tuple[str, str]] = Counter(
        {(kind, outcome): 0 for kind in EVENT_TYPES for outcome in LEDGER_OUTCOMES}
    )
    recorded = await connection.execute(
        select(processed_events.c.event_type, func.count()).group_by(processed_events.c.event_type)
    )
    for kind, count in recorded:
        events[(_known(kind), "recorded")] += count
    # SQLite has no regular-expression substring: there, every dead-lettered event is "unknown".
    dialect = connection.dialect.name
    kind = func.substring(dead_letters.c.message, _DEAD_EVENT_TYPE) if dialect == "postgresql" else literal(None)
    dead_events = select(kind.label("kind")).where(dead_letters.c.actor_name == APPLY_EVENT_ACTOR).subquery()
    dead = await connection.execute(select(dead_events.c.kind, func.count()).group_by(dead_events.c.kind))
    for found, count in dead:
        events[(_known(found), "dead_lettered")] += count
    return dict(events)


async def _counts(connection, column, values: tuple[str, ...]) -> dict[str, int]:
    counts = dict.fromkeys(values, 0)
    for value, count in await connection.execute(select(column, func.count()).group_by(column)):
        counts[value] = count
    return counts


def _known(kind: str | None) -> str:
    # Labels take known values only: a dead letter's text is whatever a producer sent.
    return kind if kind in EVENT_TYPES else "unknown"
