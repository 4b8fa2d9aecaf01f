"""Customers: find one by id or sign-up email; their credits, ledger history and the admin's actions.

Each action is a confirmed form carrying a key made when the form was rendered; the key is
the event's id, so a double click or a resend applies the action once (the second answers
"already done"). The actions are the same events the front end sends, applied at once under
the customer's lock (service_layer.adjustments.apply_admin_event).
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request, status
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, Field, ValidationError

from api.console.pages import back, form, parsed, render, require_admin
from api.ledger import csv_download, page_or_error
from api.schemas import Identifier
from domain.errors import DomainError
from messages import CreditsGifted, Event, MembershipFrozen, MembershipUnfrozen
from messages.events import MAX_CREDITS
from service_layer import adjustments, customer_views, holds, retention
from service_layer.apply import Outcome
from service_layer.errors import CustomerNotFound
from service_layer.unit_of_work import SqlUnitOfWork

router = APIRouter(include_in_schema=False)
Signed = [Depends(require_admin)]
KEY = Field(min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")
HISTORY_PAGE = 20


class KeyIn(BaseModel):
    idempotency_key: str = KEY


class AdjustIn(KeyIn):
    credits: int = Field(ge=-MAX_CREDITS, le=MAX_CREDITS)
    reason: str = Field(min_length=1, max_length=500, pattern=r"^[^\x00]*$")


class GiftIn(KeyIn):
    to_customer_id: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00]*$")
    credits: int = Field(ge=1, le=MAX_CREDITS)


class NoteIn(BaseModel):
    note: str = Field("", max_length=2000, pattern=r"^[^\x00]*$")


def customer_url(customer_id: str) -> str:
    return "/admin/customers/" + quote(customer_id, safe="")


@router.get("/admin/customers", dependencies=Signed)
async def find(request: Request, q: Annotated[str, Query(max_length=320, pattern=r"^[^\x00]*$")] = ""):
    wanted = q.strip()
    found = await customer_views.find_customers(request.app.state.db, wanted) if wanted else []
    if len(found) == 1 and found[0].customer_id == wanted:
        return RedirectResponse(customer_url(wanted), status_code=status.HTTP_303_SEE_OTHER)
    return await render(request, "customers.html", "Customers", q=wanted, found=found, customer_url=customer_url)


@router.get("/admin/customers/{customer_id}", dependencies=Signed)
async def customer(
    customer_id: Identifier, request: Request, cursor: Annotated[str | None, Query(max_length=200)] = None
):
    state = request.app.state
    try:
        view = await holds.credit_view(SqlUnitOfWork(state.db, read_only=True), customer_id, state.clock.now())
    except CustomerNotFound:
        return back(
            request, "/admin/customers?q=" + quote(customer_id, safe=""), f"No customer {customer_id!r}.", ok=False
        )
    history = await page_or_error(request, customer_id, cursor, HISTORY_PAGE)
    facts = await customer_views.customer_facts(state.db, customer_id)
    return await render(
        request,
        "customer.html",
        "Customers",
        view=view,
        facts=facts,
        history=history,
        cursor=cursor,
        now=state.clock.now(),
        url=customer_url(customer_id),
        held=sum(h.credits for h in view.holds),
    )


@router.get("/admin/customers/{customer_id}/ledger.csv", dependencies=Signed)
async def ledger_csv(customer_id: Identifier, request: Request):
    return await csv_download(request, customer_id)


@router.post("/admin/customers/{customer_id}/adjust")
async def adjust(customer_id: Identifier, request: Request, fields: Annotated[dict, Depends(form)]):
    wanted = parsed(AdjustIn, fields)
    if isinstance(wanted, str) or wanted.credits == 0:
        return back(
            request,
            customer_url(customer_id),
            f"Not adjusted: {wanted if isinstance(wanted, str) else 'credits must not be zero'}",
            ok=False,
        )
    state = request.app.state
    try:
        outcome = await adjustments.admin_adjustment(
            SqlUnitOfWork(state.db),
            state.settings.policy,
            adjustments.Adjustment(
                customer_id, wanted.credits, wanted.reason, "admin console", state.clock.now(), wanted.idempotency_key
            ),
        )
    except CustomerNotFound as error:
        return back(request, "/admin/customers", str(error), ok=False)
    return _said(request, customer_id, outcome, f"Adjusted by {wanted.credits:+d} credits.")


@router.post("/admin/customers/{customer_id}/note")
async def note(customer_id: Identifier, request: Request, fields: Annotated[dict, Depends(form)]):
    wanted = parsed(NoteIn, fields)
    if isinstance(wanted, str):
        return back(request, customer_url(customer_id), f"Note not saved: {wanted}", ok=False)
    saved = await retention.save_note(
        SqlUnitOfWork(request.app.state.db), customer_id, wanted.note, request.app.state.clock.now()
    )
    return back(
        request, customer_url(customer_id), "Note saved." if saved else f"No customer {customer_id!r}.", ok=saved
    )


@router.post("/admin/customers/{customer_id}/{action}")
async def membership(
    customer_id: Identifier,
    action: Annotated[str, Path(pattern="^(freeze|unfreeze|gift)$")],
    request: Request,
    fields: Annotated[dict, Depends(form)],
):
    model = GiftIn if action == "gift" else KeyIn
    wanted = parsed(model, fields)
    if isinstance(wanted, str):
        return back(request, customer_url(customer_id), f"Nothing done: {wanted}", ok=False)
    now = request.app.state.clock.now()
    common = {"event_id": f"admin-{action}:{wanted.idempotency_key}", "occurred_at": now, "customer_id": customer_id}
    try:
        event: Event = (
            CreditsGifted(**common, to_customer_id=wanted.to_customer_id, credits=wanted.credits)
            if isinstance(wanted, GiftIn)
            else (MembershipFrozen if action == "freeze" else MembershipUnfrozen)(**common)
        )
        outcome = await adjustments.apply_admin_event(
            SqlUnitOfWork(request.app.state.db), request.app.state.settings.policy, event
        )
    except ValidationError as error:
        return back(
            request, customer_url(customer_id), "Nothing done: " + "; ".join(e["msg"] for e in error.errors()), ok=False
        )
    except (DomainError, CustomerNotFound) as error:
        return back(request, customer_url(customer_id), f"Nothing done: {error}", ok=False)
    done = {"freeze": "Membership frozen.", "unfreeze": "Membership unfrozen."}.get(
        action
    ) or f"Gave {fields.get('credits')} credits to {fields.get('to_customer_id')}."
    return _said(request, customer_id, outcome, done)


def _said(request: Request, customer_id: str, outcome: Outcome, done: str):
    if outcome is Outcome.DUPLICATE:
        return back(request, customer_url(customer_id), "Already done: that form was sent before, and applied once.")
    if outcome is Outcome.IGNORED:
        return back(request, customer_url(customer_id), "Nothing to change (already so).")
    return back(request, customer_url(customer_id), done)
