"""Admins' corrections and actions: applied like any event, never to an unknown customer, once per form."""

from __future__ import annotations

import uuid
from datetime import datetime

from domain import CreditPolicy
from domain.dunning import DunningRules
from messages import CreditsAdjusted, Event
from service_layer.apply import Outcome, Rules
from service_layer.events import apply_in, claim_by_key
from service_layer.ports import UnitOfWork


async def admin_adjustment(
    uow: UnitOfWork,
    policy: CreditPolicy,
    customer_id: str,
    credits: int,
    reason: str,
    admin: str,
    now: datetime,
    idempotency_key: str | None = None,
) -> Outcome:
    """An admin's correction with a reason, applied like any event and shown in the ledger.

    ``idempotency_key`` (one per form or API call, kept across retries) makes a double click
    or a retried request apply once (the repeat answers ``duplicate``, whatever it carried).
    Raises CustomerNotFound for an unknown customer (an adjustment never creates one).
    """
    event_id = f"admin-adjustment:{idempotency_key or uuid.uuid4()}"
    event = CreditsAdjusted(
        event_id=event_id, occurred_at=now, customer_id=customer_id, credits=credits, reason=reason, actor=admin
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
