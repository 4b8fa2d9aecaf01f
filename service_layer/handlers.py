"""Use cases. Each opens one unit of work, calls the domain, and commits.

Event handlers run inside the same transaction that records the event as processed, so
an event's effect and its idempotency record commit together or not at all.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

import uuid

import structlog

from domain import Account, CreditPolicy, Hold, UnknownCustomer
from domain import notifications as notices
from domain.dunning import AttemptKind, DunningCase, DunningRules
from domain.referrals import ReferralRules
from domain.model import CreditView
from messages import (
    CreditsAdjusted,
    CreditsGifted,
    CustomerSignedUp,
    Event,
    InvoiceVoided,
    JobCancelled,
    JobCompleted,
    MembershipFrozen,
    MembershipUnfrozen,
    PaymentActionRequired,
    PaymentFailed,
    PaymentMethodUpdated,
    PaymentReversed,
    PaymentSucceeded,
    ReferralSubmitted,
)
from service_layer import referrals
from service_layer.errors import CustomerNotFound, NothingOwed, RetryLimited
from service_layer.unit_of_work import UnitOfWork

UnitOfWorkFactory = Callable[[], UnitOfWork]
log = structlog.get_logger("credits.handlers")


class Outcome(StrEnum):
    APPLIED = "applied"
    #: This event id was applied before: nothing done.
    DUPLICATE = "duplicate"
    #: A new event that changes nothing: a payment already issued, a failure reported after
    #: the invoice was paid, a payment-method update with nothing owed. Recorded, not applied.
    IGNORED = "ignored"


@dataclass
class Context:
    """What an event handler works with: the locked account, its unit of work, the rules."""

    uow: UnitOfWork
    account: Account
    policy: CreditPolicy
    dunning: DunningRules
    referrals: ReferralRules
    #: Other accounts the event touches (a gift's receiver), locked like ``account``.
    others: dict[str, Account] = field(default_factory=dict)


async def _job_completed(ctx: Context, event: JobCompleted) -> bool:
    ctx.account.complete_job(event.job_id, event.credits, event.occurred_at, event.event_id)
    return True


async def _job_cancelled(ctx: Context, event: JobCancelled) -> bool:
    ctx.account.release_hold(event.job_id, event.occurred_at, event.event_id)
    return True


async def _payment_succeeded(ctx: Context, event: PaymentSucceeded) -> bool:
    """Issue the payment's credits once, and end the dunning of its invoice."""
    issued = ctx.account.payment_lot(event.payment_id) is None
    if issued:
        ctx.account.issue(
            event.credits, event.occurred_at, event.event_id, ctx.policy, note=f"payment {event.payment_id}", payment_id=event.payment_id, paid_cents=event.amount_cents
        )
    case = await ctx.uow.dunning.get(event.payment_id)
    recovered = case is not None and case.paid(event.occurred_at)
    if recovered:
        await ctx.uow.dunning.save(case)
    if issued:
        await referrals.payment_succeeded(ctx.uow, event.customer_id, event.payment_id, event.occurred_at, ctx.referrals, event.amount_cents)
    return issued or recovered


async def _credits_adjusted(ctx: Context, event: CreditsAdjusted) -> bool:
    ctx.account.adjust(event.credits, event.occurred_at, event.event_id, ctx.policy, note=f"{event.reason} (by {event.actor})")
    return True


async def _payment_failed(ctx: Context, event: PaymentFailed | PaymentActionRequired) -> bool:
    """Open the invoice's dunning case at its first failure; later reports update it."""
    if ctx.account.payment_lot(event.invoice_id) is not None:
        return False  # already paid: a late failure report never reopens it
    case = await ctx.uow.dunning.get(event.invoice_id)
    is_new = case is None
    if is_new:
        case = DunningCase.open(event.customer_id, event.invoice_id, event.occurred_at, ctx.dunning.schedule)
    case.hosted_invoice_url = event.hosted_invoice_url or case.hosted_invoice_url
    case.subscription_id = event.subscription_id or case.subscription_id
    if isinstance(event, PaymentActionRequired):
        case.action_required(event.occurred_at)
    else:
        case.payment_failed(event.occurred_at, event.decline_code, event.failure_message, ctx.dunning.schedule)
    await (ctx.uow.dunning.add(case) if is_new else ctx.uow.dunning.save(case))
    if case.owes:  # once per invoice (the key), whichever report came first
        reason = case.last_failure_message or case.last_decline_code
        await ctx.uow.notifications.enqueue(notices.payment_failed(event.customer_id, event.invoice_id, reason, case.next_retry_at), event.occurred_at)
    return True


async def _payment_method_updated(ctx: Context, event: PaymentMethodUpdated) -> bool:
    """Charge every unpaid invoice at once with the new method (without using up a scheduled retry)."""
    try:
        requested = await request_immediate_charges(
            ctx.uow, event.customer_id, AttemptKind.PAYMENT_METHOD, event.occurred_at, ctx.dunning, payment_method_id=event.payment_method_id
        )
    except NothingOwed as reason:
        log.info("payment_method_update_charges_nothing", reason=str(reason))
        return False
    return bool(requested)


async def _invoice_voided(ctx: Context, event: InvoiceVoided) -> bool:
    case = await ctx.uow.dunning.get(event.invoice_id)
    if case is None or not case.owes:
        return False
    case.close(event.occurred_at, f"invoice {event.reason} at the provider")
    await ctx.uow.dunning.save(case)
    return True


async def _payment_reversed(ctx: Context, event: PaymentReversed) -> bool:
    note = f"payment {event.payment_id} {'refunded' if event.reason == 'refund' else 'disputed'}"
    entry = ctx.account.reverse_payment(event.payment_id, event.total_credits_reversed, event.occurred_at, event.event_id, note)
    await referrals.payment_reversed(ctx.uow, event.payment_id, "refunded" if event.reason == "refund" else "disputed", event.occurred_at)
    return entry is not None


async def _membership_frozen(ctx: Context, event: MembershipFrozen) -> bool:
    return ctx.account.freeze(event.occurred_at, event.event_id)


async def _membership_unfrozen(ctx: Context, event: MembershipUnfrozen) -> bool:
    # The account changes either way (a pause ends, or an early unfreeze is remembered).
    return ctx.account.unfreeze(event.occurred_at, event.event_id) is not None


async def _credits_gifted(ctx: Context, event: CreditsGifted) -> bool:
    receiver = ctx.others[event.to_customer_id]
    ctx.account.give(event.credits, receiver, event.occurred_at, event.event_id)
    return True


async def _customer_signed_up(ctx: Context, event: CustomerSignedUp) -> bool:
    await referrals.customer_signed_up(ctx.uow, event, ctx.referrals)
    return True


async def _referral_submitted(ctx: Context, event: ReferralSubmitted) -> bool:
    await referrals.submit_referral(ctx.uow, event.referred_customer_id, event.referral_code, event.occurred_at, ctx.referrals)
    return True


EVENT_HANDLERS: dict[type[Event], Callable[[Context, Event], Awaitable[bool]]] = {
    JobCompleted: _job_completed,
    JobCancelled: _job_cancelled,
    PaymentSucceeded: _payment_succeeded,
    CreditsAdjusted: _credits_adjusted,
    PaymentFailed: _payment_failed,
    PaymentActionRequired: _payment_failed,
    PaymentMethodUpdated: _payment_method_updated,
    PaymentReversed: _payment_reversed,
    InvoiceVoided: _invoice_voided,
    CustomerSignedUp: _customer_signed_up,
    ReferralSubmitted: _referral_submitted,
    MembershipFrozen: _membership_frozen,
    MembershipUnfrozen: _membership_unfrozen,
    CreditsGifted: _credits_gifted,
}


def _payment_ids(event: Event) -> tuple[str, ...]:
    """Payments whose lots the handler decides on (loaded even when spent)."""
    if isinstance(event, (PaymentSucceeded, PaymentReversed)):
        return (event.payment_id,)
    if isinstance(event, (PaymentFailed, PaymentActionRequired)):
        return (event.invoice_id,)
    return ()


async def apply_event(
    event: Event, uow: UnitOfWork, policy: CreditPolicy, dunning: DunningRules = DunningRules(), referral_rules: ReferralRules | None = None
) -> Outcome:
    """Apply one event exactly once. Raises EventConflict or a DomainError to refuse it."""
    async with uow:
        outcome = await apply_event_in(uow, event, policy, dunning, referral_rules)
        await uow.commit()
    return outcome


async def apply_event_in(
    uow: UnitOfWork, event: Event, policy: CreditPolicy, dunning: DunningRules, referral_rules: ReferralRules | None = None
) -> Outcome:
    """Apply one event inside an open unit of work (the caller commits): effect and idempotency record together."""
    job_ids = (event.job_id,) if isinstance(event, JobCompleted) else ()
    # Every account the event touches, locked in id order (two gifts crossing never deadlock).
    others = (event.to_customer_id,) if isinstance(event, CreditsGifted) else ()
    accounts: dict[str, Account] = {}
    for customer_id in sorted({event.customer_id, *others}):
        mine = customer_id == event.customer_id
        locked = await uow.accounts.lock(
            customer_id, create=mine, job_ids=job_ids if mine else (), payment_ids=_payment_ids(event) if mine else ()
        )
        if locked is None:
            # A gift to a customer we do not know (a typo) must not create an account holding it.
            raise UnknownCustomer(f"customer {customer_id!r} does not exist: credits go only to known customers")
        accounts[customer_id] = locked
    account = accounts[event.customer_id]
    if not await uow.events.claim(event):
        return Outcome.DUPLICATE
    depleted_before = {customer_id: a.depleted_at for customer_id, a in accounts.items()}
    context = Context(uow, account, policy, dunning, referral_rules or ReferralRules(), {k: v for k, v in accounts.items() if k != event.customer_id})
    changed = await EVENT_HANDLERS[type(event)](context, event)
    for a in accounts.values():
        await notify_depletion_change(uow, a, depleted_before[a.customer_id], event.occurred_at)
    await uow.accounts.save_many(list(accounts.values()))
    return Outcome.APPLIED if changed else Outcome.IGNORED


#: Events whose effect stays on their own account: several can share one transaction.
BATCHABLE_EVENTS = (JobCompleted, JobCancelled, CreditsAdjusted)


#: How long a batch waits for a lock before it splits into single events.
BATCH_LOCK_WAIT = timedelta(seconds=1)


class BatchNotApplicable(Exception):
    """A batched event was seen before (a duplicate or a reused id): apply them one at a time."""


async def apply_events(
    events: Sequence[Event], uow: UnitOfWork, policy: CreditPolicy, dunning: DunningRules = DunningRules(), referral_rules: ReferralRules | None = None
) -> list[Outcome]:
    """Apply new events of the batchable kinds in one transaction, in order: all of them or none.

    A group commit: the same effects, entries and idempotency records as ``apply_event`` on
    each in turn, for a constant number of statements. Raises BatchNotApplicable if one was
    seen before, and whatever one of them raises; either way nothing is written, and the
    caller applies them one by one, which settles each on its own.
    """
    if not all(isinstance(event, BATCHABLE_EVENTS) for event in events):
        raise ValueError(f"only {[kind.__name__ for kind in BATCHABLE_EVENTS]} share a transaction")
    job_ids: dict[str, list[str]] = defaultdict(list)
    for event in events:
        if isinstance(event, JobCompleted):
            job_ids[event.customer_id].append(event.job_id)
    async with uow:
        # A batch waits only briefly for a customer another transaction holds: meanwhile it
        # holds the others' locks. Past that it fails, and its events go one at a time.
        locked = await uow.accounts.lock_many([event.customer_id for event in events], job_ids, wait_at_most=BATCH_LOCK_WAIT)
        accounts = {a.customer_id: a for a in locked}
        if len(await uow.events.claim_new(events)) != len(events):
            raise BatchNotApplicable("an event of the batch was seen before")
        referral_rules = referral_rules or ReferralRules()
        outcomes, owed = [], []
        for event in events:
            account = accounts[event.customer_id]
            depleted_before = account.depleted_at
            changed = await EVENT_HANDLERS[type(event)](Context(uow, account, policy, dunning, referral_rules), event)
            owed.append((depletion_notice(account, depleted_before, event.occurred_at), event.occurred_at))
            outcomes.append(Outcome.APPLIED if changed else Outcome.IGNORED)
        await uow.notifications.enqueue_many([(notice, at) for notice, at in owed if notice is not None])
        await uow.accounts.save_many(list(accounts.values()))
        await uow.commit()
    return outcomes


async def notify_depletion_change(uow: UnitOfWork, account: Account, depleted_before: datetime | None, at: datetime) -> None:
    """Tell the customer when their credits ran out, and when they came back."""
    notice = depletion_notice(account, depleted_before, at)
    if notice is not None:
        await uow.notifications.enqueue(notice, at)


def depletion_notice(account: Account, depleted_before: datetime | None, at: datetime) -> notices.Notice | None:
    """The notice owed when the account ran out of credits, or got them back, since ``depleted_before``."""
    if depleted_before is None and account.depleted_at is not None:
        return notices.credits_depleted(account.customer_id, account.depleted_at)
    if depleted_before is not None and account.depleted_at is None:
        return notices.credits_restored(account.customer_id, depleted_before, at, account.balance(at))
    return None


async def request_immediate_charges(
    uow: UnitOfWork, customer_id: str, kind: AttemptKind, now: datetime, rules: DunningRules, payment_method_id: str | None = None
) -> list[int]:
    """Ask for an immediate charge of each unpaid invoice of the customer (caller holds the account lock).

    Raises NothingOwed; and RetryLimited when the customer has charged at once too often
    lately — except for a new payment method, whose charge then waits for its turn instead
    of being dropped (nothing else would charge a hard-declined invoice).
    """
    cases = [case for case in await uow.dunning.cases_of(customer_id, for_update=True) if case.owes]
    if not cases:
        raise NothingOwed(customer_id)
    # One press charges every unpaid invoice: the limit counts presses, not invoices.
    presses = sorted(set(await uow.dunning.immediate_attempt_times(customer_id, now - rules.retry_now.window)))
    wait = rules.retry_now.retry_after(presses, now)
    if wait is not None and kind is not AttemptKind.PAYMENT_METHOD:
        raise RetryLimited(customer_id, wait)
    not_before = now + wait if wait is not None else None
    requested = [await uow.dunning.add_attempt(case, kind, now, payment_method_id=payment_method_id, not_before=not_before) for case in cases]
    return [attempt_id for attempt_id in requested if attempt_id is not None]


async def place_hold(
    uow: UnitOfWork, policy: CreditPolicy, customer_id: str, job_id: str, credits: int, now: datetime
) -> tuple[Hold, bool]:
    """Book a job: reserve its credits, or raise InsufficientCredits (the front end's 409).

    Returns the hold and whether it is new (placing the same hold again is harmless).
    """
    async with uow:
        account = await _locked(uow, customer_id, job_ids=(job_id,))
        depleted_before = account.depleted_at
        hold = account.place_hold(job_id, credits, now, f"hold:{customer_id}:{job_id}", policy)
        created = hold.id is None
        await notify_depletion_change(uow, account, depleted_before, now)
        await uow.accounts.save(account)
        await uow.commit()
    return hold, created


async def release_hold(uow: UnitOfWork, customer_id: str, job_id: str, now: datetime) -> bool:
    """Release a booked job's hold. Returns whether an active hold was released."""
    async with uow:
        account = await _locked(uow, customer_id)
        depleted_before = account.depleted_at
        released = account.release_hold(job_id, now, f"release:{customer_id}:{job_id}")
        await notify_depletion_change(uow, account, depleted_before, now)
        await uow.accounts.save(account)
        await uow.commit()
    return released


async def credit_view(uow: UnitOfWork, customer_id: str, now: datetime) -> CreditView:
    """The customer's credits as of ``now``, due expiries applied in memory, nothing written."""
    async with uow:
        account = await uow.accounts.get(customer_id)
        if account is None:
            raise CustomerNotFound(customer_id)
        return account.view(now)


@dataclass(frozen=True)
class SweepResult:
    customers: int
    entries: int
    #: True when the sweep stopped at its batch budget with work left.
    more: bool = False


async def expire_due_credits(new_uow: UnitOfWorkFactory, now: datetime, batch_size: int, max_batches: int | None = None) -> SweepResult:
    """Write expiry entries for every lot past its expiry, a batch of customers per transaction."""
    return await _sweep(new_uow, now, max_batches, lambda uow, busy: uow.accounts.customers_with_due_lots(now, batch_size, exclude=busy))


async def lapse_due_holds(new_uow: UnitOfWorkFactory, now: datetime, batch_size: int, max_batches: int | None = None) -> SweepResult:
    """Lapse every hold not captured within its time to live."""
    return await _sweep(new_uow, now, max_batches, lambda uow, busy: uow.accounts.customers_with_due_holds(now, batch_size, exclude=busy))


async def _sweep(
    new_uow: UnitOfWorkFactory,
    now: datetime,
    max_batches: int | None,
    find_due: Callable[[UnitOfWork, set[str]], Awaitable[list[str]]],
) -> SweepResult:
    # Lots never enter memory beyond one batch of customers; each batch commits on its own,
    # so a crash loses at most the batch in flight, which the next run redoes. Customers
    # another transaction holds are passed over for this run, not waited for: their own
    # event catches them up, and the next run sweeps them.
    event_id = f"sweep:{now.isoformat()}"
    busy: set[str] = set()
    customers = entries = batches = 0
    while max_batches is None or batches < max_batches:
        async with new_uow() as uow:
            due = await find_due(uow, busy)
            if not due:
                return SweepResult(customers, entries)
            accounts = await uow.accounts.lock_available(due)
            busy.update(set(due) - {account.customer_id for account in accounts})
            owed = []
            for account in accounts:
                depleted_before = account.depleted_at
                account.catch_up(now, event_id)
                entries += len(account.new_entries)
                owed.append((depletion_notice(account, depleted_before, now), now))
            await uow.notifications.enqueue_many([(notice, at) for notice, at in owed if notice is not None])
            await uow.accounts.save_many(accounts)
            await uow.commit()
            customers += len(accounts)
            batches += 1
    return SweepResult(customers, entries, more=True)


async def _locked(uow: UnitOfWork, customer_id: str, job_ids: tuple[str, ...] = ()) -> Account:
    account = await uow.accounts.lock(customer_id, create=False, job_ids=job_ids)
    if account is None:
        raise CustomerNotFound(customer_id)
    return account


async def admin_adjustment(
    uow: UnitOfWork, policy: CreditPolicy, customer_id: str, credits: int, reason: str, admin: str, now: datetime, idempotency_key: str | None = None
) -> Outcome:
    """An admin's correction with a reason, applied like any event and shown in the ledger.

    ``idempotency_key`` (one per form or API call, kept across retries) makes a double click
    or a retried request apply once (the repeat answers ``duplicate``, whatever it carried).
    Raises CustomerNotFound for an unknown customer (an adjustment never creates one).
    """
    event_id = f"admin-adjustment:{idempotency_key or uuid.uuid4()}"
    event = CreditsAdjusted(event_id=event_id, occurred_at=now, customer_id=customer_id, credits=credits, reason=reason, actor=admin)
    return await apply_admin_event(uow, policy, event)


async def apply_admin_event(uow: UnitOfWork, policy: CreditPolicy, event: Event) -> Outcome:
    """Apply an event an admin made (its id carries the form's key) to an existing customer, once.

    Raises CustomerNotFound for an unknown customer (an admin's action never creates one), and
    what the domain refuses (a gift over what is available, to or from a frozen membership)."""
    async with uow:
        # Under the customer's lock: a second request with the same key waits for the first,
        # then sees it (its moment differs, so it is recognised by key, not by content).
        if await uow.accounts.lock(event.customer_id, create=False) is None:
            raise CustomerNotFound(event.customer_id)
        if await uow.events.seen(event.event_id):
            return Outcome.DUPLICATE
        outcome = await apply_event_in(uow, event, policy, DunningRules())
        await uow.commit()
    return outcome
