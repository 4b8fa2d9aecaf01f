"""Applying events: one handler per kind, registered with what it needs locked and loaded.

Every event goes through ``apply_in``: a single event is a batch of one, a batch is several
in one transaction (all of them or none), and a batch that cannot be applied whole is
applied again one event at a time by the caller, through the same function. An event's
effect and its idempotency record commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

import structlog

from domain import Account, CreditPolicy, UnknownCustomer
from domain import notifications as notices
from domain.dunning import AttemptKind, DunningCase, DunningRules
from domain.referrals import ReferralRules
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
from service_layer import payments, referrals
from service_layer.apply import Outcome, Owed, Rules, Step, settle
from service_layer.errors import CustomerNotFound, NothingOwed
from service_layer.ports import UnitOfWork

log = structlog.get_logger("credits.handlers")

#: The dunning rules when a caller gives none (frozen: one instance serves every call).
DEFAULT_DUNNING = DunningRules()

#: How long a batch waits for a lock before it splits into single events.
BATCH_LOCK_WAIT = timedelta(seconds=1)


class BatchNotApplicable(Exception):
    """A batched event was seen before (a duplicate or a reused id), or the batch cannot tell
    what one at a time would: apply them one at a time."""


@dataclass(frozen=True)
class Needs:
    """What an event needs locked and loaded besides its own customer's account."""

    #: Other customers it touches, who must exist already (a gift's receiver).
    customers: tuple[str, ...] = ()
    #: Jobs of its customer whose earlier charge must be known.
    job_ids: tuple[str, ...] = ()
    #: Payments of its customer whose lots are loaded even when spent.
    payment_ids: tuple[str, ...] = ()


@dataclass
class Context:
    """What a handler works with: the locked accounts, the unit of work, the rules."""

    uow: UnitOfWork
    accounts: dict[str, Account]
    rules: Rules
    customer_id: str
    #: Notices to queue, in order, with the depletion notices (one statement at the end).
    owed: Owed = field(default_factory=list)

    @property
    def account(self) -> Account:
        return self.accounts[self.customer_id]


Apply = Callable[[Context, Event], Awaitable[bool]]


@dataclass(frozen=True)
class Handler:
    apply: Apply
    needs: Callable[[Event], Needs]
    #: Why this kind never shares a transaction (None: it may be batched).
    alone: str | None = None


HANDLERS: dict[type[Event], Handler] = {}


def handles(
    *kinds: type[Event], needs: Callable[[Event], Needs] = lambda event: Needs(), alone: str | None = None
) -> Callable[[Apply], Apply]:
    """Register a handler for ``kinds``, with what each event of them needs locked and loaded."""

    def register(apply: Apply) -> Apply:
        for kind in kinds:
            HANDLERS[kind] = Handler(apply, needs, alone)
        return apply

    return register


def batchable(event: Event) -> bool:
    return HANDLERS[type(event)].alone is None


# ----------------------------------------------------------------------- the handlers


@handles(JobCompleted, needs=lambda event: Needs(job_ids=(event.job_id,)))
async def _job_completed(ctx: Context, event: JobCompleted) -> bool:
    ctx.account.complete_job(event.job_id, event.credits, event.occurred_at, event.event_id)
    return True


@handles(JobCancelled)
async def _job_cancelled(ctx: Context, event: JobCancelled) -> bool:
    ctx.account.release_hold(event.job_id, event.occurred_at, event.event_id)
    return True


#: Dunning cases and referrals are locked in the order events come, not by id: two batches
#: holding several could deadlock each other, and the deadlock would split both batches.
TOUCHES_PAYMENT_ROWS = "it locks dunning cases or referral rows, in event order rather than id order"


@handles(PaymentSucceeded, needs=lambda event: Needs(payment_ids=(event.payment_id,)), alone=TOUCHES_PAYMENT_ROWS)
async def _payment_succeeded(ctx: Context, event: PaymentSucceeded) -> bool:
    """Issue the payment's credits once, and end the dunning of its invoice."""
    issued = ctx.account.payment_lot(event.payment_id) is None
    if issued:
        ctx.account.issue(
            event.credits,
            event.occurred_at,
            event.event_id,
            ctx.rules.policy,
            note=f"payment {event.payment_id}",
            payment_id=event.payment_id,
            paid_cents=event.amount_cents,
        )
    case = await ctx.uow.dunning.get(event.payment_id)
    recovered = case is not None and case.paid(event.occurred_at)
    if recovered:
        await ctx.uow.dunning.save(case)
    if issued:
        await referrals.payment_succeeded(
            ctx.uow, event.customer_id, event.payment_id, event.occurred_at, ctx.rules.referrals, event.amount_cents
        )
    return issued or recovered


@handles(CreditsAdjusted)
async def _credits_adjusted(ctx: Context, event: CreditsAdjusted) -> bool:
    ctx.account.adjust(
        event.credits, event.occurred_at, event.event_id, ctx.rules.policy, note=f"{event.reason} (by {event.actor})"
    )
    return True


@handles(
    PaymentFailed,
    PaymentActionRequired,
    needs=lambda event: Needs(payment_ids=(event.invoice_id,)),
    alone=TOUCHES_PAYMENT_ROWS,
)
async def _payment_failed(ctx: Context, event: PaymentFailed | PaymentActionRequired) -> bool:
    """Open the invoice's dunning case at its first failure; later reports update it."""
    if ctx.account.payment_lot(event.invoice_id) is not None:
        return False  # already paid: a late failure report never reopens it
    case = await ctx.uow.dunning.get(event.invoice_id)
    is_new = case is None
    if is_new:
        case = DunningCase.open(event.customer_id, event.invoice_id, event.occurred_at, ctx.rules.dunning.schedule)
    case.hosted_invoice_url = event.hosted_invoice_url or case.hosted_invoice_url
    case.subscription_id = event.subscription_id or case.subscription_id
    if isinstance(event, PaymentActionRequired):
        case.action_required(event.occurred_at)
    else:
        case.payment_failed(event.occurred_at, event.decline_code, event.failure_message, ctx.rules.dunning.schedule)
    await (ctx.uow.dunning.add(case) if is_new else ctx.uow.dunning.save(case))
    if case.owes:  # once per invoice (the key), whichever report came first
        reason = case.last_failure_message or case.last_decline_code
        ctx.owed.append(
            (notices.payment_failed(event.customer_id, event.invoice_id, reason, case.next_retry_at), event.occurred_at)
        )
    return True


@handles(
    PaymentMethodUpdated,
    alone="the worker enqueues the charges its transaction requested once that transaction commits",
)
async def _payment_method_updated(ctx: Context, event: PaymentMethodUpdated) -> bool:
    """Charge every unpaid invoice at once with the new method (without using up a scheduled retry)."""
    try:
        requested = await payments.request_immediate_charges(
            ctx.uow,
            event.customer_id,
            AttemptKind.PAYMENT_METHOD,
            event.occurred_at,
            ctx.rules.dunning,
            payment_method_id=event.payment_method_id,
        )
    except NothingOwed as reason:
        log.info("payment_method_update_charges_nothing", reason=str(reason))
        return False
    return bool(requested)


@handles(InvoiceVoided, alone=TOUCHES_PAYMENT_ROWS)
async def _invoice_voided(ctx: Context, event: InvoiceVoided) -> bool:
    case = await ctx.uow.dunning.get(event.invoice_id)
    if case is None or not case.owes:
        return False
    case.close(event.occurred_at, f"invoice {event.reason} at the provider")
    await ctx.uow.dunning.save(case)
    return True


@handles(PaymentReversed, needs=lambda event: Needs(payment_ids=(event.payment_id,)), alone=TOUCHES_PAYMENT_ROWS)
async def _payment_reversed(ctx: Context, event: PaymentReversed) -> bool:
    note = f"payment {event.payment_id} {'refunded' if event.reason == 'refund' else 'disputed'}"
    entry = ctx.account.reverse_payment(
        event.payment_id, event.total_credits_reversed, event.occurred_at, event.event_id, note
    )
    await referrals.payment_reversed(
        ctx.uow, event.payment_id, "refunded" if event.reason == "refund" else "disputed", event.occurred_at
    )
    return entry is not None


@handles(MembershipFrozen)
async def _membership_frozen(ctx: Context, event: MembershipFrozen) -> bool:
    return ctx.account.freeze(event.occurred_at, event.event_id)


@handles(MembershipUnfrozen)
async def _membership_unfrozen(ctx: Context, event: MembershipUnfrozen) -> bool:
    # The account changes either way (a pause ends, or an early unfreeze is remembered).
    return ctx.account.unfreeze(event.occurred_at, event.event_id) is not None


@handles(CreditsGifted, needs=lambda event: Needs(customers=(event.to_customer_id,)))
async def _credits_gifted(ctx: Context, event: CreditsGifted) -> bool:
    ctx.account.give(event.credits, ctx.accounts[event.to_customer_id], event.occurred_at, event.event_id)
    return True


@handles(CustomerSignedUp, alone=TOUCHES_PAYMENT_ROWS)
async def _customer_signed_up(ctx: Context, event: CustomerSignedUp) -> bool:
    await referrals.customer_signed_up(ctx.uow, event, ctx.rules.referrals)
    return True


@handles(ReferralSubmitted, alone=TOUCHES_PAYMENT_ROWS)
async def _referral_submitted(ctx: Context, event: ReferralSubmitted) -> bool:
    await referrals.submit_referral(
        ctx.uow, event.referred_customer_id, event.referral_code, event.occurred_at, ctx.rules.referrals
    )
    return True


# ----------------------------------------------------------------------- the apply path

#: How an event id is claimed: returns False when the (single) event is a recognised repeat.
Claim = Callable[[UnitOfWork, Sequence[Event]], Awaitable[bool]]


async def claim_one(uow: UnitOfWork, events: Sequence[Event]) -> bool:
    """A single event: a repeat is a duplicate, a reused id with another payload an EventConflict."""
    [event] = events
    return await uow.events.claim(event)


async def claim_all(uow: UnitOfWork, events: Sequence[Event]) -> bool:
    """A batch: every event new, or BatchNotApplicable (one at a time settles each on its own)."""
    if len(await uow.events.claim_new(events)) != len(events):
        raise BatchNotApplicable("an event of the batch was seen before")
    return True


async def claim_by_key(uow: UnitOfWork, events: Sequence[Event]) -> bool:
    """An admin's action: its id carries the form's key; a repeat differs in its moment, so it
    is recognised by id alone (under the customer's lock, so a second request waits for the first)."""
    [event] = events
    return not await uow.events.seen(event.event_id) and await uow.events.claim(event)


@dataclass
class LockPlan:
    """Every account a list of events touches, and what to load with each."""

    customers: set[str] = field(default_factory=set)
    #: Those that may be created when missing (the others must exist already).
    create: set[str] = field(default_factory=set)
    #: Customers a gift goes to before a later event of the batch would create them: they are
    #: locked only if they exist already, as one at a time would find them.
    deferred: set[str] = field(default_factory=set)
    job_ids: dict[str, list[str]] = field(default_factory=dict)
    payment_ids: dict[str, list[str]] = field(default_factory=dict)


def plan_locks(events: Sequence[Event], create_own: bool) -> LockPlan:
    """What ``events`` need locked and loaded, from each handler's declaration."""
    plan = LockPlan()
    first_own: dict[str, int] = {}
    for position, event in enumerate(events):
        first_own.setdefault(event.customer_id, position)
    for position, event in enumerate(events):
        needs = HANDLERS[type(event)].needs(event)
        own = event.customer_id
        plan.customers.add(own)
        if create_own:
            plan.create.add(own)
        plan.job_ids.setdefault(own, []).extend(needs.job_ids)
        plan.payment_ids.setdefault(own, []).extend(needs.payment_ids)
        for other in needs.customers:
            if first_own.get(other, position) > position:
                plan.deferred.add(other)
            plan.customers.add(other)
    plan.create -= plan.deferred
    return plan


async def lock_for(
    uow: UnitOfWork, events: Sequence[Event], create_own: bool, wait_at_most: timedelta | None
) -> dict[str, Account]:
    """Lock (in id order) and load every account the events need; refuse a missing one."""
    plan = plan_locks(events, create_own)
    create = None if plan.customers <= plan.create else plan.create  # None: one statement creates or locks them all
    locked = await uow.accounts.lock_many(
        sorted(plan.customers), plan.job_ids, plan.payment_ids, wait_at_most=wait_at_most, create=create
    )
    accounts = {account.customer_id: account for account in locked}
    missing = plan.customers - accounts.keys()
    for event in events:
        if event.customer_id in missing - plan.deferred:
            raise CustomerNotFound(event.customer_id)
    if missing:
        # A gift to a customer we do not know (a typo) must not create an account holding it.
        raise UnknownCustomer(f"customer {min(missing)!r} does not exist: credits go only to known customers")
    return accounts


async def apply_in(
    uow: UnitOfWork,
    events: Sequence[Event],
    rules: Rules,
    claim: Claim,
    *,
    create_own: bool = True,
    wait_at_most: timedelta | None = None,
) -> list[Outcome]:
    """Apply ``events`` in order inside an open unit of work (the caller commits): lock → claim →
    apply → collect → save. Raises EventConflict, BatchNotApplicable or a DomainError to refuse."""
    accounts = await lock_for(uow, events, create_own, wait_at_most)
    if not await claim(uow, events):
        return [Outcome.DUPLICATE]
    owed: Owed = []
    steps = []
    for event in events:
        context = Context(uow, accounts, rules, event.customer_id, owed)
        steps.append(Step(event.occurred_at, partial(HANDLERS[type(event)].apply, context, event)))
    changed = await settle(uow, list(accounts.values()), steps, owed)
    return [Outcome.APPLIED if effect else Outcome.IGNORED for effect in changed]


async def apply_event(
    event: Event,
    uow: UnitOfWork,
    policy: CreditPolicy,
    dunning: DunningRules = DEFAULT_DUNNING,
    referral_rules: ReferralRules | None = None,
) -> Outcome:
    """Apply one event exactly once (a batch of one). Raises EventConflict or a DomainError to refuse it."""
    async with uow:
        [outcome] = await apply_in(uow, [event], Rules(policy, dunning, referral_rules or ReferralRules()), claim_one)
        await uow.commit()
    return outcome


async def apply_events(
    events: Sequence[Event],
    uow: UnitOfWork,
    policy: CreditPolicy,
    dunning: DunningRules = DEFAULT_DUNNING,
    referral_rules: ReferralRules | None = None,
) -> list[Outcome]:
    """Apply new events in one transaction, in order: all of them or none (a group commit).

    The same effects, entries, notices and idempotency records as ``apply_event`` on each in
    turn. Raises BatchNotApplicable if one was seen before, and whatever one of them raises;
    either way nothing is written, and the caller applies them one by one.
    """
    alone = {type(event).__name__: HANDLERS[type(event)].alone for event in events if not batchable(event)}
    if alone:
        raise ValueError(
            "never share a transaction: " + "; ".join(f"{kind} ({why})" for kind, why in sorted(alone.items()))
        )
    async with uow:
        # A batch waits only briefly for a customer another transaction holds: meanwhile it
        # holds the others' locks. Past that it fails, and its events go one at a time.
        outcomes = await apply_in(
            uow,
            events,
            Rules(policy, dunning, referral_rules or ReferralRules()),
            claim_all,
            wait_at_most=BATCH_LOCK_WAIT,
        )
        await uow.commit()
    return outcomes
