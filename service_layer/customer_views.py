"""What the admin console shows about one customer besides their credits, and finding one."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, or_, select

from domain.referrals import normalize_email
from infra.db import Database
from infra.db.tables import customer_notes, customer_profiles, customers, dunning_cases, referral_codes
from service_layer.views import latest_case_id


@dataclass(frozen=True)
class CustomerFound:
    customer_id: str
    email: str | None
    balance: int


@dataclass(frozen=True)
class CustomerFacts:
    customer_id: str
    email: str | None
    signed_up_at: datetime | None
    referral_codes: list[str]
    note: str | None
    #: The newest dunning case, if any.
    dunning_status: str | None
    dunning_invoice: str | None
    next_retry_at: datetime | None


async def find_customers(db: Database, wanted: str, limit: int = 20) -> list[CustomerFound]:
    """By sign-up email (as given, or normalised as the referral rules compare them) when
    ``wanted`` has an @; else the customer whose id it is, then ids starting with it."""
    query = select(
        customers.c.customer_id, customer_profiles.c.contact_email, customer_profiles.c.email, customers.c.balance
    ).select_from(customers.outerjoin(customer_profiles, customer_profiles.c.customer_id == customers.c.customer_id))
    if "@" in wanted:
        query = query.where(
            or_(
                customer_profiles.c.email == normalize_email(wanted),
                func.lower(customer_profiles.c.contact_email) == wanted.strip().lower(),
            )
        )
    else:
        prefix = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(customers.c.customer_id.like(prefix + "%", escape="\\"))
    query = query.order_by(customers.c.customer_id != wanted, customers.c.customer_id).limit(limit)
    async with db.connect() as connection:
        rows = await connection.execute(query)
        return [CustomerFound(r.customer_id, r.contact_email or r.email, r.balance) for r in rows]


async def customer_facts(db: Database, customer_id: str) -> CustomerFacts:
    async with db.connect() as connection:
        profile = (
            await connection.execute(select(customer_profiles).where(customer_profiles.c.customer_id == customer_id))
        ).first()
        codes = list(
            (
                await connection.execute(
                    select(referral_codes.c.code)
                    .where(referral_codes.c.referrer_id == customer_id, referral_codes.c.active)
                    .order_by(referral_codes.c.created_at)
                )
            ).scalars()
        )
        note = (
            await connection.execute(select(customer_notes.c.note).where(customer_notes.c.customer_id == customer_id))
        ).scalar_one_or_none()
        case = (
            await connection.execute(
                select(dunning_cases.c.status, dunning_cases.c.invoice_id, dunning_cases.c.next_retry_at)
                .select_from(customers.join(dunning_cases, dunning_cases.c.id == latest_case_id()))
                .where(customers.c.customer_id == customer_id)
            )
        ).first()
    return CustomerFacts(
        customer_id,
        (profile.contact_email or profile.email) if profile else None,
        profile.signed_up_at if profile else None,
        codes,
        note,
        case.status if case else None,
        case.invoice_id if case else None,
        case.next_retry_at if case else None,
    )
