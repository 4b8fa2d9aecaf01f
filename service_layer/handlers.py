"""Use cases. Each opens one unit of work, calls the domain, and commits.

Event handlers run inside the same transaction that records the event as processed, so
an event's effect and its idempotency record commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from domain import Account, CreditPolicy, Hold
from domain.model import CreditView
from messages import CreditsAdjusted, Event, JobCancelled, JobCompleted, PaymentSucceeded
from service_layer.errors import CustomerNotFound
from service_layer.unit_of_work import UnitOfWork

UnitOfWorkFactory = Callable[[], UnitOfWork]


class Outcome(StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"


def _job_completed(account: Account, event: JobCompleted, policy: CreditPolicy) -> None:
    account.complete_job(event.job_id, event.credits, event.occurred_at, event.event_id)


def _job_cancelled(account: Account, event: JobCancelled, policy: CreditPolicy) -> None:
    account.release_hold(event.job_id, event.occurred_at, event.event_id)


def _payment_succeeded(account: Account, event: PaymentSucceeded, policy: CreditPolicy) -> None:
    account.issue(event.credits, event.occurred_at, event.event_id, policy, note=f"payment {event.payment_id}")


def _credits_adjusted(account: Account, event: CreditsAdjusted, policy: CreditPolicy) -> None:
    account.adjust(event.credits, event.occurred_at, event.event_id, policy, note=f"{event.reason} (by {event.actor})")


EVENT_HANDLERS: dict[type[Event], Callable[[Account, Event, CreditPolicy], None]] = {
    JobCompleted: _job_completed,
    JobCancelled: _job_cancelled,
    PaymentSucceeded: _payment_succeeded,
    CreditsAdjusted: _credits_adjusted,
}


async def apply_event(event: Event, uow: UnitOfWork, policy: CreditPolicy) -> Outcome:
    """Apply one event exactly once. Raises EventConflict or a DomainError to refuse it."""
    handler = EVENT_HANDLERS[type(event)]
    job_ids = (event.job_id,) if isinstance(event, JobCompleted) else ()
    async with uow:
        account = await uow.accounts.lock(event.customer_id, create=True, job_ids=job_ids)
        assert account is not None
        if not await uow.events.claim(event):
            return Outcome.DUPLICATE
        handler(account, event, policy)
        await uow.accounts.save(account)
        await uow.commit()
    return Outcome.APPLIED


async def place_hold(
    uow: UnitOfWork, policy: CreditPolicy, customer_id: str, job_id: str, credits: int, now: datetime
) -> tuple[Hold, bool]:
    """Book a job: reserve its credits, or raise InsufficientCredits (the front end's 409).

    Returns the hold and whether it is new (placing the same hold again is harmless).
    """
    async with uow:
        account = await _locked(uow, customer_id, job_ids=(job_id,))
        hold = account.place_hold(job_id, credits, now, f"hold:{customer_id}:{job_id}", policy)
        created = hold.id is None
        await uow.accounts.save(account)
        await uow.commit()
    return hold, created


async def release_hold(uow: UnitOfWork, customer_id: str, job_id: str, now: datetime) -> bool:
    """Release a booked job's hold. Returns whether an active hold was released."""
    async with uow:
        account = await _locked(uow, customer_id)
        released = account.release_hold(job_id, now, f"release:{customer_id}:{job_id}")
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
            for account in accounts:
                account.catch_up(now, event_id)
                entries += len(account.new_entries)
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
