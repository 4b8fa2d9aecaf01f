"""Read-side queries that need no aggregate: straight SQL over the customers table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from infra.db import Database
from infra.db.tables import customers


@dataclass(frozen=True)
class DepletedCustomer:
    customer_id: str
    credits_depleted_at: datetime
    days_depleted: int


async def depleted_customers(db: Database, now: datetime, days: int, limit: int, offset: int) -> tuple[int, list[DepletedCustomer]]:
    """Customers out of credits for more than ``days`` days, longest first, and how many in all."""
    cutoff = now - timedelta(days=days)
    depleted_before_cutoff = (customers.c.credits_depleted_at.is_not(None), customers.c.credits_depleted_at < cutoff)
    async with db.connect() as connection:
        total = (await connection.execute(select(func.count()).select_from(customers).where(*depleted_before_cutoff))).scalar_one()
        rows = await connection.execute(
            select(customers.c.customer_id, customers.c.credits_depleted_at)
            .where(*depleted_before_cutoff)
            .order_by(customers.c.credits_depleted_at, customers.c.customer_id)
            .limit(limit)
            .offset(offset)
        )
        page = [DepletedCustomer(r.customer_id, r.credits_depleted_at, (now - r.credits_depleted_at).days) for r in rows]
    return total, page


async def at_risk_count(db: Database, now: datetime, days: int) -> int:
    total, _ = await depleted_customers(db, now, days, limit=0, offset=0)
    return total
