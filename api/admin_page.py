"""The retention admin page: sign in with the admin token, see who has run dry, follow them up.

The token is posted once from a form and never travels again: the session is a random id in
an HttpOnly, SameSite=Strict cookie, kept server-side (api/admin_session.py), so sign-out, an
idle timeout and a new admin token end it. Sign-in is rate-limited (api/sign_in_limit.py).
The bubble updates live by server-sent events (one long-lived GET the server answers with the
count whenever it changes; the browser's EventSource reconnects by itself). State-changing
calls must come from this origin (api/same_origin.py); data calls take JSON only, which a
cross-site form cannot send. Every response carries the security headers (api/security_headers.py).
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from datetime import datetime
from pathlib import Path as FilePath
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from api import admin_session
from api.admin_session import has_session, signed_in
from api.same_origin import require_same_origin
from api.schemas import Identifier
from api.security_headers import SecurityHeaders
from api.sign_in_limit import count_sign_in_attempt
from domain import MAX_CREDITS_PER_EVENT
from messages.events import NO_NUL
from service_layer import adjustments, retention, views
from service_layer.errors import CustomerNotFound
from service_layer.unit_of_work import SqlUnitOfWork

STATIC = FilePath(__file__).parent / "static"
PAGE = (STATIC / "admin.html").read_text()
LOGIN = (STATIC / "login.html").read_text()

router = APIRouter(include_in_schema=False)
STREAM_SECONDS = 300


def install_session(app, settings) -> None:
    """Sessions, the page's own script and styles, and the security headers on every response."""
    admin_session.install(app)
    app.mount("/admin/static", StaticFiles(directory=STATIC, html=False), name="admin-static")
    # HSTS only when the cookie is Secure: a plain-HTTP local setup must stay reachable.
    app.add_middleware(SecurityHeaders, hsts=settings.admin_cookie_secure)


def json_only(request: Request) -> None:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send JSON")


Session = Depends(signed_in)
SameOrigin = Depends(require_same_origin)


class NoteIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = Field(max_length=2000, pattern=NO_NUL)


class AdjustmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credits: int = Field(ge=-MAX_CREDITS_PER_EVENT, le=MAX_CREDITS_PER_EVENT)
    reason: str = Field(min_length=1, max_length=500, pattern=NO_NUL)
    idempotency_key: str = Field(min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")


@router.get("/admin/login", response_class=HTMLResponse)
async def login_page(request: Request) -> HTMLResponse:
    return HTMLResponse(LOGIN.replace("{{error}}", ""))


@router.post("/admin/login")
async def login(request: Request):
    wait = await count_sign_in_attempt(request)  # before anything is read or compared
    if wait is not None:
        refusal = f"Too many sign-in attempts: try again in {math.ceil(wait / 60)} minute(s)."
        return HTMLResponse(
            LOGIN.replace("{{error}}", refusal),
            status_code=status.HTTP_429_TOO_MANY_REQUESTS,
            headers={"Retry-After": str(wait)},
        )
    body = await request.body()  # at most ADMIN_LOGIN_MAX_BODY_BYTES (api.body_limits)
    form = parse_qs(body.decode("utf-8", "replace"))
    given = (form.get("token") or [""])[0]
    expected = request.app.state.settings.admin_api_token.get_secret_value()
    if not secrets.compare_digest(given.encode(), expected.encode()):
        return HTMLResponse(
            LOGIN.replace("{{error}}", "That token is not right."), status_code=status.HTTP_401_UNAUTHORIZED
        )
    response = RedirectResponse("/admin", status_code=status.HTTP_303_SEE_OTHER)
    await admin_session.open_session(request, response)
    return response


@router.post("/admin/logout", dependencies=[SameOrigin])
async def logout(request: Request):
    response = RedirectResponse("/admin/login", status_code=status.HTTP_303_SEE_OTHER)
    await admin_session.close_session(request, response)
    return response


@router.get("/admin", response_class=HTMLResponse)
async def page(request: Request):
    if not await has_session(request):
        return RedirectResponse("/admin/login", status_code=status.HTTP_303_SEE_OTHER)
    return HTMLResponse(PAGE.replace("{{days}}", str(request.app.state.settings.depleted_report_days)))


@router.get("/admin/data/at-risk", dependencies=[Session])
async def at_risk(request: Request) -> dict:
    days = request.app.state.settings.depleted_report_days
    total, rows = await retention.at_risk_customers(request.app.state.db, request.app.state.clock.now(), days)
    return {"days": days, "count": total, "customers": [{k: _plain(v) for k, v in vars(r).items()} for r in rows]}


@router.get("/admin/live", dependencies=[Session])
async def live(request: Request) -> StreamingResponse:
    """Server-sent events: `count` whenever the number of customers past the line changes."""
    state = request.app.state
    days, interval = state.settings.depleted_report_days, state.settings.admin_live_interval_seconds

    async def stream():
        last = None
        yield "retry: 2000\n\n"
        # The stream ends after a while and the browser reconnects: its session is checked again.
        ends = asyncio.get_running_loop().time() + STREAM_SECONDS
        while not await request.is_disconnected() and asyncio.get_running_loop().time() < ends:
            if not await has_session(request, activity=False):
                return  # signed out (or timed out) meanwhile: the browser's reconnection gets a 401
            count = await views.at_risk_count(state.db, state.clock.now(), days)
            if count != last:
                last = count
                yield f"event: count\ndata: {json.dumps({'count': count})}\n\n"
            else:
                yield ": keep-alive\n\n"
            await asyncio.sleep(interval)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


@router.post("/admin/data/customers/{customer_id}/note", dependencies=[Session, SameOrigin, Depends(json_only)])
async def note(customer_id: Identifier, body: NoteIn, request: Request) -> dict:
    saved = await retention.save_note(
        SqlUnitOfWork(request.app.state.db), customer_id, body.note, request.app.state.clock.now()
    )
    if not saved:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no customer {customer_id!r}")
    return {"customer_id": customer_id, "note": body.note}


@router.post("/admin/data/customers/{customer_id}/adjustments", dependencies=[Session, SameOrigin, Depends(json_only)])
async def adjust(customer_id: Identifier, body: AdjustmentIn, request: Request) -> dict:
    if body.credits == 0:
        raise HTTPException(422, "an adjustment must change the balance")
    settings = request.app.state.settings
    try:
        outcome = await adjustments.admin_adjustment(
            SqlUnitOfWork(request.app.state.db),
            settings.policy,
            adjustments.Adjustment(
                customer_id,
                body.credits,
                body.reason,
                "admin page",
                request.app.state.clock.now(),
                body.idempotency_key,
            ),
        )
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    return {"customer_id": customer_id, "credits": body.credits, "outcome": outcome.value}


def _plain(value):
    return value.isoformat() if isinstance(value, datetime) else value
