"""Booking a job: a hold reserves its credits until the job completes, is cancelled or lapses."""

from __future__ import annotations

from datetime import datetime

from domain import CreditPolicy, Hold
from domain.model import CreditView
from service_layer.apply import Step, lock_existing, settle
from service_layer.errors import CustomerNotFound
from service_layer.ports import UnitOfWork


async def place_hold(
    uow: UnitOfWork, policy: CreditPolicy, customer_id: str, job_id: str, credits: int, now: datetime
) -> tuple[Hold, bool]:
    """Book a job: reserve its credits, or raise InsufficientCredits (the front end's 409).

    Returns the hold and whether it is new (placing the same hold again is harmless).
    """
    async with uow:
        account = await lock_existing(uow, customer_id, job_ids=(job_id,))

        async def hold() -> tuple[Hold, bool]:
            placed = account.place_hold(job_id, credits, now, f"hold:{customer_id}:{job_id}", policy)
            return placed, placed.id is None

        [(placed, created)] = await settle(uow, [account], [Step(now, hold)])
        await uow.commit()
    return placed, created


async def release_hold(uow: UnitOfWork, customer_id: str, job_id: str, now: datetime) -> bool:
    """Release a booked job's hold. Returns whether an active hold was released."""
    async with uow:
        account = await lock_existing(uow, customer_id)

        async def release() -> bool:
            return account.release_hold(job_id, now, f"release:{customer_id}:{job_id}")

        [released] = await settle(uow, [account], [Step(now, release)])
        await uow.commit()
    return released


async def credit_view(uow: UnitOfWork, customer_id: str, now: datetime) -> CreditView:
    """The customer's credits as of ``now``, due expiries applied in memory, nothing written."""
    async with uow:
        account = await uow.accounts.get(customer_id)
        if account is None:
            raise CustomerNotFound(customer_id)
        return account.view(now)
