"""The periodic sweeps: expire lots past their expiry, lapse holds past their time to live.

They write what each account's catch-up writes anyway (an event catches its account up
first): the sweep only makes it happen for accounts with no event, on the same path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from domain import Account
from service_layer.apply import Step, settle
from service_layer.ports import UnitOfWork, UnitOfWorkFactory


@dataclass(frozen=True)
class SweepResult:
    customers: int
    entries: int
    #: True when the sweep stopped at its batch budget with work left.
    more: bool = False


async def expire_due_credits(
    new_uow: UnitOfWorkFactory, now: datetime, batch_size: int, max_batches: int | None = None
) -> SweepResult:
    """Write expiry entries for every lot past its expiry, a batch of customers per transaction."""
    return await _sweep(
        new_uow, now, max_batches, lambda uow, busy: uow.accounts.customers_with_due_lots(now, batch_size, exclude=busy)
    )


async def lapse_due_holds(
    new_uow: UnitOfWorkFactory, now: datetime, batch_size: int, max_batches: int | None = None
) -> SweepResult:
    """Lapse every hold not captured within its time to live."""
    return await _sweep(
        new_uow,
        now,
        max_batches,
        lambda uow, busy: uow.accounts.customers_with_due_holds(now, batch_size, exclude=busy),
    )


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

            [written] = await settle(uow, accounts, [Step(now, partial(_catch_up, accounts, now, event_id))])
            await uow.commit()
            entries += written
            customers += len(accounts)
            batches += 1
    return SweepResult(customers, entries, more=True)


async def _catch_up(accounts: list[Account], now: datetime, event_id: str) -> int:
    """Expire and lapse what is due in each account; how many entries that wrote."""
    for account in accounts:
        account.catch_up(now, event_id)
    return sum(len(account.new_entries) for account in accounts)
