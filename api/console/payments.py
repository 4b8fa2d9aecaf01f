"""Payments: the dunning report; Stripe events parked for review, linked to a customer and relayed."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from api.console.pages import back, form, parsed, render, require_admin
from domain.dunning import DunningStatus
from messages import Event, Publisher
from service_layer import views, webhooks
from service_layer.unit_of_work import SqlUnitOfWork

router = APIRouter(include_in_schema=False)
PAGE = 50
TO = "/admin/payments"
Text255 = Field(min_length=1, max_length=255, pattern=r"^[^\x00]*$")


class LinkIn(BaseModel):
    stripe_customer_id: str = Text255
    customer_id: str = Text255


@router.get("/admin/payments", dependencies=[Depends(require_admin)])
async def payments(
    request: Request,
    status: Annotated[
        Literal["", "retrying", "action_required", "needs_payment_method", "past_due", "recovered", "closed"] | None,
        Query(),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
):
    db = request.app.state.db
    total, invoices = await views.unpaid_invoices(db, status or None, PAGE, offset)
    async with SqlUnitOfWork(db, read_only=True) as uow:
        parked = await uow.stripe.parked_events(limit=200)
    return await render(
        request,
        "payments.html",
        "Payments",
        total=total,
        invoices=invoices,
        parked=parked,
        status=status or "",
        statuses=[s.value for s in DunningStatus],
        offset=offset,
        size=PAGE,
        relaying=request.app.state.broker is not None,
    )


def _publisher(request: Request):
    """Relayed events go to the workers over the broker, as the webhook's do; None without one."""
    if request.app.state.broker is None:
        return None
    sender = Publisher(request.app.state.broker)

    async def publish(event: Event) -> None:
        await asyncio.to_thread(sender.publish, event)

    return publish


@router.post("/admin/payments/link")
async def link(request: Request, fields: Annotated[dict, Depends(form)]):
    """As PUT /api/admin/stripe-customers/{id}: link, then relay that customer's parked events."""
    wanted, publish = parsed(LinkIn, fields), _publisher(request)
    if isinstance(wanted, str) or publish is None:
        return back(
            request,
            TO,
            f"Not linked: {wanted if isinstance(wanted, str) else 'no broker is set, nothing could relay the events'}",
            ok=False,
        )
    state = request.app.state
    async with SqlUnitOfWork(state.db) as uow:
        linked = await uow.stripe.map_customer(wanted.stripe_customer_id, wanted.customer_id)
        await uow.commit()
    if linked != wanted.customer_id:
        return back(
            request,
            TO,
            f"Not linked: {wanted.stripe_customer_id} is linked to another customer, or {wanted.customer_id!r} to another Stripe customer.",
            ok=False,
        )
    relayed = await webhooks.relay_parked(
        lambda: SqlUnitOfWork(state.db),
        publish,
        state.settings.stripe_plan_credits,
        state.clock.now(),
        wanted.stripe_customer_id,
    )
    done = sum(1 for r in relayed if r.outcome != "parked")
    return back(
        request, TO, f"Linked {wanted.stripe_customer_id} to {wanted.customer_id}; {done} parked event(s) relayed."
    )


@router.post("/admin/payments/relay")
async def relay(request: Request, fields: Annotated[dict, Depends(form)]):
    """As POST /api/admin/stripe-events/parked/relay: translate every parked event again."""
    publish, state = _publisher(request), request.app.state
    if publish is None:
        return back(request, TO, "Not relayed: no broker is set, nothing could relay the events.", ok=False)
    receipts = await webhooks.relay_parked(
        lambda: SqlUnitOfWork(state.db), publish, state.settings.stripe_plan_credits, state.clock.now()
    )
    still = sum(1 for r in receipts if r.outcome == "parked")
    return back(request, TO, f"{len(receipts) - still} parked event(s) relayed; {still} still parked.")
