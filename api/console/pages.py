"""What every console page shares: the signed-in check, templates with the navigation bar,
HTML forms (same origin only, bounded, one idempotency key per render) and one-shot messages.

Pages are rendered on the server; the only script is /admin/assets/console.js (the live
bubble, confirmations, one submit per form): no inline script or style, nothing from a CDN.
Every action is a form POST answered by a redirect back to its page (post/redirect/get),
with the outcome in a short-lived signed cookie read by the next render.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

from fastapi import HTTPException, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from itsdangerous import BadSignature, URLSafeTimedSerializer
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, ValidationError

from api.admin_session import has_session, token_fingerprint
from api.same_origin import require_same_origin
from service_layer import views

#: The navigation bar: exactly these labels, in this order.
NAV = (
    ("Retention", "/admin"),
    ("Customers", "/admin/customers"),
    ("Referrals", "/admin/referrals"),
    ("Payouts", "/admin/payouts"),
    ("Payments", "/admin/payments"),
    ("Analytics", "/admin/analytics"),
)
MAX_FORM_BYTES = 16_384
#: The one-shot message after a form (post/redirect/get): signed, read once, gone within a minute.
FLASH_COOKIE = "credits_flash"
FLASH_SECONDS = 60

templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _day(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d") if value else "—"


def _cents(value: int | None) -> str:
    return "—" if value is None else f"{value / 100:,.2f}"


templates.filters.update(when=_when, day=_day, cents=_cents)
# One key per form as rendered: a double click, or a resend, applies the action once.
templates.globals.update(
    nav=NAV,
    new_key=lambda: uuid.uuid4().hex,
    query=lambda **kw: urlencode({k: v for k, v in kw.items() if v not in (None, "")}),
)


async def require_admin(request: Request) -> None:
    """Pages and forms send a visitor without a live session (api/admin_session.py) to sign in."""
    if not await has_session(request):
        raise HTTPException(status.HTTP_303_SEE_OTHER, "sign in first", headers={"Location": "/admin/login"})


def _flash_signer(request: Request) -> URLSafeTimedSerializer:
    # Keyed by the admin token: a message cannot be forged, and rotating the token voids them.
    return URLSafeTimedSerializer(token_fingerprint(request.app.state.settings), salt="credits-console-flash")


def _take_flash(request: Request) -> dict | None:
    value = request.cookies.get(FLASH_COOKIE)
    if not value:
        return None
    try:
        return _flash_signer(request).loads(value, max_age=FLASH_SECONDS)
    except BadSignature:
        return None


async def render(request: Request, template: str, current: str, **context: Any) -> HTMLResponse:
    state = request.app.state
    flash = _take_flash(request)
    at_risk = await views.at_risk_count(state.db, state.clock.now(), state.settings.depleted_report_days)
    html = templates.get_template(template).render(
        current=current, at_risk=at_risk, days=state.settings.depleted_report_days, flash=flash, **context
    )
    response = HTMLResponse(html, headers={"Cache-Control": "no-store"})
    if FLASH_COOKIE in request.cookies:
        response.delete_cookie(FLASH_COOKIE, path="/admin")
    return response


def back(request: Request, to: str, text: str, ok: bool = True) -> RedirectResponse:
    """Answer a form: the outcome is shown once, on the page it returns to."""
    response = RedirectResponse(to, status_code=status.HTTP_303_SEE_OTHER)
    message = _flash_signer(request).dumps({"ok": ok, "text": text[:500]})
    secure = request.app.state.settings.admin_cookie_secure
    response.set_cookie(
        FLASH_COOKIE, message, max_age=FLASH_SECONDS, path="/admin", secure=secure, httponly=True, samesite="strict"
    )
    return response


async def form(request: Request) -> dict[str, str]:
    """A signed-in admin's same-origin HTML form, at most MAX_FORM_BYTES, as single values."""
    await require_admin(request)
    require_same_origin(request)  # the admin page's one rule for state-changing requests
    declared = request.headers.get("content-length", "")
    if not declared.isdigit() or int(declared) > MAX_FORM_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"forms are at most {MAX_FORM_BYTES} bytes")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "send a form")
    fields = await request.form(max_files=0, max_fields=20)
    return {key: value for key, value in fields.items() if isinstance(value, str)}


M = TypeVar("M", bound=BaseModel)


def parsed(model: type[M], fields: Mapping[str, str]) -> M | str:
    """The form as ``model``, or a sentence saying what is wrong with it."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v != "" and k in model.model_fields})
    except ValidationError as error:
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}" for e in error.errors())
