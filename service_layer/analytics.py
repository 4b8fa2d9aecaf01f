"""Credits analytics: issued, used, expired and outstanding per month, upcoming expirations, breakage.

Aggregated in SQL (one grouped scan of `ix_ledger_entries_kind_time`, one of the open lots),
never row by row in Python: it stays fast on millions of ledger entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db import Database
from infra.db.tables import LOT_IS_OPEN, credit_lots, ledger_entries

BALANCE_KINDS = ("issued", "adjusted", "debited", "captured", "expired", "reversed", "gifted")


@dataclass(frozen=True)
class Month:
    month: str  # YYYY-MM (UTC)
    issued: int  # payments, and positive adjustments
    used: int  # jobs charged
    expired: int
    reversed: int  # refunds and disputes
    adjusted_down: int  # negative adjustments
    outstanding: int  # the book balance of all customers at the month's end
    breakage_rate: float | None  # expired ÷ issued in the month


@dataclass(frozen=True)
class Analytics:
    months: list[Month]
    upcoming_expirations: list[tuple[str, int]]  # (YYYY-MM, credits still open that expire then)
    totals: dict[str, int]
    breakage_rate: float | None  # expired ÷ issued over the period shown


def _month(connection: AsyncConnection, column):
    if connection.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM")
    return func.strftime("%Y-%m", column)


async def credits_analytics(db: Database, now: datetime, since: datetime | None = None, until: datetime | None = None) -> Analytics:
    async with db.connect() as connection:
        month = _month(connection, ledger_entries.c.occurred_at).label("month")
        credits = ledger_entries.c.credits
        kind = ledger_entries.c.kind

        def total(condition):
            return func.coalesce(func.sum(case((condition, credits), else_=0)), 0)

        where = [kind.in_(BALANCE_KINDS)]
        if until is not None:
            where.append(ledger_entries.c.occurred_at < until)
        rows = (
            await connection.execute(
                select(
                    month,
                    total(kind == "issued").label("issued"),
                    total((kind == "adjusted") & (credits > 0)).label("adjusted_up"),
                    total((kind == "adjusted") & (credits < 0)).label("adjusted_down"),
                    total(kind.in_(("debited", "captured"))).label("used"),
                    total(kind == "expired").label("expired"),
                    total(kind == "reversed").label("reversed"),
                    func.sum(credits).label("net"),
                )
                .where(*where)
                .group_by(month)
                .order_by(month)
            )
        ).all()
        lot_month = _month(connection, credit_lots.c.expires_at).label("month")
        upcoming = (
            await connection.execute(
                select(lot_month, func.sum(credit_lots.c.remaining))
                .where(LOT_IS_OPEN, credit_lots.c.expires_at > now)
                .group_by(lot_month)
                .order_by(lot_month)
            )
        ).all()
    months, outstanding = [], 0
    # Months are UTC calendar months, whole: `since` picks the month it falls in, read in UTC.
    since_month = f"{since.astimezone(timezone.utc):%Y-%m}" if since else None
    for r in rows:
        outstanding += int(r.net)  # cumulative from the first entry: the balance at the month's end
        if since_month and r.month < since_month:
            continue
        issued = int(r.issued) + int(r.adjusted_up)
        expired = -int(r.expired)
        months.append(Month(r.month, issued, -int(r.used), expired, -int(r.reversed), -int(r.adjusted_down), outstanding, _rate(expired, issued)))
    totals = {name: sum(getattr(m, name) for m in months) for name in ("issued", "used", "expired", "reversed", "adjusted_down")}
    return Analytics(months, [(m, int(c)) for m, c in upcoming], totals, _rate(totals["expired"], totals["issued"]))


def _rate(expired: int, issued: int) -> float | None:
    return round(expired / issued, 4) if issued else None
