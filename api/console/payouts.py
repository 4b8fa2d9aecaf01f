"""Payouts: by period and status; the manual gateway's CSV; recording a reference; failures with their error."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from api import referrals as referral_routes
from api.console.pages import back, form, parsed, render, require_admin
from api.referrals import MAX_ID, PayoutStatusName, ReferenceIn
from service_layer import referral_views

router = APIRouter(include_in_schema=False)
Signed = [Depends(require_admin)]
PAGE = 50
STATUSES = get_args(PayoutStatusName)


@router.get("/admin/payouts", dependencies=Signed)
async def listing(
    request: Request,
    status: Annotated[PayoutStatusName | Literal[""] | None, Query()] = None,
    period: Annotated[str, Query(max_length=32, pattern=r"^[A-Za-z0-9\-]*$")] = "",
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
):
    db = request.app.state.db
    page = await referral_views.list_payouts(
        db, referral_views.ListFilter(status=status or None, period=period or None, limit=PAGE, offset=offset)
    )
    failed = await referral_views.list_payouts(db, referral_views.ListFilter(status="failed", limit=PAGE))
    exported = await referral_views.list_payouts(db, referral_views.ListFilter(status="exported", limit=1))
    return await render(
        request,
        "payouts.html",
        "Payouts",
        page=page,
        failed=failed,
        exported=exported.total,
        status=status or "",
        period=period,
        statuses=STATUSES,
        periods=await referral_views.payout_periods(db),
        offset=offset,
        size=PAGE,
    )


@router.get("/admin/payouts/manual.csv", dependencies=Signed)
async def manual_csv(request: Request):
    """What the manual gateway exported, for operations to pay by hand (the admin API's CSV)."""
    return await referral_routes.admin_payouts(
        request, referral_routes.ListQuery(format="csv", limit=10_000), "exported"
    )


@router.post("/admin/payouts/{payout_id}/reference")
async def record_reference(
    payout_id: Annotated[int, Path(ge=1, le=MAX_ID)], request: Request, fields: Annotated[dict, Depends(form)]
):
    wanted = parsed(ReferenceIn, fields)
    to = "/admin/payouts?status=exported"
    if isinstance(wanted, str):
        return back(request, to, f"Reference not recorded: {wanted}", ok=False)
    try:
        await referral_routes.record_reference(payout_id, wanted, request)
    except HTTPException as refused:
        return back(request, to, f"Reference not recorded: {refused.detail}", ok=False)
    return back(request, to, f"Payout {payout_id} recorded as paid ({wanted.external_reference}).")
