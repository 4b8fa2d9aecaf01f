"""Read-side queries that need no aggregate: straight SQL over the customers table."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select

from domain.dunning import DunningStatus
from infra.db import Database
from infra.db.tables import customers, dunning_cases


@dataclass(frozen=True)
class DepletedCustomer:
    customer_id: str
    credits_depleted_at: datetime
    days_depleted: int
    #: The latest dunning case, if any: its status, scheduled attempts made and next retry.
    dunning_status: str | None = None
    attempts_made: int | None = None
    next_retry_at: datetime | None = None
    membership_status: str = "active"


def membership_status(dunning_status: str | None, subscription_cancelled_at: datetime | None) -> str:
    """active, past_due (the retry schedule ran out) or cancelled (and the end action cancelled it)."""
    if subscription_cancelled_at is not None:
        return "cancelled"
    return "past_due" if dunning_status == DunningStatus.PAST_DUE.value else "active"


async def depleted_customers(db: Database, now: datetime, days: int, limit: int, offset: int) -> tuple[int, list[DepletedCustomer]]:
    """Customers out of credits for more than ``days`` days, longest first, and how many in all."""
    cutoff = now - timedelta(days=days)
    depleted_before_cutoff = (customers.c.credits_depleted_at.is_not(None), customers.c.credits_depleted_at < cutoff)
    async with db.connect() as connection:
        total = (await connection.execute(select(func.count()).select_from(customers).where(*depleted_before_cutoff))).scalar_one()
        newer = dunning_cases.alias("newer")
        latest_case = (
            select(newer.c.id)
            .where(newer.c.customer_id == customers.c.customer_id)
            .order_by(newer.c.first_failed_at.desc(), newer.c.id.desc())
            .limit(1)
            .correlate(customers)
            .scalar_subquery()
        )
        rows = await connection.execute(
            select(
                customers.c.customer_id,
                customers.c.credits_depleted_at,
                dunning_cases.c.status,
                dunning_cases.c.attempts_made,
                dunning_cases.c.next_retry_at,
                dunning_cases.c.subscription_cancelled_at,
            )
            .select_from(customers.outerjoin(dunning_cases, dunning_cases.c.id == latest_case))
            .where(*depleted_before_cutoff)
            .order_by(customers.c.credits_depleted_at, customers.c.customer_id)
            .limit(limit)
            .offset(offset)
        )
        page = [
            DepletedCustomer(
                r.customer_id,
                r.credits_depleted_at,
                (now - r.credits_depleted_at).days,
                r.status,
                r.attempts_made,
                r.next_retry_at,
                membership_status(r.status, r.subscription_cancelled_at),
            )
            for r in rows
        ]
    return total, page


async def at_risk_count(db: Database, now: datetime, days: int) -> int:
    total, _ = await depleted_customers(db, now, days, limit=0, offset=0)
    return total
