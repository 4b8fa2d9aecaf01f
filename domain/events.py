"""What happened to an account, as the Account records it (domain events).

Named ``Credits…`` after what the customer is told, and kept apart from ``messages``
(the events that arrive from outside): these are produced by the domain, never received.
The Account appends them as its state changes; the service layer collects them after each
applied step and turns them into notices in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class CreditsDepleted:
    """The account's balance fell to zero or below (from above zero)."""

    customer_id: str
    at: datetime


@dataclass(frozen=True)
class CreditsRestored:
    """The balance rose above zero again after the account had run out at ``depleted_since``."""

    customer_id: str
    depleted_since: datetime
    at: datetime


DomainEvent = CreditsDepleted | CreditsRestored


def net_change(events: Sequence[DomainEvent]) -> DomainEvent | None:
    """The change between before the first of ``events`` and after the last, if any.

    One step (an event, a hold, a sweep's catch-up) may run out and get credits back within
    itself: the customer hears only how it ended, compared with how it began. Depleted then
    restored is no change; restored several times counts from the first depletion's moment.
    """
    if not events:
        return None
    first, last = events[0], events[-1]
    if isinstance(first, CreditsDepleted) and isinstance(last, CreditsDepleted):
        return last
    if isinstance(first, CreditsRestored) and isinstance(last, CreditsRestored):
        return CreditsRestored(first.customer_id, first.depleted_since, last.at)
    return None
