"""Paying referral rewards: the hold ends, payouts are snapshotted per payee and period, then sent.

A payout is one row per (payee, period) — ``week-<Friday>`` or, for same-day payees,
``day-<date>`` — made in the same transaction that moves its rewards to ``in_payout``.
Sending is a separate step with the payout's own idempotency key, so a run that crashed
midway, or a second run, finds the payout and never pays it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from domain.referrals import Change, Referral, ReferralRules
from infra.db.referrals import NewPayout, SendOutcome
from service_layer.ports import UnitOfWork, UnitOfWorkFactory

log = structlog.get_logger("credits.payouts")


# ---------------------------------------------------------------- the gateway port


@dataclass(frozen=True)
class PayoutOrder:
    payout_id: int
    payee_id: str
    amount_cents: int
    currency: str
    period: str
    #: The payout's own key: the provider-side group every try of it belongs to.
    payout_key: str
    #: This try's idempotency key: the payout's key, and a fresh one after a failure (a
    #: provider may replay a saved error for a key, as Stripe does for a day).
    idempotency_key: str
    attempts: int  # earlier tries: a gateway checks whether one of them went through
    stripe_account_id: str | None = None
    payout_address: str | None = None


@dataclass(frozen=True)
class Sent:
    #: paid: the money moved (``reference`` is the provider's id); exported: handed to
    #: operations to pay by hand, who record the reference later.
    status: str
    reference: str | None = None


class PayoutFailed(Exception):
    """The gateway did not pay: the payout stays failed and is tried again on the next run."""


class PayoutGateway(Protocol):
    name: str

    async def send(self, order: PayoutOrder) -> Sent: ...


# ---------------------------------------------------------------- the run


@dataclass
class PayoutRun:
    released: int = 0
    created: list[int] = field(default_factory=list)
    held_back: list[str] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=dict)
    failed: list[int] = field(default_factory=list)


async def pay_referrals(
    new_uow: UnitOfWorkFactory,
    gateways: Mapping[str, PayoutGateway],
    method_gateways: Mapping[str, str],
    now: datetime,
    rules: ReferralRules,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> PayoutRun:
    """Release rewards whose hold is over, make today's payouts (same-day payees every day,
    everyone on Fridays), then send every payout not yet paid (failed ones again).

    ``now`` is the business moment the run is for (a catch-up run passes an earlier one);
    ``wall_clock`` times the send leases, which must hold against other runs in real time.
    """
    run = PayoutRun()
    run.released = await release_rewards(new_uow, now)
    await make_payouts(new_uow, method_gateways, now, rules, run)
    await send_payouts(new_uow, gateways, wall_clock, run)
    return run


async def release_rewards(new_uow: UnitOfWorkFactory, now: datetime, batch: int = 2000) -> int:
    released = 0
    while True:
        async with new_uow() as uow:
            due = await uow.referrals.lock_due_for_release(now, batch)
            changed = []
            for referral in due:
                before = len(referral.history)
                if referral.release(now):
                    released += 1
                changed.append((referral, referral.history[before:]))
            await uow.referrals.save_many(changed)
            await uow.commit()
        if len(due) < batch:
            return released


#: Payees whose payouts are made in one transaction, set-based (one statement per kind of
#: row); a chunk that fails is made again one payee at a time, so one payee's trouble never
#: holds up the others.
PAYEES_PER_TRANSACTION = 1000
#: Payees held back named in a chunk's log line (its count is always there).
LOGGED_PAYEES = 20


async def make_payouts(
    new_uow: UnitOfWorkFactory, method_gateways: Mapping[str, str], now: datetime, rules: ReferralRules, run: PayoutRun
) -> None:
    friday = rules.calendar.is_payout_day(now)
    async with new_uow() as uow:
        # On other days only same-day payees can be paid: the rest are not even read.
        payee_ids = await uow.referrals.payees_with_payable(same_day_only=not friday)
        await uow.commit()
    for start in range(0, len(payee_ids), PAYEES_PER_TRANSACTION):
        chunk = payee_ids[start : start + PAYEES_PER_TRANSACTION]
        made = PayoutRun()
        try:
            await _make_payouts(new_uow, method_gateways, now, rules, chunk, friday, made)
        except Exception:
            log.warning("payout_chunk_retried_per_payee", payees=len(chunk), exc_info=True)
            for payee_id in chunk:
                try:
                    await _make_payouts(new_uow, method_gateways, now, rules, [payee_id], friday, run)
                except Exception:
                    # It shows in the log and its rewards stay approved for the next run.
                    log.exception("payout_not_made", payee_id=payee_id)
        else:
            run.created += made.created
            run.held_back += made.held_back


async def _make_payouts(
    new_uow: UnitOfWorkFactory,
    method_gateways: Mapping[str, str],
    now: datetime,
    rules: ReferralRules,
    payee_ids: list[str],
    friday: bool,
    run: PayoutRun,
) -> None:
    """The payouts of ``payee_ids`` for ``now``, in one transaction of a constant number of
    statements (``run`` hears of them once committed)."""
    async with new_uow() as uow:
        payables = await uow.referrals.payable(payee_ids)
        payees = await uow.referrals.referrer_rows(p.payee_id for p in payables)
        day = rules.calendar.same_day_period(now)
        numbers = await uow.referrals.last_period_numbers(sorted(p for p, row in payees.items() if row.same_day), day)
        planned, held_back = [], []
        for payable in payables:
            payee = payees.get(payable.payee_id)
            if payee is None or not (payee.same_day or friday):
                continue
            if payee.same_day:
                # Paid the day each reward is approved: a later approval the same day is that day's next payout.
                period, minimum = f"{day}-{numbers.get(payable.payee_id, 0) + 1}", 1
            else:
                period, minimum = rules.calendar.weekly_period(now), rules.minimum_payout_cents
            if payable.total_cents < minimum:
                held_back.append(
                    {
                        "payee_id": payable.payee_id,
                        "total_cents": payable.total_cents,
                        "minimum_cents": minimum,
                        "period": period,
                    }
                )
            else:
                planned.append(
                    NewPayout(payable, period, payee.payout_method, method_gateways.get(payee.payout_method, "manual"))
                )
        made = await uow.referrals.create_payouts(planned, rules.currency, now)
        # A payee missing from ``made`` has this period's payout already (a rerun): what came since waits for the next period.
        planned = [new for new in planned if new.payable.payee_id in made]
        await uow.referrals.save_many(
            [
                pair
                for new in planned
                for pair in _moved(new.payable.rewards, lambda r: r.into_payout(made[r.referrer_id], now))
            ]
        )
        await uow.commit()
    # Told only once committed: a chunk rolled back made nothing. One line per chunk, not per
    # payout (a Friday makes 100,000): each payout is in the table, GET /api/admin/payouts.
    ids = [made[new.payable.payee_id] for new in planned]
    if ids:
        log.info(
            "payouts_created",
            count=len(ids),
            first_id=min(ids),
            last_id=max(ids),
            amount_cents=sum(new.payable.total_cents for new in planned),
            periods=sorted({new.period for new in planned}),
        )
    if held_back:
        log.info("payouts_held_back", count=len(held_back), payees=held_back[:LOGGED_PAYEES])
    run.created += ids
    run.held_back += [held["payee_id"] for held in held_back]


def _moved(referrals: Iterable[Referral], change: Callable[[Referral], object]) -> list[tuple[Referral, list[Change]]]:
    """Apply a domain change to each referral; each with the history it added (for ``save_many``)."""
    changed = []
    for referral in referrals:
        before = len(referral.history)
        change(referral)
        changed.append((referral, referral.history[before:]))
    return changed


#: A run sending payouts holds them this long; another run takes them only after (a crash frees them).
SEND_LEASE = timedelta(minutes=10)
#: Payouts marked tried and leased together, before any of them is sent, and recorded together
#: after: what a crash can leave with its fate unknown (each is checked with the provider, by
#: its key, before it is ever sent again).
PAYOUTS_PER_LEASE = 100


async def send_payouts(
    new_uow: UnitOfWorkFactory,
    gateways: Mapping[str, PayoutGateway],
    wall_clock: Callable[[], datetime],
    run: PayoutRun,
) -> None:
    """Send every payout waiting (new or failed), each once per run, ``PAYOUTS_PER_LEASE`` at a time.

    Each lease is committed (the payouts marked tried) before the gateway sees any of them, and
    its outcomes are recorded in the transaction that takes the next lease. A crash in between
    leaves at most one lease of payouts tried but not recorded; the next run sends them with
    ``attempts`` > 0, and the gateway checks with the provider first (Stripe: the payout's
    transfer group). docs/REFERRALS.md, "A crash while sending"."""
    started = wall_clock()
    after = None
    leased: list[tuple[object, PayoutOrder]] = []
    outcomes: list[SendOutcome] = []
    while True:
        now = wall_clock()
        async with new_uow() as uow:
            # The last lease's outcomes and the next lease commit together: one transaction per
            # lease, and still at most one lease tried and not recorded.
            await uow.referrals.record_sent(outcomes, now)
            await _rewards_paid(uow, [o.payout_id for o in outcomes if o.status == "paid"], now)
            # Each payout once per run, and not while another run holds its lease.
            rows = await uow.referrals.lease_payouts_to_send(
                PAYOUTS_PER_LEASE, now=now, until=now + SEND_LEASE, run_started=started, after=after
            )
            await uow.commit()
        if leased:
            _tell(run, [row for row, _ in leased], outcomes)
        if not rows:
            return
        after = (rows[-1].created_at, rows[-1].id)
        leased = [(row, _order(row)) for row in rows]
        outcomes = [await _send(gateways, row, order) for row, order in leased]


def _order(row) -> PayoutOrder:
    # After a failure, a fresh key: a provider may replay a saved error for a key (Stripe does, for a day).
    key = row.idempotency_key if row.failures == 0 else f"{row.idempotency_key}:retry-{row.failures}"
    return PayoutOrder(
        row.id,
        row.payee_id,
        row.amount_cents,
        row.currency,
        row.period,
        row.idempotency_key,
        key,
        row.attempts,
        row.stripe_account_id,
        row.payout_address,
    )


async def _send(gateways: Mapping[str, PayoutGateway], row, order: PayoutOrder) -> SendOutcome:
    gateway = gateways.get(row.gateway)
    try:
        if gateway is None:
            raise PayoutFailed(f"no {row.gateway} gateway is configured")
        sent = await gateway.send(order)
    except Exception as error:  # PayoutFailed, or anything unexpected: recorded, visible, retried
        if not isinstance(error, PayoutFailed):
            log.exception("payout_gateway_error", payout_id=row.id)
        return SendOutcome(row.id, "failed", error=str(error)[:2000])
    return SendOutcome(row.id, sent.status, reference=sent.reference)


def _tell(run: PayoutRun, rows: list, outcomes: list[SendOutcome]) -> None:
    """A lease's outcomes, once recorded: a line per failure, one for the rest of the lease."""
    sent: dict[str, int] = {}
    for row, outcome in zip(rows, outcomes, strict=True):
        if outcome.status == "failed":
            run.failed.append(row.id)
            log.warning("payout_failed", payout_id=row.id, payee_id=row.payee_id, error=outcome.error)
        else:
            sent[outcome.status] = sent.get(outcome.status, 0) + 1
            run.sent[outcome.status] = run.sent.get(outcome.status, 0) + 1
    log.info(
        "payouts_sent",
        leased=len(rows),
        first_id=rows[0].id,
        last_id=rows[-1].id,
        sent=sent,
        failed=len(rows) - sum(sent.values()),
    )


async def record_paid(new_uow: UnitOfWorkFactory, payout_id: int, reference: str | None, at: datetime) -> bool:
    """Mark a payout paid by operations, with the external reference, and its rewards."""
    async with new_uow() as uow:
        row = await uow.referrals.payout(payout_id)
        if row is None or row.status == "paid":
            return False
        await uow.referrals.record_sent([SendOutcome(payout_id, "paid", reference=reference)], at)
        await _rewards_paid(uow, [payout_id], at)
        await uow.commit()
    return True


async def _rewards_paid(uow: UnitOfWork, payout_ids: list[int], at: datetime) -> None:
    """The rewards of payouts just paid become paid: three statements however many."""
    rewards = await uow.referrals.referrals_in_payouts(payout_ids)
    await uow.referrals.save_many(_moved(rewards, lambda r: r.paid(at)))
