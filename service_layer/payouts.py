"""Paying referral rewards: the hold ends, payouts are snapshotted per payee and period, then sent.

A payout is one row per (payee, period) — ``week-<Friday>`` or, for same-day payees,
``day-<date>`` — made in the same transaction that moves its rewards to ``in_payout``.
Sending is a separate step with the payout's own idempotency key, so a run that crashed
midway, or a second run, finds the payout and never pays it twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Protocol

import structlog

from domain.referrals import ReferralRules
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
    wall_clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
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


async def release_rewards(new_uow: UnitOfWorkFactory, now: datetime, batch: int = 500) -> int:
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


#: Payees whose payouts are made in one transaction; a chunk that fails is made again one
#: payee at a time, so one payee's trouble never holds up the others.
PAYEES_PER_TRANSACTION = 200


async def make_payouts(new_uow: UnitOfWorkFactory, method_gateways: Mapping[str, str], now: datetime, rules: ReferralRules, run: PayoutRun) -> None:
    friday = rules.calendar.is_payout_day(now)
    async with new_uow() as uow:
        payables = await uow.referrals.payable()
        await uow.commit()
    payee_ids = [payable.payee_id for payable in payables]
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
    new_uow: UnitOfWorkFactory, method_gateways: Mapping[str, str], now: datetime, rules: ReferralRules, payee_ids: list[str], friday: bool, run: PayoutRun
) -> None:
    """The payouts of ``payee_ids`` for ``now``, in one transaction (``run`` hears of them once committed)."""
    calendar = rules.calendar
    created, held_back = [], []
    async with new_uow() as uow:
        changed = []
        for payable in await uow.referrals.payable(payee_ids):
            payee = await uow.referrals.referrer_row(payable.payee_id)
            if payee is None:
                continue
            if payee.same_day:
                # Paid the day each reward is approved: a later approval the same day is that day's next payout.
                day = calendar.same_day_period(now)
                period, minimum = f"{day}-{await uow.referrals.last_period_number(payable.payee_id, day) + 1}", 1
            elif friday:
                period, minimum = calendar.weekly_period(now), rules.minimum_payout_cents
            else:
                continue
            if payable.total_cents < minimum:
                held_back.append({"payee_id": payable.payee_id, "total_cents": payable.total_cents, "minimum_cents": minimum, "period": period})
                continue
            gateway = method_gateways.get(payee.payout_method, "manual")
            payout_id = await uow.referrals.create_payout(payable, period, payee.payout_method, gateway, rules.currency, now)
            if payout_id is None:
                continue  # this period's payout exists (a rerun): what came since waits for the next period
            for referral in await uow.referrals.referrals_in_payout(payout_id):
                before = len(referral.history)
                referral.into_payout(payout_id, now)
                changed.append((referral, referral.history[before:]))
            created.append({"payout_id": payout_id, "payee_id": payable.payee_id, "period": period, "amount_cents": payable.total_cents, "gateway": gateway})
        await uow.referrals.save_many(changed)
        await uow.commit()
    # Told only once committed: a chunk rolled back made nothing.
    for payout in created:
        log.info("payout_created", **payout)
        run.created.append(payout["payout_id"])
    for held in held_back:
        log.info("payout_held_back", **held)
        run.held_back.append(held["payee_id"])


#: A run sending a payout holds it this long; another run takes it only after (a crash frees it).
SEND_LEASE = timedelta(minutes=10)


async def send_payouts(
    new_uow: UnitOfWorkFactory, gateways: Mapping[str, PayoutGateway], wall_clock: Callable[[], datetime], run: PayoutRun, payout_ids: list[int] | None = None
) -> None:
    """Send every payout waiting (new or failed), each once per run, one at a time under its lease."""
    started = wall_clock()
    after = None
    while True:
        now = wall_clock()
        async with new_uow() as uow:
            # Each payout once per run, and not while another run holds its lease.
            rows = await uow.referrals.lock_payouts_to_send(1, payout_ids, now=now, run_started=started, after=after)
            if not rows:
                return
            [row] = rows
            after = (row.created_at, row.id)
            # Marked tried in its own transaction first: a crash while sending is seen by the
            # next run, whose gateway then checks with the provider before paying again.
            await uow.referrals.set_payout(row.id, attempts=row.attempts + 1, last_tried_at=now, leased_until=now + SEND_LEASE)
            payee = await uow.referrals.referrer_row(row.payee_id)
            await uow.commit()
        key = row.idempotency_key if row.failures == 0 else f"{row.idempotency_key}:retry-{row.failures}"
        order = PayoutOrder(
            row.id, row.payee_id, row.amount_cents, row.currency, row.period, row.idempotency_key, key, row.attempts,
            payee.stripe_account_id if payee else None, payee.payout_address if payee else None,
        )
        gateway = gateways.get(row.gateway)
        try:
            if gateway is None:
                raise PayoutFailed(f"no {row.gateway} gateway is configured")
            sent = await gateway.send(order)
        except Exception as error:  # PayoutFailed, or anything unexpected: recorded, visible, retried
            if not isinstance(error, PayoutFailed):
                log.exception("payout_gateway_error", payout_id=row.id)
            async with new_uow() as uow:
                await uow.referrals.set_payout(row.id, status="failed", last_error=str(error)[:2000], failures=row.failures + 1, leased_until=None)
                await uow.commit()
            run.failed.append(row.id)
            log.warning("payout_failed", payout_id=row.id, payee_id=row.payee_id, error=str(error))
            continue
        if sent.status == "paid":
            await record_paid(new_uow, row.id, sent.reference, now)
        else:
            async with new_uow() as uow:
                await uow.referrals.set_payout(row.id, status="exported", last_error=None, leased_until=None)
                await uow.commit()
        run.sent[sent.status] = run.sent.get(sent.status, 0) + 1
        log.info("payout_" + sent.status, payout_id=row.id, payee_id=row.payee_id, reference=sent.reference, amount_cents=row.amount_cents)


async def record_paid(new_uow: UnitOfWorkFactory, payout_id: int, reference: str | None, at: datetime) -> bool:
    """Mark a payout paid (by the gateway, or by operations with the external reference), and its rewards."""
    async with new_uow() as uow:
        row = await uow.referrals.payout(payout_id)
        if row is None or row.status == "paid":
            return False
        await uow.referrals.set_payout(payout_id, status="paid", paid_at=at, external_reference=reference, last_error=None, leased_until=None)
        changed = []
        for referral in await uow.referrals.referrals_in_payout(payout_id):
            before = len(referral.history)
            referral.paid(at)
            changed.append((referral, referral.history[before:]))
        await uow.referrals.save_many(changed)
        await uow.commit()
    return True
