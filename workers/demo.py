"""The main job: months of a service business's customers, through the real producer and actors.

Customers sign up (some with a referral code), payments load credits, completed jobs spend
them, light users let credits expire, churned customers run dry and show up on the at-risk
list. Some payments fail: the real dunning schedule retries them every week against the
SimulatedPaymentProvider (infra/simulated_payments.py), and most recover. Referral rewards
qualify on the referred customer's first payment and are paid out on Fridays through the
manual gateway (a CSV for operations). Notifications go to a local mailbox file.

Events go through the real ``Publisher`` onto the (embedded or real) Redis broker and are
applied by a real Dramatiq worker; the periodic jobs are the real actors, run "as of" the
story's moments; a few events are published twice or out of order, as a real front end would.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import select

from infra.simulated_payments import SimulatedPaymentProvider
from messages import CreditsAdjusted, CustomerSignedUp, Event, JobCompleted, PaymentFailed, PaymentSucceeded, Publisher
from workers import demo_report

#: What one credit costs the customer in the story, in cents.
CENTS_PER_CREDIT = 2_500
#: Chance that a monthly payment fails; of those, the chance that retrying never helps.
PAYMENT_FAILURE_RATE = 0.07
UNRECOVERABLE_RATE = 0.25
#: Chance that a new customer signs up with a referral code.
REFERRED_RATE = 0.3
FIRST_NAMES = (
    "ana",
    "ben",
    "chloe",
    "dev",
    "emma",
    "farid",
    "grace",
    "hiro",
    "ines",
    "jon",
    "kemi",
    "liam",
    "maya",
    "noor",
    "omar",
    "priya",
    "quinn",
    "rosa",
    "sam",
    "tariq",
)
LAST_NAMES = (
    "alvarez",
    "brooks",
    "chen",
    "diallo",
    "evans",
    "fischer",
    "garcia",
    "haddad",
    "ito",
    "jensen",
    "kowalski",
    "lopez",
    "mensah",
    "novak",
    "okafor",
    "patel",
    "quist",
    "rossi",
    "silva",
    "tanaka",
)


@dataclass
class SimulatedCustomer:
    customer_id: str
    monthly_credits: int
    jobs_per_month: float
    billing_day: int
    join_month: int
    churn_month: int | None
    email: str = ""


def _say(text: str = "") -> None:
    print(text, flush=True)


def _customers(rng: random.Random, count: int, months: int, prefix: str) -> list[SimulatedCustomer]:
    people = []
    for n in range(count):
        monthly = rng.choice((1, 1, 2, 4))
        # Heavy users overspend (overdraft, depletion); light users let credits expire.
        usage = rng.choice((0.1, 0.25, 0.5, 0.9, 1.2, 1.5))
        # A third were members from the start (their unused credits reach expiry); the rest join later.
        joined = 0 if rng.random() < 0.34 else rng.randrange(1, months)
        churn = rng.randrange(joined + 1, months + 1) if rng.random() < 0.3 else None
        email = f"{rng.choice(FIRST_NAMES)}.{rng.choice(LAST_NAMES)}{n}@example.com"
        people.append(
            SimulatedCustomer(f"{prefix}{n:04d}", monthly, monthly * usage, rng.randrange(1, 29), joined, churn, email)
        )
    return people


def _signups(
    rng: random.Random, people: list[SimulatedCustomer], month_start: datetime, month: int, run: str, codes: list[str]
) -> list[Event]:
    """This month's new customers, an hour before their first payment; some with a referral code."""
    events: list[Event] = []
    for person in people:
        if person.join_month != month:
            continue
        code = rng.choice(codes) if codes and rng.random() < REFERRED_RATE else None
        events.append(
            CustomerSignedUp(
                event_id=f"{run}:signup:{person.customer_id}",
                customer_id=person.customer_id,
                email=person.email,
                referral_code=code,
                occurred_at=month_start + timedelta(days=person.billing_day - 1, hours=7),
            )
        )
    return events


def _payment(rng: random.Random, person: SimulatedCustomer, paid_at: datetime, month: int, run: str, provider) -> Event:
    """The month's payment: usually it succeeds; sometimes the card is declined and the invoice
    goes to dunning, scripted at the simulated provider to recover after some retries, or never."""
    payment_id = f"in_{run}{person.customer_id[-4:]}m{month:02d}"
    credits, cents = person.monthly_credits, person.monthly_credits * CENTS_PER_CREDIT
    if rng.random() >= PAYMENT_FAILURE_RATE:
        return PaymentSucceeded(
            event_id=f"{run}:pay:{person.customer_id}:{month}",
            customer_id=person.customer_id,
            occurred_at=paid_at,
            payment_id=payment_id,
            credits=credits,
            amount_cents=cents,
            currency="USD",
        )
    never = rng.random() < UNRECOVERABLE_RATE
    provider.bill(payment_id, person.customer_id, credits, cents, None if never else rng.choice((0, 1, 2)))
    if never:
        person.churn_month = month + 1  # the card never works again: they stop paying
    return PaymentFailed(
        event_id=f"{run}:failed:{person.customer_id}:{month}",
        customer_id=person.customer_id,
        occurred_at=paid_at,
        invoice_id=payment_id,
        decline_code="insufficient_funds",
        failure_message="Your card has insufficient funds.",
    )


def _month_events(
    rng: random.Random, people: list[SimulatedCustomer], month_start: datetime, month: int, run: str, provider
) -> list[Event]:
    events: list[Event] = []
    month_end = _next_month(month_start)
    span = (month_end - month_start).total_seconds()
    for person in people:
        if month < person.join_month:
            continue
        paying = person.churn_month is None or month < person.churn_month
        if paying:
            paid_at = month_start + timedelta(days=person.billing_day - 1, hours=rng.randrange(8, 20))
            events.append(_payment(rng, person, paid_at, month, run, provider))
        # Jobs arrive as a Poisson process: exponential gaps between them.
        rate = (person.jobs_per_month if paying else person.jobs_per_month * 0.5) / span
        at = month_start + timedelta(seconds=rng.expovariate(rate))
        j = 0
        while at < month_end:
            events.append(
                JobCompleted(
                    event_id=f"{run}:job:{person.customer_id}:{month}:{j}",
                    customer_id=person.customer_id,
                    occurred_at=at,
                    job_id=f"job-{month}-{j}",
                )
            )
            j += 1
            at += timedelta(seconds=rng.expovariate(rate))
        if rng.random() < 0.01:
            events.append(
                CreditsAdjusted(
                    event_id=f"{run}:adj:{person.customer_id}:{month}",
                    customer_id=person.customer_id,
                    occurred_at=month_start + timedelta(days=10),
                    credits=2,
                    reason="goodwill after a late arrival",
                    actor="demo-admin",
                )
            )
    events.sort(key=lambda e: e.occurred_at)
    # The real world: ~2% published twice, ~2% delayed past later events.
    delivered = []
    for event in events:
        delivered.append(event)
        if rng.random() < 0.02:
            delivered.append(event)
    for _ in range(len(delivered) // 50):
        i = rng.randrange(len(delivered))
        delivered.append(delivered.pop(i))
    return delivered


def _next_month(moment: datetime) -> datetime:
    return (moment.replace(day=28) + timedelta(days=4)).replace(day=1)


def run_demo(customers: int = 30, months: int = 14, seed: int = 7, keep: bool = False) -> int:
    """Tell the story; leave nothing behind unless ``keep`` (the database, the CSV, the mail file)."""
    workdir = Path(tempfile.mkdtemp(prefix="credits-demo-"))
    try:
        return _run_demo(customers, months, seed, workdir, keep)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


@dataclass
class Story:
    """What the demo drives: the settings, the simulated provider, the run's names and files."""

    settings: object
    provider: SimulatedPaymentProvider
    run: str
    prefix: str
    workdir: Path
    now: datetime

    @property
    def url(self) -> str:
        return self.settings.effective_database_url

    @property
    def mail_file(self) -> Path:
        return self.workdir / "notifications.mbox"

    @property
    def payouts_csv(self) -> Path:
        return self.workdir / "payouts.csv"


def _story(months: int, workdir: Path) -> Story:
    from infra.mail import MailboxFileMailer
    from infra.settings import get_settings
    from workers.runtime import Runtime, configure_runtime

    settings = get_settings()
    if not settings.database_url:
        # A fresh embedded database per run, so the story always starts from zero.
        settings = settings.model_copy(update={"database_url": f"sqlite+aiosqlite:///{workdir / 'credits.sqlite3'}"})
    # The story is set in the past: accept events as old as its first month.
    settings = settings.model_copy(
        update={"event_max_age_days": max(settings.event_max_age_days, (months + 1) * 31), "dunning_end_action": "keep"}
    )
    run = uuid.uuid4().hex[:6]
    story = Story(
        settings,
        SimulatedPaymentProvider(datetime.now(UTC)),
        run,
        f"demo-{run}-",
        workdir,
        datetime.now(UTC),
    )
    # The real actors, with the simulated provider for Stripe and a mailbox file for SMTP.
    configure_runtime(
        Runtime(settings, _provider=story.provider, _mailer=MailboxFileMailer(story.mail_file, settings.smtp_from))
    )
    return story


def _run_demo(customers: int, months: int, seed: int, workdir: Path, keep: bool) -> int:
    import logging

    from alembic import command

    from infra.db.engine import alembic_config

    story = _story(months, workdir)
    command.upgrade(alembic_config(story.url), "head")
    from workers.actors import broker
    from workers.inprocess import running_worker

    logging.getLogger().setLevel(logging.WARNING)  # the story is on stdout; warnings and errors still show
    rng = random.Random(seed)
    people = _customers(rng, customers, months, story.prefix)
    first_month = story.now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    for _ in range(months):
        first_month = (first_month - timedelta(days=1)).replace(day=1)

    where = (
        "embedded SQLite + in-process Redis" if not story.settings.broker_address else "PostgreSQL + a message broker"
    )
    _say(f"credits demo: {customers} customers over {months} months, {where}")
    _say(
        f"payments: {SimulatedPaymentProvider.name} (no network, no money); mail: a local mailbox file; payouts: the manual gateway's CSV"
    )
    _say(f"database: {story.url}")
    _say(demo_report.MONTH_HEADER)
    codes = asyncio.run(_register_referrers(story))
    publisher = Publisher(broker)
    started = time.monotonic()
    published = 0
    with running_worker(broker, threads=2) as worker:
        month_start = first_month
        for month in range(months):
            events = _signups(rng, people, month_start, month, story.run, codes) + _month_events(
                rng, people, month_start, month, story.run, story.provider
            )
            events = [e for e in events if e.occurred_at <= story.now]
            for event in events:
                publisher.publish(event)
            published += len(events)
            _live_month(story, broker, worker, month_start)
            codes = codes[:2] + asyncio.run(_customer_codes(story))
            stats = asyncio.run(demo_report.month_stats(story.url, story.prefix, month_start, _next_month(month_start)))
            _say(demo_report.month_line(month_start, len(events), stats))
            month_start = _next_month(month_start)
    elapsed = time.monotonic() - started
    summary = asyncio.run(demo_report.summary(story.settings, story.prefix, story.now, story.mail_file))
    story.payouts_csv.write_text(summary.payouts_csv)
    demo_report.print_summary(summary, published, elapsed, story.settings.depleted_report_days, _say)
    _left_behind(story, keep)
    return 0 if summary.reconciles and summary.dead_letters == 0 else 1


def _live_month(story: Story, broker, worker, month_start: datetime) -> None:
    """The month's events are applied; then each Friday the dunning retries and referral
    payouts run; with the last one, the month's expiry, expiry warnings and mail."""
    from workers.actors import (
        collect_payments,
        expire_credits,
        pay_referrals,
        send_notifications,
        warn_expiring_credits,
    )
    from workers.inprocess import drain

    drain(broker, worker)
    fridays = [friday for friday in _fridays(month_start, story.settings.payout_timezone) if friday <= story.now]
    month_end = min(_next_month(month_start), story.now)
    for n, friday in enumerate(fridays, start=1):
        story.provider.at = friday  # a payment recovered by this run is dated then
        collect_payments.send(as_of=friday.isoformat())
        pay_referrals.send(as_of=friday.isoformat())
        if n == len(fridays):  # fewer rounds: these touch neither payments nor payouts
            expire_credits.send(as_of=month_end.isoformat())
            warn_expiring_credits.send(as_of=month_end.isoformat())
            send_notifications.send()
        drain(broker, worker)
    if not fridays:
        expire_credits.send(as_of=month_end.isoformat())
        drain(broker, worker)


def _fridays(month_start: datetime, zone: str) -> list[datetime]:
    """Each Friday of the month at noon in the business's time zone (its payout day), in UTC."""
    tz = ZoneInfo(zone)
    days = (
        date.fromordinal(month_start.date().toordinal() + n)
        for n in range((_next_month(month_start) - month_start).days)
    )
    return [datetime.combine(day, dt_time(12), tz).astimezone(UTC) for day in days if day.weekday() == 4]


async def _register_referrers(story: Story) -> list[str]:
    """An employee paid through Cash App and a partner paid by hand: both by the manual gateway."""
    from domain.referrals import ReferrerDetails, ReferrerKind
    from infra.db import Database
    from service_layer.referrals import register_referrer
    from service_layer.unit_of_work import SqlUnitOfWork

    db = Database(story.url)
    try:
        return [
            await register_referrer(
                SqlUnitOfWork(db),
                ReferrerDetails(
                    f"{story.prefix}employee-ana",
                    ReferrerKind.EMPLOYEE,
                    name="Ana (front desk)",
                    payout_method="cash_app",
                    payout_address="$AnaFrontDesk",
                ),
            ),
            await register_referrer(
                SqlUnitOfWork(db),
                ReferrerDetails(
                    f"{story.prefix}partner-gym",
                    ReferrerKind.PARTNER,
                    name="Northside Gym",
                    payout_method="manual",
                    payout_address="bank transfer, ref NORTHSIDE",
                ),
            ),
        ]
    finally:
        await db.dispose()


async def _customer_codes(story: Story, limit: int = 6) -> list[str]:
    """Codes of the earliest customers: they tell friends."""
    from infra.db import Database
    from infra.db.tables import referral_codes, referrers

    db = Database(story.url)
    try:
        async with db.connect() as conn:
            query = (
                select(referral_codes.c.code)
                .join(referrers, referrers.c.referrer_id == referral_codes.c.referrer_id)
                .where(referrers.c.kind == "customer", referrers.c.referrer_id.startswith(story.prefix))
                .order_by(referrers.c.referrer_id)
                .limit(limit)
            )
            return list((await conn.execute(query)).scalars())
    finally:
        await db.dispose()


def _left_behind(story: Story, keep: bool) -> None:
    _say()
    if keep:
        _say("kept (--keep):")
        _say(f"  database          {story.url}")
        _say(f"  payouts CSV       {story.payouts_csv}")
        _say(f"  mail file         {story.mail_file}  (mbox: open it with any mail reader)")
    else:
        _say("nothing left behind (database, payouts CSV and mail file removed; --keep keeps them)")


if __name__ == "__main__":
    sys.exit(run_demo())
