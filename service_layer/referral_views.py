"""Read side of referrals and payouts: filtered lists with totals, and a referrer's own summary."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import case, func, select

from domain.referrals import PayoutCalendar, ReferralStatus
from infra.db import Database
from infra.db.tables import payouts, referral_clawbacks, referral_codes, referral_history, referrals, referrers


@dataclass(frozen=True)
class Page:
    total: int
    total_cents: int
    rows: list[dict]


@dataclass(frozen=True)
class ListFilter:
    """What an admin list is narrowed to: a status, a payee, a time range [since, until); a page."""

    status: str | None = None
    payee: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 500
    offset: int = 0
    #: Payouts only: the payout's period (week-<Friday>, day-<date>-<n>).
    period: str | None = None

    def where(self, status_column, payee_column, time_column) -> list:
        conditions = []
        if self.status:
            conditions.append(status_column == self.status)
        if self.payee:
            conditions.append(payee_column == self.payee)
        if self.since:
            conditions.append(time_column >= self.since)
        if self.until:
            conditions.append(time_column < self.until)
        return conditions


async def list_referrals(db: Database, wanted: ListFilter, referral_id: int | None = None) -> Page:
    where = wanted.where(referrals.c.status, referrals.c.referrer_id, referrals.c.submitted_at)
    if referral_id is not None:
        where.append(referrals.c.id == referral_id)
    limit, offset = wanted.limit, wanted.offset
    async with db.connect() as connection:
        # The reward total counts rewards that stand: not rejected or voided ones.
        standing = case(
            (referrals.c.status.in_([ReferralStatus.REJECTED.value, ReferralStatus.VOIDED.value]), 0),
            else_=func.coalesce(referrals.c.reward_cents, 0),
        )
        total, cents = (
            await connection.execute(
                select(func.count(), func.coalesce(func.sum(standing), 0)).select_from(referrals).where(*where)
            )
        ).one()
        rows = [
            dict(r._mapping)
            for r in await connection.execute(
                select(referrals)
                .where(*where)
                .order_by(referrals.c.submitted_at, referrals.c.id)
                .limit(limit)
                .offset(offset)
            )
        ]
        ids = [r["id"] for r in rows]
        history: dict[int, list[dict]] = {}
        if ids:
            for h in await connection.execute(
                select(referral_history).where(referral_history.c.referral_id.in_(ids)).order_by(referral_history.c.id)
            ):
                history.setdefault(h.referral_id, []).append({"status": h.status, "at": h.at, "reason": h.reason})
    for row in rows:
        row["history"] = history.get(row["id"], [])
        row["flags"] = list(row["flags"] or [])
    return Page(total, int(cents), rows)


#: The referrals export, in this column order.
REFERRAL_CSV_COLUMNS = [
    "id",
    "referred_customer_id",
    "referrer_id",
    "code",
    "status",
    "reason",
    "flags",
    "reward_cents",
    "qualifying_payment_id",
    "submitted_at",
    "approve_after",
    "payout_id",
]

#: The payouts export operations pay from by hand (manual gateway), in this column order.
PAYOUT_CSV_COLUMNS = [
    "id",
    "payee_id",
    "payee_name",
    "payout_address",
    "method",
    "period",
    "amount_cents",
    "currency",
    "status",
    "external_reference",
    "created_at",
    "paid_at",
]


def to_csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("; ".join(v) if isinstance(v, list) else v) for k, v in row.items() if k in columns})
    return out.getvalue()


async def list_payouts(db: Database, wanted: ListFilter) -> Page:
    where = wanted.where(payouts.c.status, payouts.c.payee_id, payouts.c.created_at)
    if wanted.period:
        where.append(payouts.c.period == wanted.period)
    limit, offset = wanted.limit, wanted.offset
    async with db.connect() as connection:
        total, cents = (
            await connection.execute(
                select(func.count(), func.coalesce(func.sum(payouts.c.amount_cents), 0))
                .select_from(payouts)
                .where(*where)
            )
        ).one()
        query = (
            select(payouts, referrers.c.payout_address, referrers.c.name.label("payee_name"))
            .select_from(payouts.outerjoin(referrers, referrers.c.referrer_id == payouts.c.payee_id))
            .where(*where)
            .order_by(payouts.c.created_at, payouts.c.id)
            .limit(limit)
            .offset(offset)
        )
        rows = [dict(r._mapping) for r in await connection.execute(query)]
    return Page(total, int(cents), rows)


async def payout_periods(db: Database, limit: int = 30) -> list[str]:
    """The latest periods that have payouts, newest first (what the admin filters by)."""
    async with db.connect() as connection:
        newest = func.max(payouts.c.created_at)
        query = (
            select(payouts.c.period)
            .group_by(payouts.c.period)
            .order_by(newest.desc(), payouts.c.period.desc())
            .limit(limit)
        )
        return list((await connection.execute(query)).scalars())


@dataclass(frozen=True)
class ReferrerSummary:
    referrer_id: str
    kind: str
    codes: list[dict]
    referrals_by_status: dict[str, int]
    paid_to_date_cents: int
    upcoming_cents: int  # approved or in a payout not yet paid
    clawbacks_pending_cents: int  # refunded after payout: taken from the next payout
    next_payout_date: date


async def referrer_summary(
    db: Database, referrer_id: str, now: datetime, calendar: PayoutCalendar
) -> ReferrerSummary | None:
    async with db.connect() as connection:
        referrer = (await connection.execute(select(referrers).where(referrers.c.referrer_id == referrer_id))).first()
        if referrer is None:
            return None
        codes = await _codes_of(connection, referrer_id)
        counts = await _referral_counts(connection, referrer_id)
        paid = await _scalar(
            connection,
            # Paid to date: what the payee's paid payouts brought them (net of clawbacks taken).
            select(func.coalesce(func.sum(payouts.c.amount_cents), 0)).where(
                payouts.c.payee_id == referrer_id, payouts.c.status == "paid"
            ),
        )
        upcoming_statuses = [ReferralStatus.APPROVED.value, ReferralStatus.IN_PAYOUT.value]
        upcoming = await _scalar(
            connection,
            select(func.coalesce(func.sum(referrals.c.reward_cents), 0)).where(
                referrals.c.referrer_id == referrer_id, referrals.c.status.in_(upcoming_statuses)
            ),
        )
        clawbacks = await _scalar(
            connection,
            select(func.coalesce(func.sum(referral_clawbacks.c.amount_cents), 0)).where(
                referral_clawbacks.c.payee_id == referrer_id, referral_clawbacks.c.payout_id.is_(None)
            ),
        )
    next_day = calendar.local_date(now) if referrer.same_day else calendar.next_payout_day(now)
    return ReferrerSummary(
        referrer.referrer_id, referrer.kind, codes, counts, int(paid), int(upcoming), int(clawbacks), next_day
    )


async def _codes_of(connection, referrer_id: str) -> list[dict]:
    query = (
        select(referral_codes).where(referral_codes.c.referrer_id == referrer_id).order_by(referral_codes.c.created_at)
    )
    return [{"code": r.code, "active": r.active, "created_at": r.created_at} for r in await connection.execute(query)]


async def _referral_counts(connection, referrer_id: str) -> dict[str, int]:
    query = (
        select(referrals.c.status, func.count())
        .where(referrals.c.referrer_id == referrer_id)
        .group_by(referrals.c.status)
    )
    return dict((await connection.execute(query)).all())


async def _scalar(connection, query):
    return (await connection.execute(query)).scalar_one()
