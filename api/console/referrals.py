"""Referrals: the list by status; a flagged one shows its flags, and an admin approves or rejects it."""

from __future__ import annotations

from typing import Annotated, Literal, get_args
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, Field

from api.console.pages import back, form, parsed, render, require_admin
from api.referrals import MAX_ID, ReferralStatusName
from domain.referrals import ReferralRuleError
from service_layer import referral_views, referrals
from service_layer.unit_of_work import SqlUnitOfWork

router = APIRouter(include_in_schema=False)
PAGE = 50
STATUSES = get_args(ReferralStatusName)


class DecisionIn(BaseModel):
    reason: str | None = Field(None, max_length=500, pattern=r"^[^\x00]*$")
    status: ReferralStatusName | None = None  # the list the admin came from


@router.get("/admin/referrals", dependencies=[Depends(require_admin)])
async def listing(
    request: Request,
    status: Annotated[ReferralStatusName | Literal[""] | None, Query()] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
):
    page = await referral_views.list_referrals(
        request.app.state.db, referral_views.ListFilter(status=status or None, limit=PAGE, offset=offset)
    )
    return await render(
        request,
        "referrals.html",
        "Referrals",
        page=page,
        status=status or "",
        statuses=STATUSES,
        offset=offset,
        size=PAGE,
    )


@router.post("/admin/referrals/{referral_id}/{decision}")
async def decide(
    referral_id: Annotated[int, Path(ge=1, le=MAX_ID)],
    decision: Annotated[str, Path(pattern="^(approve|reject)$")],
    request: Request,
    fields: Annotated[dict, Depends(form)],
):
    wanted = parsed(DecisionIn, fields)
    to = "/admin/referrals"
    if isinstance(wanted, str):
        return back(request, to, f"Nothing done: {wanted}", ok=False)
    if wanted.status:
        to += "?" + urlencode({"status": wanted.status})
    try:
        await referrals.decide_flagged(
            SqlUnitOfWork(request.app.state.db),
            referral_id,
            decision == "approve",
            "admin console",
            wanted.reason,
            request.app.state.clock.now(),
        )
    except referrals.NotFound:
        return back(request, to, f"No referral {referral_id}.", ok=False)
    except ReferralRuleError as error:
        return back(request, to, f"Referral {referral_id} not changed: {error}", ok=False)
    return back(request, to, f"Referral {referral_id} {'approved' if decision == 'approve' else 'rejected'}.")
