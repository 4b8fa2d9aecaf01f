"""What `credits demo` tells the owner: a line per month and a summary, read from the database
the real actors wrote (ledger, dunning cases, referrals and payouts, notifications)."""

from __future__ import annotations

import mailbox
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select

from infra.db import Database
from infra.db.tables import (
    credit_lots,
    customers,
    dead_letters,
    dunning_cases,
    ledger_entries,
    notifications,
    processed_events,
    referrals,
)

MONTH_HEADER = f"{'month':<8} {'events':>7} {'issued':>7} {'spent':>7} {'expired':>8} {'depleted':>9} {'overdrawn':>10} {'failed':>7} {'recovered':>10} {'emails':>7}"
NOTICE_NAMES = {
    "payment_failed": "payment failed",
    "credits_expiring": "credits expiring",
    "credits_depleted": "out of credits",
    "credits_restored": "credits back",
}


def month_line(month_start: datetime, events: int, s: dict) -> str:
    return (
        f"{month_start:%Y-%m}  {events:>7} {s['issued']:>7} {s['spent']:>7} {s['expired']:>8} {s['depleted']:>9} {s['overdrawn']:>10}"
        f" {s['failed']:>7} {s['recovered']:>10} {s['emails']:>7}"
    )


async def month_stats(url: str, prefix: str, start: datetime, end: datetime) -> dict:
    db = Database(url)
    ours = customers.c.customer_id.startswith(prefix)
    try:
        async with db.connect() as conn:
            rows = await conn.execute(
                select(ledger_entries.c.kind, func.sum(ledger_entries.c.credits))
                .where(
                    ledger_entries.c.customer_id.startswith(prefix),
                    ledger_entries.c.occurred_at >= start,
                    ledger_entries.c.occurred_at < end,
                )
                .group_by(ledger_entries.c.kind)
            )
            by_kind = {kind: total or 0 for kind, total in rows}
            depleted = await _count(conn, customers, ours, customers.c.credits_depleted_at.is_not(None))
            overdrawn = await _count(conn, customers, ours, customers.c.overdraft > 0)
            in_month = (
                dunning_cases.c.customer_id.startswith(prefix),
                dunning_cases.c.first_failed_at >= start,
                dunning_cases.c.first_failed_at < end,
            )
            failed = await _count(conn, dunning_cases, *in_month)
            recovered = await _count(conn, dunning_cases, *in_month, dunning_cases.c.status == "recovered")
            emails = await _count(
                conn,
                notifications,
                notifications.c.customer_id.startswith(prefix),
                notifications.c.status == "sent",
                notifications.c.created_at >= start,
                notifications.c.created_at < end,
            )
    finally:
        await db.dispose()
    return {
        "issued": by_kind.get("issued", 0) + max(by_kind.get("adjusted", 0), 0),
        "spent": -(by_kind.get("debited", 0) + by_kind.get("captured", 0)),
        "expired": -by_kind.get("expired", 0),
        "depleted": depleted,
        "overdrawn": overdrawn,
        "failed": failed,
        "recovered": recovered,
        "emails": emails,
    }


async def _count(conn, table, *where) -> int:
    return (await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one()


async def _grouped(conn, column, *where) -> Counter:
    return Counter(
        {key: n for key, n in await conn.execute(select(column, func.count()).where(*where).group_by(column))}
    )


@dataclass
class Summary:
    kinds: Counter
    remaining: int
    overdraft: int
    applied: int
    dead_letters: int
    customers: int
    payments: tuple[int, int]  # how many, cents
    dunning: Counter
    referrals: Counter
    reward_cents: int
    payouts: list[dict]
    emails: Counter
    mailbox_messages: int
    report_total: int
    report: list = field(default_factory=list)
    payouts_csv: str = ""

    @property
    def entries_total(self) -> int:
        return sum(v for k, v in self.kinds.items() if k not in ("held", "released", "lapsed"))

    @property
    def reconciles(self) -> bool:
        return self.entries_total == self.remaining - self.overdraft


async def summary(settings, prefix: str, now: datetime, mail_file: Path) -> Summary:
    from service_layer import referral_views, views

    db = Database(settings.effective_database_url)
    try:
        async with db.connect() as conn:
            kinds, remaining, overdraft, payments, reward_cents = await _money(conn, prefix)
            figures = dict(
                applied=await _count(conn, processed_events, processed_events.c.customer_id.startswith(prefix)),
                dead_letters=await _count(conn, dead_letters),
                customers=await _count(conn, customers, customers.c.customer_id.startswith(prefix)),
                dunning=await _grouped(conn, dunning_cases.c.status, dunning_cases.c.customer_id.startswith(prefix)),
                referrals=await _grouped(conn, referrals.c.status, referrals.c.referred_customer_id.startswith(prefix)),
                emails=await _grouped(
                    conn,
                    notifications.c.kind,
                    notifications.c.customer_id.startswith(prefix),
                    notifications.c.status == "sent",
                ),
            )
        page = await referral_views.list_payouts(db, referral_views.ListFilter(limit=10_000))
        total, report = await views.depleted_customers(db, now, settings.depleted_report_days, limit=15, offset=0)
    finally:
        await db.dispose()
    ours = [row for row in page.rows if row["payee_id"].startswith(prefix)]
    return Summary(
        kinds,
        remaining,
        overdraft,
        payments=(payments[0], int(payments[1])),
        reward_cents=int(reward_cents),
        payouts=ours,
        mailbox_messages=len(mailbox.mbox(mail_file)) if mail_file.exists() else 0,
        report_total=total,
        report=report,
        payouts_csv=referral_views.to_csv(ours, referral_views.PAYOUT_CSV_COLUMNS),
        **figures,
    )


async def _money(conn, prefix: str) -> tuple:
    """Credits by kind of entry, credits left, overdraft, payments (count, cents) and standing rewards."""
    kinds = Counter(
        {
            k: t
            for k, t in await conn.execute(
                select(ledger_entries.c.kind, func.sum(ledger_entries.c.credits))
                .where(ledger_entries.c.customer_id.startswith(prefix))
                .group_by(ledger_entries.c.kind)
            )
        }
    )
    lots = credit_lots.c.customer_id.startswith(prefix)
    remaining = (
        await conn.execute(select(func.coalesce(func.sum(credit_lots.c.remaining), 0)).where(lots))
    ).scalar_one()
    overdraft = (
        await conn.execute(
            select(func.coalesce(func.sum(customers.c.overdraft), 0)).where(customers.c.customer_id.startswith(prefix))
        )
    ).scalar_one()
    payments = (
        await conn.execute(
            select(func.count(), func.coalesce(func.sum(credit_lots.c.paid_cents), 0)).where(
                lots, credit_lots.c.payment_id.is_not(None)
            )
        )
    ).one()
    standing = referrals.c.status.in_(["pending", "approved", "in_payout", "paid", "flagged"])
    reward_cents = (
        await conn.execute(
            select(func.coalesce(func.sum(referrals.c.reward_cents), 0)).where(
                referrals.c.referred_customer_id.startswith(prefix), standing
            )
        )
    ).scalar_one()
    return kinds, remaining, overdraft, payments, reward_cents


def _dollars(cents: int) -> str:
    return f"${cents / 100:,.2f}"


def print_summary(s: Summary, published: int, elapsed: float, days: int, say: Callable[[str], None]) -> None:
    k, d = s.kinds, s.dunning
    paid_out = sum(p["amount_cents"] for p in s.payouts)
    unpaid = sum(n for status, n in d.items() if status not in ("recovered", "closed"))
    emails = ", ".join(
        f"{n} {NOTICE_NAMES.get(kind, kind)}" for kind, n in sorted(s.emails.items(), key=lambda kv: -kv[1])
    )
    say("")
    say("summary (money in US dollars; one credit pays for one job)")
    say(f"  customers            {s.customers:>8,}")
    say(f"  payments             {s.payments[0]:>8,}  {_dollars(s.payments[1])} collected")
    say(
        f"  failed payments      {sum(d.values()):>8,}  retried on the dunning schedule against the SimulatedPaymentProvider: {d.get('recovered', 0)} recovered, {unpaid} still unpaid"
    )
    say(f"  credits sold         {k.get('issued', 0):>8,} credits")
    say(f"  credits used         {-(k.get('debited', 0) + k.get('captured', 0)):>8,} credits (jobs done)")
    say(f"  credits adjusted     {k.get('adjusted', 0):>8,} credits (goodwill from admins)")
    say(f"  credits expired      {-k.get('expired', 0):>8,} credits (unused 12 months after purchase)")
    say(f"  credits on account   {s.remaining:>8,} credits (bought, not used yet)")
    say(
        f"  overdraft            {s.overdraft:>8,} credits: jobs done on credit after a customer ran out; their next payment pays it back first"
    )
    say(
        f"  referral rewards     {sum(n for st, n in s.referrals.items() if st not in ('rejected', 'voided', 'awaiting_payment')):>8,}  "
        f"{_dollars(s.reward_cents)} earned; {len(s.payouts)} payout(s), {_dollars(paid_out)}, exported on Fridays to the payouts CSV (manual gateway: paid by hand)"
    )
    say(
        f"  emails to customers  {sum(s.emails.values()):>8,}  in the mail file ({s.mailbox_messages} messages): {emails or 'none'}"
    )
    say(
        f"  events               {published:>8,}  published ({published - s.applied} duplicates ignored), {s.applied} applied in {elapsed:.1f}s ({s.applied / elapsed:.0f}/s)"
    )
    say(f"  dead letters         {s.dead_letters:>8,}")
    say(
        f"  ledger reconciles    {'yes' if s.reconciles else 'NO':>8}  (entries sum {s.entries_total} = on account {s.remaining} - overdraft {s.overdraft})"
    )
    say("")
    say(f"at risk: out of credits for more than {days} days: {s.report_total} customer(s) (longest first, first 15)")
    say(f"  {'customer':<22} {'depleted since':<26} {'days':>5}  last failed payment")
    for row in s.report:
        say(
            f"  {row.customer_id:<22} {row.credits_depleted_at:%Y-%m-%d %H:%M %Z}       {row.days_depleted:>5}  {row.dunning_status or '-'}"
        )
