"""Reading a customer's ledger back: entries in (occurred_at, id) order, and the lots each moved."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.tables import credit_lots, customers, ledger_entries, lot_movements

ENTRY_COLUMNS = (
    ledger_entries.c.id,
    ledger_entries.c.occurred_at,
    ledger_entries.c.kind,
    ledger_entries.c.credits,
    ledger_entries.c.balance_after,
    ledger_entries.c.event_id,
    ledger_entries.c.note,
)


async def customer_exists(connection: AsyncConnection, customer_id: str) -> bool:
    found = await connection.execute(select(customers.c.customer_id).where(customers.c.customer_id == customer_id))
    return found.first() is not None


async def entries_before(
    connection: AsyncConnection, customer_id: str, before: tuple[datetime, int] | None, limit: int
) -> list:
    """Up to ``limit`` entries strictly older than ``before`` (time, id), newest first.

    A keyset, not an offset: entries written meanwhile never shift a page that follows."""
    query = select(*ENTRY_COLUMNS).where(ledger_entries.c.customer_id == customer_id)
    if before is not None:
        query = query.where(tuple_(ledger_entries.c.occurred_at, ledger_entries.c.id) < tuple_(*before))
    query = query.order_by(ledger_entries.c.occurred_at.desc(), ledger_entries.c.id.desc()).limit(limit)
    return list(await connection.execute(query))


async def all_entries(connection: AsyncConnection, customer_id: str, batch: int = 1000) -> AsyncIterator[Sequence]:
    """Every entry of the customer, oldest first, in batches read from a server-side cursor."""
    query = (
        select(*ENTRY_COLUMNS)
        .where(ledger_entries.c.customer_id == customer_id)
        .order_by(ledger_entries.c.occurred_at, ledger_entries.c.id)
        .execution_options(yield_per=batch)
    )
    result = await connection.stream(query)
    async for rows in result.partitions(batch):
        yield rows


async def lots_moved(connection: AsyncConnection, entry_ids: Sequence[int]) -> dict[int, list]:
    """The lots each of the entries drew from or added to: entry id -> rows (lot's dates, credits)."""
    if not entry_ids:
        return {}
    rows = await connection.execute(
        select(
            lot_movements.c.entry_id,
            lot_movements.c.credits,
            credit_lots.c.id,
            credit_lots.c.issued_at,
            credit_lots.c.expires_at,
        )
        .select_from(lot_movements.join(credit_lots, credit_lots.c.id == lot_movements.c.lot_id))
        .where(lot_movements.c.entry_id.in_(list(entry_ids)))
        .order_by(lot_movements.c.entry_id, credit_lots.c.expires_at, credit_lots.c.issued_at, credit_lots.c.id)
    )
    moved: dict[int, list] = {}
    for row in rows:
        moved.setdefault(row.entry_id, []).append(row)
    return moved
