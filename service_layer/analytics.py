"""Credits analytics: issued, used, expired and outstanding per month, upcoming expirations, breakage.

Aggregated in SQL over the requested window only (a range of `ix_ledger_entries_kind_time`),
plus the stored customer balances and one grouped scan of the open lots: never row by row
in Python, and the cost follows the window, not the size of the history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import add_months
from infra.db import Database
from infra.db.tables import LOT_IS_OPEN, credit_lots, customers, ledger_entries

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
    breakage_rate: float | None  # expired ÷ (expired + used) in the month


@dataclass(frozen=True)
class Analytics:
    months: list[Month]
    upcoming_expirations: list[tuple[str, int]]  # (YYYY-MM, credits still open that expire then)
    totals: dict[str, int]
    breakage_rate: float | None  # expired ÷ (expired + used) over the period shown


def _month(connection: AsyncConnection, column):
    if connection.dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM")
    return func.strftime("%Y-%m", column)


async def credits_analytics(
    db: Database, now: datetime, since: datetime | None = None, until: datetime | None = None
) -> Analytics:
    """The months from ``since`` (default: the last twelve) to ``until`` (default: now).

    Only that window's entries are scanned (a range of the kind/time index); the balance at
    each month's end is worked back from today's total (the stored customer balances, which
    the entries sum to) minus what happened after it — so the cost follows the window, not
    the whole history.
    """
    since = _month_start(since.astimezone(UTC) if since else _months_back(now, 11))
    async with db.connect() as connection:
        if connection.dialect.name == "postgresql":
            # One snapshot for every statement: today's balances and the window must agree.
            await connection.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        rows = await _monthly_flows(connection, since, until)
        balance_now = (await connection.execute(select(func.coalesce(func.sum(customers.c.balance), 0)))).scalar_one()
        after_window = await _net_since(connection, until) if until is not None else 0
        upcoming = await _upcoming_expiries(connection, now)
    months = _months(rows, outstanding=int(balance_now) - int(after_window))
    totals = {
        name: sum(getattr(m, name) for m in months)
        for name in ("issued", "used", "expired", "reversed", "adjusted_down")
    }
    return Analytics(months, [(m, int(c)) for m, c in upcoming], totals, _rate(totals["expired"], totals["used"]))


async def _monthly_flows(connection, since: datetime, until: datetime | None) -> list:
    """Each month's credits by kind of entry, over the window only."""
    month = _month(connection, ledger_entries.c.occurred_at).label("month")
    credits = ledger_entries.c.credits
    kind = ledger_entries.c.kind

    def total(condition):
        return func.coalesce(func.sum(case((condition, credits), else_=0)), 0)

    window = [kind.in_(BALANCE_KINDS), ledger_entries.c.occurred_at >= since]
    if until is not None:
        window.append(ledger_entries.c.occurred_at < until)
    query = (
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
        .where(*window)
        .group_by(month)
        .order_by(month)
    )
    return (await connection.execute(query)).all()


async def _net_since(connection, until: datetime) -> int:
    """What the balance moved by after the window (to walk back from today's total)."""
    credits, kind = ledger_entries.c.credits, ledger_entries.c.kind
    query = select(func.coalesce(func.sum(credits), 0)).where(
        kind.in_(BALANCE_KINDS), ledger_entries.c.occurred_at >= until
    )
    return (await connection.execute(query)).scalar_one()


async def _upcoming_expiries(connection, now: datetime) -> list:
    lot_month = _month(connection, credit_lots.c.expires_at).label("month")
    query = (
        select(lot_month, func.sum(credit_lots.c.remaining))
        .where(LOT_IS_OPEN, credit_lots.c.expires_at > now)
        .group_by(lot_month)
        .order_by(lot_month)
    )
    return (await connection.execute(query)).all()


def _months(rows: list, outstanding: int) -> list[Month]:
    """Walk back from the window's end (``outstanding``): the balance at each month's end."""
    months = []
    for r in reversed(rows):
        issued, used, expired = int(r.issued) + int(r.adjusted_up), -int(r.used), -int(r.expired)
        months.append(
            Month(
                r.month,
                issued,
                used,
                expired,
                -int(r.reversed),
                -int(r.adjusted_down),
                outstanding,
                _rate(expired, used),
            )
        )
        outstanding -= int(r.net)
    months.reverse()
    return months


def _rate(expired: int, used: int) -> float | None:
    """Breakage: the share of credits that ended unused — expired ÷ (expired + used)."""
    return round(expired / (expired + used), 4) if expired + used else None


def _month_start(moment: datetime) -> datetime:
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _months_back(moment: datetime, months: int) -> datetime:
    return add_months(_month_start(moment.astimezone(UTC)), -months)
