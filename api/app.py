"""HTTP entry point. Routes stay thin: authenticate, validate, call the service layer."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from domain import HoldConflict, InsufficientCredits, JobAlreadyCharged
from infra.clock import Clock, SystemClock
from infra.db import Database, require_current_schema
from infra.settings import Settings, SettingsError, get_settings
from messages.events import MAX_CREDITS
from service_layer import handlers, views
from service_layer.errors import CustomerNotFound
from service_layer.unit_of_work import SqlUnitOfWork

NO_NUL = r"^[^\x00]*$"
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
    can_schedule: bool


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    credits: int = Field(1, gt=0, le=MAX_CREDITS)


class DepletedCustomerOut(BaseModel):
    customer_id: str
    credits_depleted_at: datetime
    days_depleted: int


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


# ---------------------------------------------------------------- auth


_bearer = HTTPBearer(auto_error=False)


def _require_token(setting: str):
    def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        expected = getattr(request.app.state.settings, setting).get_secret_value()
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    return Depends(check)


frontend = _require_token("frontend_api_token")
admin = _require_token("admin_api_token")


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

    app = FastAPI(title="credits", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.clock = clock or SystemClock()
    app.state.db = db

    def uow(request: Request, read_only: bool = False) -> SqlUnitOfWork:
        return SqlUnitOfWork(request.app.state.db, read_only=read_only)

    def now(request: Request) -> datetime:
        return request.app.state.clock.now()

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
        except (HoldConflict, JobAlreadyCharged) as error:
            reason = "hold_conflict" if isinstance(error, HoldConflict) else "job_already_charged"
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
        offset: Annotated[int, Query(ge=0)] = 0,
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

    @app.get("/api/admin/at-risk-count", response_model=CountOut, dependencies=[admin])
    async def at_risk_count(request: Request) -> CountOut:
        return CountOut(count=await views.at_risk_count(request.app.state.db, now(request), settings.depleted_report_days))

    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory api.app:app_factory``."""
    from infra.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
