"""The one way the ledger changes: lock → apply → collect → save, shared by every use case.

Events (service_layer/events.py), holds (holds.py), sweeps (sweeps.py) and admin actions
(adjustments.py) lock their accounts their own way, then hand the steps to ``settle``: each
step runs against the locked accounts at its own moment, the domain events the accounts
recorded during it are collected right after it (so a batch's notices are those of its events
one at a time), and everything is written at the end. Notices for running out of credits and
getting them back are made here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from domain import Account, CreditPolicy
from domain import notifications as notices
from domain.dunning import DunningRules
from domain.events import CreditsDepleted, CreditsRestored, net_change
from domain.referrals import ReferralRules
from service_layer.errors import CustomerNotFound
from service_layer.ports import UnitOfWork

Owed = list[tuple[notices.Notice, datetime]]


class Outcome(StrEnum):
    APPLIED = "applied"
    #: This event id was applied before: nothing done.
    DUPLICATE = "duplicate"
    #: A new event that changes nothing: a payment already issued, a failure reported after
    #: the invoice was paid, a payment-method update with nothing owed. Recorded, not applied.
    IGNORED = "ignored"


@dataclass(frozen=True)
class Rules:
    """The business's settings an event is applied under."""

    policy: CreditPolicy
    dunning: DunningRules = field(default_factory=DunningRules)
    referrals: ReferralRules = field(default_factory=ReferralRules)


@dataclass(frozen=True)
class Step:
    """One thing done to the locked accounts, at one moment (an event, a hold, a catch-up)."""

    at: datetime
    run: Callable[[], Awaitable[Any]]


async def settle(
    uow: UnitOfWork, accounts: Sequence[Account], steps: Iterable[Step], owed: Owed | None = None
) -> list[Any]:
    """Run ``steps`` in order on ``accounts`` (locked by the caller), collect, and save.

    ``owed`` holds notices the steps queued themselves (a payment failure), kept in order with
    the depletion notices. Returns each step's result. The caller commits.
    """
    owed = [] if owed is None else owed
    results = []
    for step in steps:
        results.append(await step.run())
        owed += depletion_notices(accounts, step.at)
    await uow.notifications.enqueue_many(owed)
    await uow.accounts.save_many(list(accounts))
    return results


def collect_new_events(accounts: Iterable[Account]) -> dict[str, list]:
    """Take the domain events each account recorded since the last collection (clearing them)."""
    collected = {}
    for account in accounts:
        if account.events:
            collected[account.customer_id], account.events = account.events, []
    return collected


def depletion_notices(accounts: Sequence[Account], at: datetime) -> Owed:
    """The notices owed for what one step at ``at`` did: ran out of credits, or got them back."""
    by_id = {account.customer_id: account for account in accounts}
    owed: Owed = []
    for customer_id, events in collect_new_events(accounts).items():
        change = net_change(events)
        if isinstance(change, CreditsDepleted):
            owed.append((notices.credits_depleted(customer_id, change.at), at))
        elif isinstance(change, CreditsRestored):
            owed.append(
                (notices.credits_restored(customer_id, change.depleted_since, at, by_id[customer_id].balance(at)), at)
            )
    return owed


async def lock_existing(uow: UnitOfWork, customer_id: str, job_ids: Iterable[str] = ()) -> Account:
    """Lock a customer who must exist already (an API call or an admin never creates one)."""
    [account] = await uow.accounts.lock_many([customer_id], {customer_id: job_ids}, create=()) or [None]
    if account is None:
        raise CustomerNotFound(customer_id)
    return account
