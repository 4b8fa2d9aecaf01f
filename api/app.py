"""HTTP entry point. Routes stay thin: authenticate, validate, call the service layer."""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Annotated, Literal

import asyncio
import math

import structlog
from fastapi import FastAPI, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import StatementError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain import HoldConflict, InsufficientCredits, JobAlreadyCharged, MembershipFrozen
from api import admin_page, console
from api import ledger as ledger_routes
from api import referrals as referral_routes
from api.auth import admin, frontend
from infra.broker import enqueue_charges, redis_broker
from infra.clock import Clock, SystemClock
from infra.db import Database, require_current_schema
from infra.settings import Settings, SettingsError, get_settings
from infra.stripe.webhooks import WebhookRejected, verify
from messages import Event, Publisher
from messages.events import MAX_CREDITS
from service_layer import analytics, handlers, payments, views, webhooks
from service_layer.errors import CustomerNotFound, NothingOwed, RetryLimited
from service_layer.unit_of_work import SqlUnitOfWork

log = structlog.get_logger("credits.api")

NO_NUL = r"^[^\x00]*$"
#: Stripe's events are a few kilobytes; an unauthenticated body is read no further than this.
MAX_WEBHOOK_BYTES = 1_000_000


async def _body_up_to(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"body over {limit} bytes")
    return bytes(body)
Identifier = Annotated[str, Path(min_length=1, max_length=255, pattern=NO_NUL)]


# ---------------------------------------------------------------- schemas


class LotOut(BaseModel):
    remaining: int
    issued_at: datetime
    expires_at: datetime


class HoldOut(BaseModel):
    job_id: str
    credits: int
    placed_at: datetime
    expires_at: datetime


class CreditsOut(BaseModel):
    customer_id: str
    balance: int
    available: int
    holds: list[HoldOut]
    lots: list[LotOut]
    credits_depleted_at: datetime | None
    frozen_since: datetime | None
    can_schedule: bool


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    credits: int = Field(1, gt=0, le=MAX_CREDITS)


class DepletedCustomerOut(BaseModel):
    customer_id: str
    credits_depleted_at: datetime
    days_depleted: int
    dunning_status: str | None
    attempts_made: int | None
    next_retry_at: datetime | None
    membership_status: str


class UnpaidInvoiceOut(BaseModel):
    customer_id: str
    invoice_id: str
    dunning_status: str
    first_failed_at: datetime
    attempts_made: int
    next_retry_at: datetime | None
    last_decline_code: str | None
    last_failure_message: str | None
    membership_status: str
    balance: int


class DunningReportOut(BaseModel):
    total: int
    limit: int
    offset: int
    next_offset: int | None
    invoices: list[UnpaidInvoiceOut]


class AdjustmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credits: int = Field(ge=-MAX_CREDITS, le=MAX_CREDITS)
    reason: str = Field(min_length=1, max_length=500, pattern=NO_NUL)
    admin: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    #: The same key on a retry applies the adjustment once (a timeout, a double click).
    idempotency_key: str | None = Field(None, min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")


class AdjustmentOut(BaseModel):
    customer_id: str
    credits: int
    outcome: str


class MonthOut(BaseModel):
    month: str
    issued: int
    used: int
    expired: int
    reversed: int
    adjusted_down: int
    outstanding: int
    breakage_rate: float | None


class UpcomingOut(BaseModel):
    month: str
    credits: int


class AnalyticsOut(BaseModel):
    months: list[MonthOut]
    upcoming_expirations: list[UpcomingOut]
    totals: dict[str, int]
    breakage_rate: float | None


class NoticeAction(BaseModel):
    type: Literal["update_payment_method", "retry_payment"]
    #: update_payment_method: the provider's hosted invoice page or billing portal.
    url: str | None = None
    #: retry_payment: the request the front end makes.
    method: str | None = None
    path: str | None = None


class NoticeOut(BaseModel):
    kind: Literal["none", "no_credits", "payment_failed", "action_required"]
    message: str
    next_retry_at: datetime | None = None
    attempts_left: int | None = None
    failure_reason: str | None = None
    decline_code: str | None = None
    actions: list[NoticeAction]


class RetryAcceptedOut(BaseModel):
    attempts: int


class StripeCustomerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: str = Field(min_length=1, max_length=255, pattern=NO_NUL)


class StripeCustomerOut(BaseModel):
    stripe_customer_id: str
    customer_id: str
    parked_events_relayed: int


class ParkedEventOut(BaseModel):
    event_id: str
    type: str
    stripe_customer_id: str | None
    received_at: datetime
    detail: str | None


class WebhookReceiptOut(BaseModel):
    outcome: str
    detail: str | None = None


class CreditsReportOut(BaseModel):
    days: int
    as_of: datetime
    total: int
    limit: int
    offset: int
    next_offset: int | None
    customers: list[DepletedCustomerOut]


class CountOut(BaseModel):
    count: int


# ---------------------------------------------------------------- app


def create_app(settings: Settings | None = None, *, clock: Clock | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.admin_api_token is None or settings.frontend_api_token is None:
        raise SettingsError("invalid configuration: ADMIN_API_TOKEN and FRONTEND_API_TOKEN must both be set to serve HTTP")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = db is None
        app.state.db = db or Database(settings.effective_database_url, pool_size=settings.db_pool_size)
        await require_current_schema(app.state.db)
        try:
            yield
        finally:
            if owned:
                await app.state.db.dispose()
            if app.state.broker is not None:
                app.state.broker.close()

    app = FastAPI(title="credits", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.clock = clock or SystemClock()
    app.state.db = db
    # Webhooks and "retry now" hand work to the workers over Redis; without REDIS_URL no
    # worker could receive it, so those routes answer 503 rather than accept and lose it.
    app.state.broker = redis_broker(settings, middleware=[]) if settings.redis_url else None

    def uow(request: Request, read_only: bool = False) -> SqlUnitOfWork:
        return SqlUnitOfWork(request.app.state.db, read_only=read_only)

    def now(request: Request) -> datetime:
        return request.app.state.clock.now()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI's own handler echoes the input back, and cannot serialise NaN or Infinity.
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(error.errors(), custom_encoder={float: _finite})})

    @app.exception_handler(OverflowError)
    async def _overflow(request: Request, error: OverflowError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": "a date or number is out of range"})

    @app.exception_handler(UnicodeEncodeError)
    async def _not_utf8(request: Request, error: UnicodeEncodeError) -> JSONResponse:
        # A lone surrogate ("\ud800") is valid JSON text but not storable text.
        return JSONResponse(status_code=422, content={"detail": "text must be valid Unicode (no lone surrogates)"})

    @app.exception_handler(StatementError)
    async def _statement_error(request: Request, error: StatementError) -> JSONResponse:
        if isinstance(error.orig, UnicodeEncodeError):
            return await _not_utf8(request, error.orig)
        if isinstance(error.orig, OverflowError):
            return await _overflow(request, error.orig)
        raise error

    app.include_router(referral_routes.router)
    app.include_router(ledger_routes.router)
    app.include_router(console.router)
    app.include_router(admin_page.router)
    admin_page.install_session(app, settings)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/customers/{customer_id}/credits", response_model=CreditsOut, dependencies=[frontend])
    async def get_credits(customer_id: Identifier, request: Request) -> CreditsOut:
        try:
            view = await handlers.credit_view(uow(request, read_only=True), customer_id, now(request))
        except CustomerNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        return CreditsOut(
            customer_id=view.customer_id,
            balance=view.balance,
            available=view.available,
            holds=[HoldOut(job_id=h.job_id, credits=h.credits, placed_at=h.placed_at, expires_at=h.expires_at) for h in view.holds],
            lots=[LotOut(remaining=lot.remaining, issued_at=lot.issued_at, expires_at=lot.expires_at) for lot in view.lots],
            credits_depleted_at=view.credits_depleted_at,
            frozen_since=view.frozen_since,
            can_schedule=view.can_schedule,
        )

    @app.post(
        "/api/customers/{customer_id}/holds",
        response_model=HoldOut,
        status_code=status.HTTP_201_CREATED,
        dependencies=[frontend],
        responses={200: {"description": "The same hold was already placed"}, 409: {"description": "Not enough credits, or a conflicting hold"}},
    )
    async def place_hold(customer_id: Identifier, body: HoldIn, request: Request, response: Response) -> HoldOut:
        try:
            hold, created = await handlers.place_hold(uow(request), settings.policy, customer_id, body.job_id, body.credits, now(request))
        except CustomerNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        except InsufficientCredits as error:
            return JSONResponse(
                status_code=status.HTTP_409_CONFLICT,
                content={"detail": str(error), "reason": "insufficient_credits", "available": error.available, "requested": error.wanted},
            )
        except (HoldConflict, JobAlreadyCharged, MembershipFrozen) as error:
            reason = {HoldConflict: "hold_conflict", JobAlreadyCharged: "job_already_charged", MembershipFrozen: "membership_frozen"}[type(error)]
            return JSONResponse(status_code=status.HTTP_409_CONFLICT, content={"detail": str(error), "reason": reason})
        if not created:
            response.status_code = status.HTTP_200_OK
        return HoldOut(job_id=hold.job_id, credits=hold.credits, placed_at=hold.placed_at, expires_at=hold.expires_at)

    @app.delete("/api/customers/{customer_id}/holds/{job_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[frontend])
    async def release_hold(customer_id: Identifier, job_id: Identifier, request: Request) -> Response:
        try:
            released = await handlers.release_hold(uow(request), customer_id, job_id, now(request))
        except CustomerNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        if not released:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no active hold for job {job_id!r}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.get("/api/admin/credits-report", response_model=CreditsReportOut, dependencies=[admin])
    async def credits_report(
        request: Request,
        days: Annotated[int, Query(ge=0, le=3650)] = settings.depleted_report_days,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
    ) -> CreditsReportOut:
        as_of = now(request)
        total, page = await views.depleted_customers(request.app.state.db, as_of, days, limit, offset)
        return CreditsReportOut(
            days=days,
            as_of=as_of,
            total=total,
            limit=limit,
            offset=offset,
            next_offset=offset + limit if offset + limit < total else None,
            customers=[DepletedCustomerOut(**vars(c)) for c in page],
        )

    def broker_or_503(request: Request):
        if request.app.state.broker is None:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "REDIS_URL is not set: nothing could relay this")
        return request.app.state.broker

    def publisher(request: Request):
        sender = Publisher(broker_or_503(request))

        async def publish(event: Event) -> None:
            await asyncio.to_thread(sender.publish, event)

        return publish

    @app.post(
        "/webhooks/stripe",
        response_model=WebhookReceiptOut,
        responses={400: {"description": "Not a genuine, fresh, well-formed Stripe event"}, 503: {"description": "Webhooks are not configured"}},
    )
    async def stripe_webhook(request: Request, stripe_signature: Annotated[str | None, Header()] = None) -> WebhookReceiptOut:
        secrets_ = [secret.get_secret_value() for secret in settings.stripe_webhook_secrets]
        if not secrets_:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "STRIPE_WEBHOOK_SECRETS is not set")
        publish = publisher(request)
        payload = await _body_up_to(request, MAX_WEBHOOK_BYTES)
        try:
            event = verify(payload, stripe_signature, secrets_, settings.stripe_webhook_tolerance_seconds)
        except WebhookRejected as error:
            log.warning("stripe_webhook_rejected", reason=str(error), bytes=len(payload))
            raise HTTPException(status.HTTP_400_BAD_REQUEST, str(error)) from None
        receipt = await webhooks.receive(uow(request), event, publish, settings.stripe_plan_credits, now(request))
        if receipt.linked_stripe_customer:
            try:
                await webhooks.relay_parked(lambda: uow(request), publish, settings.stripe_plan_credits, now(request), receipt.linked_stripe_customer)
            except Exception:  # the delivery is recorded; the parked events wait for an admin's relay
                log.exception("parked_relay_failed", stripe_customer_id=receipt.linked_stripe_customer)
        return WebhookReceiptOut(outcome=receipt.outcome, detail=receipt.detail)

    @app.get("/api/customers/{customer_id}/notice", response_model=NoticeOut, dependencies=[frontend])
    async def notice(customer_id: Identifier, request: Request) -> NoticeOut:
        try:
            found = await payments.notice_for(uow(request, read_only=True), customer_id, now(request), settings.dunning, settings.stripe_billing_portal_url)
        except CustomerNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        actions = []
        if found.payment_url and found.kind != "none":
            actions.append(NoticeAction(type="update_payment_method", url=found.payment_url))
        if found.can_retry:
            actions.append(NoticeAction(type="retry_payment", method="POST", path=f"/api/customers/{customer_id}/payment-retry"))
        return NoticeOut(
            kind=found.kind,
            message=found.message,
            next_retry_at=found.next_retry_at,
            attempts_left=found.attempts_left,
            failure_reason=found.failure_reason,
            decline_code=found.decline_code,
            actions=actions,
        )

    @app.post(
        "/api/customers/{customer_id}/payment-retry",
        response_model=RetryAcceptedOut,
        status_code=status.HTTP_202_ACCEPTED,
        dependencies=[frontend],
        responses={409: {"description": "Nothing is owed"}, 429: {"description": "Retried too often; see Retry-After"}},
    )
    async def payment_retry(customer_id: Identifier, request: Request) -> RetryAcceptedOut:
        broker = broker_or_503(request)
        try:
            attempt_ids = await payments.request_retry_now(lambda: uow(request), customer_id, now(request), settings.dunning)
        except CustomerNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        except NothingOwed as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        except RetryLimited as error:
            seconds = int(error.retry_after.total_seconds()) + 1
            raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(error), headers={"Retry-After": str(seconds)}) from None
        try:
            await asyncio.to_thread(enqueue_charges, broker, attempt_ids)
        except Exception as error:  # the attempts are stored: collect_payments charges them within minutes
            log.warning("charge_enqueue_failed", customer_id=customer_id, error=str(error))
        return RetryAcceptedOut(attempts=len(attempt_ids))

    @app.put("/api/admin/stripe-customers/{stripe_customer_id}", response_model=StripeCustomerOut, dependencies=[admin], responses={409: {"description": "Linked differently already"}})
    async def link_stripe_customer(stripe_customer_id: Identifier, body: StripeCustomerIn, request: Request) -> StripeCustomerOut:
        async with uow(request) as unit:
            linked = await unit.stripe.map_customer(stripe_customer_id, body.customer_id)
            await unit.commit()
        if linked != body.customer_id:
            raise HTTPException(status.HTTP_409_CONFLICT, f"{stripe_customer_id} is linked to another customer, or {body.customer_id!r} to another Stripe customer")
        relayed = await webhooks.relay_parked(lambda: uow(request), publisher(request), settings.stripe_plan_credits, now(request), stripe_customer_id)
        return StripeCustomerOut(stripe_customer_id=stripe_customer_id, customer_id=linked, parked_events_relayed=sum(1 for r in relayed if r.outcome != "parked"))

    @app.get("/api/admin/stripe-events/parked", response_model=list[ParkedEventOut], dependencies=[admin])
    async def parked_stripe_events(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[ParkedEventOut]:
        async with uow(request, read_only=True) as unit:
            rows = await unit.stripe.parked_events(limit=limit)
        return [ParkedEventOut(event_id=r.event_id, type=r.type, stripe_customer_id=r.stripe_customer_id, received_at=r.received_at, detail=r.detail) for r in rows]

    @app.post("/api/admin/stripe-events/parked/relay", response_model=list[WebhookReceiptOut], dependencies=[admin])
    async def relay_parked_stripe_events(request: Request) -> list[WebhookReceiptOut]:
        """After fixing the plan table, say: translate every parked event again."""
        receipts = await webhooks.relay_parked(lambda: uow(request), publisher(request), settings.stripe_plan_credits, now(request))
        return [WebhookReceiptOut(outcome=r.outcome, detail=r.detail) for r in receipts]

    @app.get("/api/admin/dunning-report", response_model=DunningReportOut, dependencies=[admin])
    async def dunning_report(
        request: Request,
        dunning_status: Annotated[
            Literal["retrying", "action_required", "needs_payment_method", "past_due", "recovered", "closed"] | None, Query(alias="status")
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
            invoices=[UnpaidInvoiceOut(**vars(row)) for row in page],
        )

    @app.post(
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
            outcome = await handlers.admin_adjustment(
                uow(request), settings.policy, customer_id, body.credits, body.reason, body.admin, now(request), body.idempotency_key
            )
        except CustomerNotFound as error:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        return AdjustmentOut(customer_id=customer_id, credits=body.credits, outcome=outcome.value)

    @app.get("/api/admin/credits/analytics", response_model=AnalyticsOut, dependencies=[admin])
    async def credits_analytics(request: Request, since: AwareDatetime | None = None, until: AwareDatetime | None = None) -> AnalyticsOut:
        """Issued, used, expired and outstanding credits per month (UTC), upcoming expirations, breakage."""
        for moment in (since, until):
            if moment is not None and not (2000 <= moment.year <= 2999 and 2000 <= moment.astimezone(timezone.utc).year <= 2999):
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

    @app.get("/api/admin/at-risk-count", response_model=CountOut, dependencies=[admin])
    async def at_risk_count(request: Request) -> CountOut:
        return CountOut(count=await views.at_risk_count(request.app.state.db, now(request), settings.depleted_report_days))

    return app


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def app_factory() -> FastAPI:
    """For ``uvicorn --factory api.app:app_factory``."""
    from infra.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
