"""The retention page's data: who has been out of credits too long, and what an admin knows of them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, literal, select

from infra.db import Database
from infra.db.repository import upsert_into
from infra.db.tables import customer_notes, customers, dunning_cases, ledger_entries, retention_crossings
from service_layer.unit_of_work import UnitOfWork
from service_layer.views import depleted_longer_than, depleted_page, latest_case_id


@dataclass(frozen=True)
class AtRiskCustomer:
    customer_id: str
    credits_depleted_at: datetime
    days_depleted: int
    dunning_status: str | None
    last_payment_failure_at: datetime | None
    last_payment_failure: str | None
    last_job_at: datetime | None
    note: str | None
    note_updated_at: datetime | None


async def at_risk_customers(
    db: Database, now: datetime, days: int, limit: int = 500
) -> tuple[int, list[AtRiskCustomer]]:
    """Customers depleted for more than ``days`` days, longest first, with what the page shows."""
    at_risk = depleted_longer_than(now, days)
    on_page = depleted_page(now, days, limit)
    last_job = (
        select(func.max(ledger_entries.c.occurred_at))
        .where(
            ledger_entries.c.customer_id == customers.c.customer_id, ledger_entries.c.kind.in_(["debited", "captured"])
        )
        .correlate(customers)
        .scalar_subquery()
    )
    async with db.connect() as connection:
        total = (await connection.execute(select(func.count()).select_from(customers).where(*at_risk))).scalar_one()
        rows = await connection.execute(
            select(
                customers.c.customer_id,
                customers.c.credits_depleted_at,
                dunning_cases.c.status,
                dunning_cases.c.last_failure_at,
                func.coalesce(dunning_cases.c.last_failure_message, dunning_cases.c.last_decline_code).label("failure"),
                last_job.label("last_job_at"),
                customer_notes.c.note,
                customer_notes.c.updated_at.label("note_updated_at"),
            )
            .select_from(
                on_page.join(customers, customers.c.customer_id == on_page.c.customer_id)
                .outerjoin(dunning_cases, dunning_cases.c.id == latest_case_id())
                .outerjoin(customer_notes, customer_notes.c.customer_id == customers.c.customer_id)
            )
            .order_by(customers.c.credits_depleted_at, customers.c.customer_id)
        )
        page = [
            AtRiskCustomer(
                r.customer_id,
                r.credits_depleted_at,
                (now - r.credits_depleted_at).days,
                r.status,
                r.last_failure_at,
                r.failure,
                r.last_job_at,
                r.note,
                r.note_updated_at,
            )
            for r in rows
        ]
    return total, page


async def save_note(uow: UnitOfWork, customer_id: str, note: str, now: datetime) -> bool:
    """An admin's follow-up note on a customer (the latest one stands). False for an unknown customer."""
    async with uow:
        connection = uow.connection
        known = (
            await connection.execute(select(customers.c.customer_id).where(customers.c.customer_id == customer_id))
        ).first()
        if known is None:
            return False
        statement = upsert_into(connection, customer_notes).values(customer_id=customer_id, note=note, updated_at=now)
        await connection.execute(
            statement.on_conflict_do_update(
                index_elements=[customer_notes.c.customer_id], set_={"note": note, "updated_at": now}
            )
        )
        await uow.commit()
    return True


async def notice_crossings(uow: UnitOfWork, now: datetime, days: int) -> list[str]:
    """Record each customer who has crossed the line (depleted more than ``days`` days) since the
    last look, once per depletion. Returns who crossed now: the live page's bubble grows by them
    even though no event happened."""
    async with uow:
        connection = uow.connection
        crossed = select(
            customers.c.customer_id,
            customers.c.credits_depleted_at,
            literal(now, type_=retention_crossings.c.noticed_at.type),
        ).where(*depleted_longer_than(now, days))
        statement = (
            upsert_into(connection, retention_crossings)
            .from_select(["customer_id", "depleted_at", "noticed_at"], crossed)
            .on_conflict_do_nothing()
            .returning(retention_crossings.c.customer_id)
        )
        new = list((await connection.execute(statement)).scalars())
        await uow.commit()
    return new
