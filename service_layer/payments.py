"""Collecting unpaid invoices: scheduled retries, immediate charges, the end of the schedule, the notice.

A charge is requested as a ``payment_attempts`` row first, then charged by whichever worker
leases it, with the attempt's own idempotency key: a crash between the provider's answer
and our commit is retried with the same key, and the provider answers with the same charge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from domain.dunning import AttemptKind, AttemptOutcome, DunningCase, DunningRules, DunningStatus, RetrySchedule
from infra.db.payments import Attempt
from messages import PaymentSucceeded
from service_layer import events
from service_layer.apply import Rules, lock_existing
from service_layer.errors import CustomerNotFound, NothingOwed, RetryLimited

# The provider port moved to ports.py; its names stay importable from here (the adapters, tests).
from service_layer.ports import (
    ChargeResult,
    PaymentProvider,
    ProviderUnavailable,
    UnitOfWork,
    UnitOfWorkFactory,
)

log = structlog.get_logger("credits.payments")

#: A worker charging an attempt holds it this long; after a crash another worker takes it.
ATTEMPT_LEASE = timedelta(minutes=5)
#: After the provider failed (5xx, timeout), the same charge is tried again after this, doubling.
PROVIDER_BACKOFF = timedelta(minutes=1)
PROVIDER_BACKOFF_MAX = timedelta(hours=1)


# ---------------------------------------------------------------- collecting


@dataclass
class CollectionResult:
    scheduled: int = 0
    charged: dict[str, int] = field(default_factory=dict)
    postponed: int = 0
    cancelled_subscriptions: int = 0


async def schedule_due_retries(
    new_uow: UnitOfWorkFactory, now: datetime, limit: int = 500, schedule: RetrySchedule | None = None
) -> int:
    """Request the next scheduled attempt of every case whose retry is due (once per attempt), and
    mark past due the stopped cases whose schedule has ended."""
    schedule = schedule or RetrySchedule()
    async with new_uow() as uow:
        # The query narrows by index; the domain's rule decides (as for stopped cases below).
        due = [case for case in await uow.dunning.lock_due(now, limit) if case.is_due(now)]
        requested = [await uow.dunning.add_attempt(case, AttemptKind.SCHEDULED, now) for case in due]
        for case in await uow.dunning.lock_stopped_before(now - timedelta(days=schedule.days[-1]), limit):
            if case.schedule_ended(now, schedule):
                await uow.dunning.save(case)
                log.info(
                    "dunning_past_due",
                    invoice_id=case.invoice_id,
                    customer_id=case.customer_id,
                    stopped_as=case.last_decline_code,
                )
        await uow.commit()
    return sum(1 for attempt_id in requested if attempt_id is not None)


@dataclass(frozen=True)
class Collector:
    """What charging attempts works with: units of work, the provider, the clock, the rules."""

    new_uow: UnitOfWorkFactory
    provider: PaymentProvider
    now: Callable[[], datetime]
    rules: Rules


async def charge_pending(
    collector: Collector, attempt_ids: list[int] | None = None, limit: int = 100
) -> CollectionResult:
    """Charge pending attempts (those given, or any), each once, and record what happened.

    Attempts are leased one at a time, so a slow provider never outlives a lease; one that
    fails unexpectedly is postponed and the others are still charged.
    """
    new_uow, now = collector.new_uow, collector.now
    result = CollectionResult()
    for _ in range(limit):
        async with new_uow() as uow:
            attempts = await uow.dunning.claim_attempts(now(), ATTEMPT_LEASE, 1, attempt_ids)
            await uow.commit()
        if not attempts:
            break
        [attempt] = attempts
        try:
            outcome = await charge_attempt(collector, attempt)
        except Exception as error:
            log.exception("payment_attempt_failed", attempt_id=attempt.id, invoice_id=attempt.invoice_id)
            await _postpone(new_uow, attempt, now(), f"{type(error).__name__}: {error}")
            outcome = None
        if outcome is None:
            result.postponed += 1
        else:
            result.charged[outcome.value] = result.charged.get(outcome.value, 0) + 1
    return result


async def _postpone(new_uow: UnitOfWorkFactory, attempt: Attempt, at: datetime, reason: str) -> timedelta:
    wait = min(PROVIDER_BACKOFF * 2**attempt.provider_errors, PROVIDER_BACKOFF_MAX)
    async with new_uow() as uow:
        await uow.dunning.postpone_attempt(attempt.id, at + wait, reason[:2000])
        await uow.commit()
    return wait


async def charge_attempt(collector: Collector, attempt: Attempt) -> AttemptOutcome | None:
    """Charge one leased attempt. Returns its outcome, or None when the provider failed (postponed)."""
    new_uow, now = collector.new_uow, collector.now
    bound = log.bind(
        invoice_id=attempt.invoice_id, customer_id=attempt.customer_id, attempt_id=attempt.id, kind=attempt.kind.value
    )
    async with new_uow() as uow:
        case = await uow.dunning.get_by_id(attempt.case_id)
        skip = _reason_not_to_charge(case, attempt)
        if skip is not None:
            await uow.dunning.finish_attempt(attempt.id, now(), AttemptOutcome.CLOSED, message=skip)
            await uow.commit()
            bound.info("payment_attempt_skipped", reason=skip)
            return AttemptOutcome.CLOSED
    try:
        check_first = attempt.provider_errors > 0 or (attempt.kind is AttemptKind.SCHEDULED and attempt.number == 1)
        charge = await collector.provider.pay_invoice(
            attempt.invoice_id,
            attempt.customer_id,
            charge_key(attempt),
            check_first=check_first,
            payment_method_id=attempt.payment_method_id,
            # Only an automatic charge of the same card heeds an earlier hard decline; a new
            # card, or a customer's own retry (perhaps after changing their default), is tried.
            heed_last_decline=attempt.kind is AttemptKind.SCHEDULED,
        )
    except ProviderUnavailable as error:
        wait = await _postpone(new_uow, attempt, now(), str(error))
        bound.warning("payment_attempt_postponed", error=str(error), retry_in_s=int(wait.total_seconds()))
        return None
    await record_charge(new_uow, attempt, charge, now(), collector.rules)
    bound.info("payment_attempt_done", outcome=charge.outcome.value, decline_code=charge.decline_code)
    return charge.outcome


def _reason_not_to_charge(case: DunningCase | None, attempt: Attempt) -> str | None:
    """Why a requested attempt must not be charged any more, if it must not."""
    if case is None or not case.owes:
        return "nothing owed any more"  # paid or closed since the attempt was requested
    if attempt.kind is AttemptKind.SCHEDULED and case.status is not DunningStatus.RETRYING:
        # A hard decline or a needed authentication came in meanwhile: no automatic retries.
        return f"the schedule stopped: {case.status.value}"
    return None


def charge_key(attempt: Attempt) -> str:
    """The idempotency key of this try of the attempt.

    A repeat after a crash uses the same key, so the provider answers with the same charge.
    After the provider failed, a new key: Stripe replays a saved 500 for the same key for a
    day. A second charge is impossible all the same — an invoice is paid once, and the retry
    reads the invoice's state before charging it again.
    """
    return (
        attempt.idempotency_key
        if attempt.provider_errors == 0
        else f"{attempt.idempotency_key}:retry-{attempt.provider_errors}"
    )


async def record_charge(
    new_uow: UnitOfWorkFactory, attempt: Attempt, charge: ChargeResult, at: datetime, rules: Rules
) -> None:
    """Record an attempt's outcome on the attempt and its case; a payment issues its credits in the same transaction."""
    async with new_uow() as uow:
        # The account first, then the case: the order every writer takes them in.
        await uow.accounts.lock_many([attempt.customer_id], {})
        case = await uow.dunning.get_by_id(attempt.case_id)
        if not await uow.dunning.finish_attempt(attempt.id, at, charge.outcome, charge.decline_code, charge.message):
            return  # another worker recorded it (our lease ran out): the provider answered it the same, by key
        if charge.outcome is AttemptOutcome.SUCCEEDED:
            paid = charge.paid
            if paid is not None and paid.credits:
                event = PaymentSucceeded(
                    event_id=f"charge:{attempt.idempotency_key}",
                    occurred_at=paid.paid_at,
                    customer_id=attempt.customer_id,
                    payment_id=paid.invoice_id,
                    credits=paid.credits,
                    amount_cents=paid.amount_cents,
                    currency=paid.currency,
                )
                # Issues once and ends the case, on the path every event takes.
                await events.apply_in(uow, [event], rules, events.claim_one)
            else:
                log.error(
                    "paid_invoice_without_credits",
                    invoice_id=attempt.invoice_id,
                    detail="no credits known for its prices; the invoice.paid webhook is parked for review",
                )
                case.paid(at)
                await uow.dunning.save(case)
        elif charge.outcome is AttemptOutcome.CLOSED:
            case.close(at, charge.message or "invoice closed at the provider")
            await uow.dunning.save(case)
        else:
            case.attempt_failed(
                attempt.kind, charge.outcome, at, charge.decline_code, charge.message, rules.dunning.schedule
            )
            await uow.dunning.save(case)
        await uow.commit()


async def cancel_past_due_subscriptions(
    new_uow: UnitOfWorkFactory, provider: PaymentProvider, now: Callable[[], datetime], limit: int = 100
) -> int:
    """End action ``cancel_subscription``: cancel the subscription of each case whose schedule ran out."""
    cancelled = 0
    async with new_uow() as uow:
        cases = await uow.dunning.lock_to_cancel(limit)
        # Holding the rows while calling the provider is fine: few cases, and others skip them.
        for case in cases:
            try:
                await provider.cancel_subscription(case.subscription_id, f"dunning-cancel:{case.invoice_id}")
            except ProviderUnavailable as error:
                log.warning("subscription_cancel_postponed", invoice_id=case.invoice_id, error=str(error))
                continue
            case.subscription_cancelled(now())
            await uow.dunning.save(case)
            cancelled += 1
            log.info(
                "subscription_cancelled",
                invoice_id=case.invoice_id,
                subscription_id=case.subscription_id,
                customer_id=case.customer_id,
            )
        await uow.commit()
    return cancelled


async def request_retry_now(
    new_uow: UnitOfWorkFactory, customer_id: str, now: datetime, rules: DunningRules
) -> list[int]:
    """The customer's "retry now": request an immediate charge of each unpaid invoice.

    Raises CustomerNotFound, NothingOwed or RetryLimited. Returns the attempts to charge.
    """
    async with new_uow() as uow:
        await lock_existing(uow, customer_id)
        attempt_ids = await request_immediate_charges(uow, customer_id, AttemptKind.CUSTOMER, now, rules)
        await uow.commit()
    return attempt_ids


async def request_immediate_charges(
    uow: UnitOfWork,
    customer_id: str,
    kind: AttemptKind,
    now: datetime,
    rules: DunningRules,
    payment_method_id: str | None = None,
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
    requested = [
        await uow.dunning.add_attempt(case, kind, now, payment_method_id=payment_method_id, not_before=not_before)
        for case in cases
    ]
    return [attempt_id for attempt_id in requested if attempt_id is not None]


# ---------------------------------------------------------------- the customer's login banner


@dataclass(frozen=True)
class LoginBanner:
    """What the front end shows the customer on login (not an email: that is domain.notifications.Notice)."""

    kind: str  # none | no_credits | payment_failed | action_required
    message: str
    next_retry_at: datetime | None = None
    attempts_left: int | None = None
    failure_reason: str | None = None
    decline_code: str | None = None
    #: Where the customer fixes it: the hosted invoice page, else the billing portal.
    payment_url: str | None = None
    can_retry: bool = False


async def login_banner(
    uow: UnitOfWork, customer_id: str, now: datetime, rules: DunningRules, billing_portal_url: str | None
) -> LoginBanner:
    """What the front end shows the customer on login; the most pressing matter wins."""
    async with uow:
        account = await uow.accounts.get(customer_id)
        if account is None:
            raise CustomerNotFound(customer_id)
        cases = await uow.dunning.cases_of(customer_id)
        view = account.view(now)
    case = _most_pressing(cases)
    if case is not None:
        url = case.hosted_invoice_url or billing_portal_url
        reason = case.last_failure_message or (
            f"declined ({case.last_decline_code})" if case.last_decline_code else None
        )
        if case.status is DunningStatus.ACTION_REQUIRED:
            return LoginBanner(
                "action_required",
                "Your bank needs you to confirm your latest payment. Open the payment page to confirm it.",
                failure_reason=reason,
                decline_code=case.last_decline_code,
                payment_url=url,
                can_retry=False,
            )
        return LoginBanner(
            "payment_failed",
            _failed_message(case, rules),
            next_retry_at=case.next_retry_at,
            attempts_left=case.attempts_left(rules.schedule),
            failure_reason=reason,
            decline_code=case.last_decline_code,
            payment_url=url,
            can_retry=True,
        )
    if not view.can_schedule:
        return LoginBanner(
            "no_credits",
            "You have no credits left. Your credits come back with your next payment.",
            payment_url=billing_portal_url,
        )
    return LoginBanner("none", "")


def _most_pressing(cases: list[DunningCase]) -> DunningCase | None:
    order = [
        DunningStatus.ACTION_REQUIRED,
        DunningStatus.NEEDS_PAYMENT_METHOD,
        DunningStatus.PAST_DUE,
        DunningStatus.RETRYING,
    ]
    open_cases = [case for case in cases if case.owes]
    return min(open_cases, key=lambda case: order.index(case.status), default=None)


def _failed_message(case: DunningCase, rules: DunningRules) -> str:
    if case.status is DunningStatus.NEEDS_PAYMENT_METHOD:
        return "Your card was declined and cannot be charged again. Please update your payment method."
    if case.status is DunningStatus.PAST_DUE:
        return "We could not collect your payment and your membership is past due. Please update your payment method or retry the payment."
    return f"Your latest payment failed. We will retry it automatically on {case.next_retry_at:%B %-d}; you can also update your payment method or retry now."
