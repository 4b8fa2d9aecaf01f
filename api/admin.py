"""The admin API (admin token): reports, Stripe customer links and parked events, adjustments, analytics."""

from __future__ import annotations

from datetime import UTC
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import AwareDatetime

from api.auth import admin
from api.dependencies import now, publisher, uow
from api.schemas import (
    AdjustmentIn,
    AdjustmentOut,
    AnalyticsOut,
    CountOut,
    CreditsReportOut,
    DunningReportOut,
    Identifier,
    MonthOut,
    ParkedEventOut,
    StripeCustomerIn,
    StripeCustomerOut,
    UpcomingOut,
    WebhookReceiptOut,
)
from service_layer import adjustments, analytics, views, webhooks
from service_layer.errors import CustomerNotFound

router = APIRouter()


@router.get("/api/admin/credits-report", response_model=CreditsReportOut, dependencies=[admin])
async def credits_report(
    request: Request,
    days: Annotated[int | None, Query(ge=0, le=3650, description="default: DEPLETED_REPORT_DAYS")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> CreditsReportOut:
    days = request.app.state.settings.depleted_report_days if days is None else days
    as_of = now(request)
    total, page = await views.depleted_customers(request.app.state.db, as_of, days, limit, offset)
    return CreditsReportOut(
        days=days,
        as_of=as_of,
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
        customers=page,
    )


@router.put(
    "/api/admin/stripe-customers/{stripe_customer_id}",
    response_model=StripeCustomerOut,
    dependencies=[admin],
    responses={409: {"description": "Linked differently already"}},
)
async def link_stripe_customer(
    stripe_customer_id: Identifier, body: StripeCustomerIn, request: Request
) -> StripeCustomerOut:
    async with uow(request) as unit:
        linked = await unit.stripe.map_customer(stripe_customer_id, body.customer_id)
        await unit.commit()
    if linked != body.customer_id:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{stripe_customer_id} is linked to another customer, or {body.customer_id!r} to another Stripe customer",
        )
    plan = request.app.state.settings.stripe_plan_credits
    relayed = await webhooks.relay_parked(
        lambda: uow(request), publisher(request), plan, now(request), stripe_customer_id
    )
    return StripeCustomerOut(
        stripe_customer_id=stripe_customer_id,
        customer_id=linked,
        parked_events_relayed=sum(1 for r in relayed if r.outcome != "parked"),
    )


@router.get("/api/admin/stripe-events/parked", response_model=list[ParkedEventOut], dependencies=[admin])
async def parked_stripe_events(
    request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> list[ParkedEventOut]:
    async with uow(request, read_only=True) as unit:
        rows = await unit.stripe.parked_events(limit=limit)
    return [
        ParkedEventOut(
            event_id=r.event_id,
            type=r.type,
            stripe_customer_id=r.stripe_customer_id,
            received_at=r.received_at,
            detail=r.detail,
        )
        for r in rows
    ]


@router.post("/api/admin/stripe-events/parked/relay", response_model=list[WebhookReceiptOut], dependencies=[admin])
async def relay_parked_stripe_events(request: Request) -> list[WebhookReceiptOut]:
    """After fixing the plan table, say: translate every parked event again."""
    receipts = await webhooks.relay_parked(
        lambda: uow(request), publisher(request), request.app.state.settings.stripe_plan_credits, now(request)
    )
    return [WebhookReceiptOut(outcome=r.outcome, detail=r.detail) for r in receipts]


@router.get("/api/admin/dunning-report", response_model=DunningReportOut, dependencies=[admin])
async def dunning_report(
    request: Request,
    dunning_status: Annotated[
        Literal["retrying", "action_required", "needs_payment_method", "past_due", "recovered", "closed"] | None,
        Query(alias="status"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> DunningReportOut:
    """Every unpaid invoice in dunning (or those of one status), whatever the customer's credits."""
    total, page = await views.unpaid_invoices(request.app.state.db, dunning_status, limit, offset)
    return DunningReportOut(
        total=total,
        limit=limit,
        offset=offset,
        next_offset=offset + limit if offset + limit < total else None,
        invoices=page,
    )


@router.post(
    "/api/admin/customers/{customer_id}/adjustments",
    response_model=AdjustmentOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[admin],
    responses={404: {"description": "No such customer"}},
)
async def adjust_credits(customer_id: Identifier, body: AdjustmentIn, request: Request) -> AdjustmentOut:
    """An admin's correction, with a reason; it shows in the customer's ledger."""
    if body.credits == 0:
        raise HTTPException(422, "an adjustment must change the balance")
    try:
        outcome = await adjustments.admin_adjustment(
            uow(request),
            request.app.state.settings.policy,
            adjustments.Adjustment(
                customer_id, body.credits, body.reason, body.admin, now(request), body.idempotency_key
            ),
        )
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    return AdjustmentOut(customer_id=customer_id, credits=body.credits, outcome=outcome.value)


@router.get("/api/admin/credits/analytics", response_model=AnalyticsOut, dependencies=[admin])
async def credits_analytics(
    request: Request, since: AwareDatetime | None = None, until: AwareDatetime | None = None
) -> AnalyticsOut:
    """Issued, used, expired and outstanding credits per month (UTC), upcoming expirations, breakage."""
    for moment in (since, until):
        if moment is not None and not (2000 <= moment.year <= 2999 and 2000 <= moment.astimezone(UTC).year <= 2999):
            raise HTTPException(422, "since and until must fall in the years 2000-2999")
    if since and until and since > until:
        raise HTTPException(422, "since must not be after until")
    found = await analytics.credits_analytics(request.app.state.db, now(request), since, until)
    return AnalyticsOut(
        months=[MonthOut(**vars(m)) for m in found.months],
        upcoming_expirations=[UpcomingOut(month=m, credits=c) for m, c in found.upcoming_expirations],
        totals=found.totals,
        breakage_rate=found.breakage_rate,
    )


@router.get("/api/admin/at-risk-count", response_model=CountOut, dependencies=[admin])
async def at_risk_count(request: Request) -> CountOut:
    return CountOut(
        count=await views.at_risk_count(
            request.app.state.db, now(request), request.app.state.settings.depleted_report_days
        )
    )
