"""Admins' corrections and actions: applied like any event, never to an unknown customer, once per form."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from domain import CreditPolicy
from domain.dunning import DunningRules
from messages import CreditsAdjusted, Event
from service_layer.apply import Outcome, Rules
from service_layer.events import apply_in, claim_by_key
from service_layer.ports import UnitOfWork


@dataclass(frozen=True)
class Adjustment:
    """An admin's correction: credits (signed) with a reason, by whom and when."""

    customer_id: str
    credits: int
    reason: str
    admin: str
    at: datetime
    #: One per form or API call, kept across retries: a double click or a retried request
    #: applies once (the repeat answers ``duplicate``, whatever it carried). None: each applies.
    idempotency_key: str | None = None


async def admin_adjustment(uow: UnitOfWork, policy: CreditPolicy, adjustment: Adjustment) -> Outcome:
    """An admin's correction, applied like any event and shown in the ledger.

    Raises CustomerNotFound for an unknown customer (an adjustment never creates one).
    """
    event = CreditsAdjusted(
        event_id=f"admin-adjustment:{adjustment.idempotency_key or uuid.uuid4()}",
        occurred_at=adjustment.at,
        customer_id=adjustment.customer_id,
        credits=adjustment.credits,
        reason=adjustment.reason,
        actor=adjustment.admin,
    )
    return await apply_admin_event(uow, policy, event)


async def apply_admin_event(uow: UnitOfWork, policy: CreditPolicy, event: Event) -> Outcome:
    """Apply an event an admin made (its id carries the form's key) to an existing customer, once.

    Raises CustomerNotFound for an unknown customer (an admin's action never creates one), and
    what the domain refuses (a gift over what is available, to or from a frozen membership)."""
    async with uow:
        [outcome] = await apply_in(uow, [event], Rules(policy, DunningRules()), claim_by_key, create_own=False)
        await uow.commit()
    return outcome
