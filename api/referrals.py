"""Referral routes: referrers and codes, rewards and payouts for admins, a referrer's own summary."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from api.auth import admin, frontend
from domain.referrals import ReferralRuleError, ReferrerDetails, ReferrerKind, normalize_code
from messages.events import NO_NUL
from service_layer import payouts, referral_views, referrals
from service_layer.unit_of_work import SqlUnitOfWork

MAX_ID = 2**63 - 1  # BIGINT: a larger number cannot name a row, and must not reach the database
Identifier = Annotated[str, Path(min_length=1, max_length=255, pattern=NO_NUL)]
Text255 = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)]
ReferralStatusName = Literal[
    "awaiting_payment", "pending", "approved", "in_payout", "paid", "rejected", "flagged", "voided"
]
PayoutStatusName = Literal["pending", "failed", "exported", "paid"]
PayoutMethod = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")]

router = APIRouter()


class ReferrerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    referrer_id: Text255
    kind: ReferrerKind
    name: Text255 | None = None
    email: Annotated[str, Field(max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")] | None = None
    phone: Annotated[str, Field(max_length=40, pattern=r"^[0-9+() .\-]+$")] | None = None
    payout_method: PayoutMethod = "manual"
    same_day: bool = False
    stripe_account_id: Annotated[str, Field(max_length=255, pattern=r"^acct_[A-Za-z0-9]+$")] | None = None
    payout_address: Text255 | None = None


class ReferrerPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    payout_method: PayoutMethod | None = None
    same_day: bool | None = None
    stripe_account_id: Annotated[str, Field(max_length=255, pattern=r"^acct_[A-Za-z0-9]+$")] | None = None
    payout_address: Text255 | None = None


class CodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    code: Annotated[str, Field(min_length=4, max_length=64, pattern=r"^[A-Za-z0-9\-]+$")] | None = None


class CodeOut(BaseModel):
    referrer_id: str
    code: str


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    admin: Text255
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=NO_NUL)] | None = None


class ReferenceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    external_reference: Text255


class HistoryOut(BaseModel):
    status: str
    at: datetime
    reason: str | None


class ReferralOut(BaseModel):
    id: int
    referred_customer_id: str
    referrer_id: str | None
    code: str | None
    status: str
    reason: str | None
    flags: list[str]
    reward_cents: int | None
    qualifying_payment_id: str | None
    submitted_at: datetime
    approve_after: datetime | None
    payout_id: int | None
    history: list[HistoryOut]


class ReferralsOut(BaseModel):
    total: int
    total_reward_cents: int
    referrals: list[ReferralOut]


class PayoutOut(BaseModel):
    id: int
    payee_id: str
    payee_name: str | None
    period: str
    method: str
    gateway: str
    amount_cents: int
    currency: str
    status: str
    external_reference: str | None
    payout_address: str | None
    attempts: int
    last_error: str | None
    created_at: datetime
    paid_at: datetime | None


class PayoutsOut(BaseModel):
    total: int
    total_cents: int
    payouts: list[PayoutOut]


class SummaryOut(BaseModel):
    referrer_id: str
    kind: str
    codes: list[dict]
    referrals_by_status: dict[str, int]
    paid_to_date_cents: int
    upcoming_cents: int
    clawbacks_pending_cents: int
    next_payout_date: date


@dataclass
class ListQuery:
    """The query parameters the admin lists share (their status is each list's own)."""

    payee: Annotated[str | None, Query(max_length=255, pattern=NO_NUL)] = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    format: Literal["json", "csv"] = "json"
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0

    def wanted(self, status_name: str | None) -> referral_views.ListFilter:
        return referral_views.ListFilter(status_name, self.payee, self.since, self.until, self.limit, self.offset)


def _uow(request: Request) -> SqlUnitOfWork:
    return SqlUnitOfWork(request.app.state.db)


def _now(request: Request) -> datetime:
    return request.app.state.clock.now()


def _csv(rows: list[dict], columns: list[str], filename: str) -> Response:
    text = referral_views.to_csv(rows, columns)
    return Response(text, media_type="text/csv", headers={"Content-Disposition": f'attachment; filename="{filename}"'})


# ---------------------------------------------------------------- referrers and codes


@router.post(
    "/api/admin/referrers",
    response_model=CodeOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[admin],
    responses={409: {"description": "The id is taken"}},
)
async def create_referrer(body: ReferrerIn, request: Request) -> CodeOut:
    try:
        code = await referrals.register_referrer(_uow(request), ReferrerDetails(**body.model_dump()))
    except referrals.ReferrerExists:
        raise HTTPException(status.HTTP_409_CONFLICT, f"referrer {body.referrer_id!r} exists") from None
    return CodeOut(referrer_id=body.referrer_id, code=code)


@router.patch("/api/admin/referrers/{referrer_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[admin])
async def update_referrer(referrer_id: Identifier, body: ReferrerPatch, request: Request) -> Response:
    async with _uow(request) as uow:
        found = await uow.referrals.update_referrer(referrer_id, **body.model_dump(exclude_unset=True))
        await uow.commit()
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no referrer {referrer_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/api/admin/referrers/{referrer_id}/codes",
    response_model=CodeOut,
    status_code=status.HTTP_201_CREATED,
    dependencies=[admin],
    responses={409: {"description": "The code is taken"}},
)
async def add_code(referrer_id: Identifier, body: CodeIn, request: Request) -> CodeOut:
    from sqlalchemy.exc import IntegrityError

    async with _uow(request) as uow:
        row = await uow.referrals.referrer_row(referrer_id)
        if row is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no referrer {referrer_id!r}")
        try:
            code = await uow.referrals.add_code(
                referrer_id, row.name or referrer_id, normalize_code(body.code) if body.code else None
            )
        except IntegrityError:
            raise HTTPException(status.HTTP_409_CONFLICT, "that code is taken") from None
        await uow.commit()
    return CodeOut(referrer_id=referrer_id, code=code)


@router.post("/api/admin/referral-codes/{code}/{action}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[admin])
async def set_code_active(code: Identifier, action: Literal["activate", "deactivate"], request: Request) -> Response:
    async with _uow(request) as uow:
        found = await uow.referrals.set_code_active(normalize_code(code), action == "activate", _now(request))
        await uow.commit()
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no code {code!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- rewards


@router.get(
    "/api/admin/referrals",
    response_model=ReferralsOut,
    dependencies=[admin],
    responses={200: {"content": {"text/csv": {}}}},
)
async def admin_referrals(
    request: Request,
    filters: Annotated[ListQuery, Depends()],
    status_: Annotated[ReferralStatusName | None, Query(alias="status")] = None,
):
    page = await referral_views.list_referrals(request.app.state.db, filters.wanted(status_))
    if filters.format == "csv":
        return _csv(page.rows, referral_views.REFERRAL_CSV_COLUMNS, "referrals.csv")
    return ReferralsOut(
        total=page.total, total_reward_cents=page.total_cents, referrals=[ReferralOut(**row) for row in page.rows]
    )


@router.post(
    "/api/admin/referrals/{referral_id}/{decision}",
    response_model=ReferralOut,
    dependencies=[admin],
    responses={409: {"description": "Not in a state that allows it"}},
)
async def decide(
    referral_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    decision: Literal["approve", "reject"],
    body: DecisionIn,
    request: Request,
) -> ReferralOut:
    try:
        await referrals.decide_flagged(
            _uow(request), referral_id, decision == "approve", body.admin, body.reason, _now(request)
        )
    except referrals.NotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no referral {referral_id}") from None
    except ReferralRuleError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    page = await referral_views.list_referrals(
        request.app.state.db, referral_views.ListFilter(limit=1), referral_id=referral_id
    )
    return ReferralOut(**page.rows[0])


# ---------------------------------------------------------------- payouts


@router.get(
    "/api/admin/payouts",
    response_model=PayoutsOut,
    dependencies=[admin],
    responses={200: {"content": {"text/csv": {}}}},
)
async def admin_payouts(
    request: Request,
    filters: Annotated[ListQuery, Depends()],
    status_: Annotated[PayoutStatusName | None, Query(alias="status")] = None,
):
    page = await referral_views.list_payouts(request.app.state.db, filters.wanted(status_))
    if filters.format == "csv":
        return _csv(page.rows, referral_views.PAYOUT_CSV_COLUMNS, "payouts.csv")
    return PayoutsOut(total=page.total, total_cents=page.total_cents, payouts=[PayoutOut(**row) for row in page.rows])


@router.post(
    "/api/admin/payouts/{payout_id}/reference",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[admin],
    responses={409: {"description": "Not an exported manual payout"}},
)
async def record_reference(
    payout_id: Annotated[int, Path(ge=1, le=MAX_ID)], body: ReferenceIn, request: Request
) -> Response:
    """Operations paid an exported payout by hand: record its reference; it is paid."""
    async with _uow(request) as uow:
        row = await uow.referrals.payout(payout_id, for_update=False)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no payout {payout_id}")
    if row.status != "exported":
        raise HTTPException(status.HTTP_409_CONFLICT, f"payout {payout_id} is {row.status}, not exported")
    await payouts.record_paid(lambda: _uow(request), payout_id, body.external_reference, _now(request))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- the referrer's own view


@router.get("/api/referrers/{referrer_id}/summary", response_model=SummaryOut, dependencies=[frontend])
async def summary(referrer_id: Identifier, request: Request) -> SummaryOut:
    found = await referral_views.referrer_summary(
        request.app.state.db, referrer_id, _now(request), request.app.state.settings.referrals.calendar
    )
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no referrer {referrer_id!r}")
    return SummaryOut(**vars(found))
