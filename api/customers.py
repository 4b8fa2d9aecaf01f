"""The booking front end's routes: a customer's credits, holds for booked jobs, the payment notice and "retry now"."""

from __future__ import annotations

import asyncio

import structlog
from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse

from api.auth import frontend
from api.dependencies import broker_or_503, now, uow
from api.schemas import (
    CreditsOut,
    HoldIn,
    HoldOut,
    Identifier,
    LoginBannerAction,
    LoginBannerOut,
    LotOut,
    RetryAcceptedOut,
)
from domain import HoldConflict, InsufficientCredits, JobAlreadyCharged, MembershipIsFrozen
from infra.broker import enqueue_charges
from service_layer import holds, payments
from service_layer.errors import CustomerNotFound, NothingOwed, RetryLimited

log = structlog.get_logger("credits.api")
router = APIRouter()


@router.get("/api/customers/{customer_id}/credits", response_model=CreditsOut, dependencies=[frontend])
async def get_credits(customer_id: Identifier, request: Request) -> CreditsOut:
    try:
        view = await holds.credit_view(uow(request, read_only=True), customer_id, now(request))
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    return CreditsOut(
        customer_id=view.customer_id,
        balance=view.balance,
        available=view.available,
        holds=[
            HoldOut(job_id=h.job_id, credits=h.credits, placed_at=h.placed_at, expires_at=h.expires_at)
            for h in view.holds
        ],
        lots=[LotOut(remaining=lot.remaining, issued_at=lot.issued_at, expires_at=lot.expires_at) for lot in view.lots],
        credits_depleted_at=view.credits_depleted_at,
        frozen_since=view.frozen_since,
        can_schedule=view.can_schedule,
    )


@router.post(
    "/api/customers/{customer_id}/holds",
    response_model=HoldOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[frontend],
    responses={
        200: {"description": "The same hold was already placed"},
        409: {"description": "Not enough credits, or a conflicting hold"},
    },
)
async def place_hold(customer_id: Identifier, body: HoldIn, request: Request, response: Response) -> HoldOut:
    try:
        hold, created = await holds.place_hold(
            uow(request), request.app.state.settings.policy, customer_id, body.job_id, body.credits, now(request)
        )
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    except InsufficientCredits as error:
        return JSONResponse(
            status_code=status.HTTP_409_CONFLICT,
            content={
                "detail": str(error),
                "reason": "insufficient_credits",
                "available": error.available,
                "requested": error.wanted,
            },
        )
    except (HoldConflict, JobAlreadyCharged, MembershipIsFrozen) as error:
        reason = {
            HoldConflict: "hold_conflict",
            JobAlreadyCharged: "job_already_charged",
            MembershipIsFrozen: "membership_frozen",
        }[type(error)]
        return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": str(error), "reason": reason})
    if not created:
        response.status_code = status.HTTP_200_OK
    return HoldOut(job_id=hold.job_id, credits=hold.credits, placed_at=hold.placed_at, expires_at=hold.expires_at)


@router.delete(
    "/api/customers/{customer_id}/holds/{job_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[frontend]
)
async def release_hold(customer_id: Identifier, job_id: Identifier, request: Request) -> Response:
    try:
        released = await holds.release_hold(uow(request), customer_id, job_id, now(request))
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    if not released:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no active hold for job {job_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/api/customers/{customer_id}/notice", response_model=LoginBannerOut, dependencies=[frontend])
async def notice(customer_id: Identifier, request: Request) -> LoginBannerOut:
    settings = request.app.state.settings
    try:
        found = await payments.login_banner(
            uow(request, read_only=True),
            customer_id,
            now(request),
            settings.dunning,
            settings.stripe_billing_portal_url,
        )
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    actions = []
    if found.payment_url and found.kind != "none":
        actions.append(LoginBannerAction(type="update_payment_method", url=found.payment_url))
    if found.can_retry:
        actions.append(
            LoginBannerAction(type="retry_payment", method="POST", path=f"/api/customers/{customer_id}/payment-retry")
        )
    return LoginBannerOut(
        kind=found.kind,
        message=found.message,
        next_retry_at=found.next_retry_at,
        attempts_left=found.attempts_left,
        failure_reason=found.failure_reason,
        decline_code=found.decline_code,
        actions=actions,
    )


@router.post(
    "/api/customers/{customer_id}/payment-retry",
    response_model=RetryAcceptedOut,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[frontend],
    responses={409: {"description": "Nothing is owed"}, 429: {"description": "Retried too often; see Retry-After"}},
)
async def payment_retry(customer_id: Identifier, request: Request) -> RetryAcceptedOut:
    broker = broker_or_503(request)
    try:
        attempt_ids = await payments.request_retry_now(
            lambda: uow(request), customer_id, now(request), request.app.state.settings.dunning
        )
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    except NothingOwed as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except RetryLimited as error:
        seconds = int(error.retry_after.total_seconds()) + 1
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS, str(error), headers={"Retry-After": str(seconds)}
        ) from None
    try:
        await asyncio.to_thread(enqueue_charges, broker, attempt_ids)
    except Exception as error:  # the attempts are stored: collect_payments charges them within minutes
        log.warning("charge_enqueue_failed", customer_id=customer_id, error=str(error))
    return RetryAcceptedOut(attempts=len(attempt_ids))
