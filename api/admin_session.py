"""The admin page's session: a random id in a cookie, the session itself in the database.

The cookie carries nothing but 32 random bytes; the database keeps their SHA-256, when the
session was opened and last used, and the admin token's fingerprint. So signing out, an
idle timeout (ADMIN_SESSION_IDLE_MINUTES), the absolute limit (ADMIN_SESSION_MAX_HOURS) and
rotating ADMIN_API_TOKEN each end a session at once, in every web process.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from fastapi import HTTPException, Request, Response, status

from infra.clock import SystemClock
from infra.db.admin_sessions import SqlAdminSessions
from service_layer.unit_of_work import SqlUnitOfWork

COOKIE = "credits_admin"
#: What secrets.token_urlsafe(32) makes; anything else in the cookie is no session, unhashed.
_SESSION_ID = re.compile(r"[A-Za-z0-9_\-]{43}")


def install(app) -> None:
    # Session times are wall-clock times, whatever clock the ledger is given (tests move that one).
    app.state.session_clock = SystemClock()


def token_fingerprint(settings) -> str:
    """Keyed by the admin token: a session opened under another token never matches."""
    return hmac.new(
        settings.admin_api_token.get_secret_value().encode(), b"credits admin session", hashlib.sha256
    ).hexdigest()


class _Policy:
    def __init__(self, request: Request) -> None:
        settings = request.app.state.settings
        self.fingerprint = token_fingerprint(settings)
        self.idle = timedelta(minutes=settings.admin_session_idle_minutes)
        self.lifetime = timedelta(hours=settings.admin_session_max_hours)
        self.secure = settings.admin_cookie_secure
        self.now = request.app.state.session_clock.now()


def _session_hash(request: Request) -> str | None:
    value = request.cookies.get(COOKIE, "")
    return hashlib.sha256(value.encode()).hexdigest() if _SESSION_ID.fullmatch(value) else None


async def open_session(request: Request, response: Response) -> None:
    """Sign in: a new session (any the browser held is closed: no session survives a sign-in)."""
    policy, old = _Policy(request), _session_hash(request)
    session_id = secrets.token_urlsafe(32)
    async with SqlUnitOfWork(request.app.state.db) as uow:
        sessions = SqlAdminSessions(uow.connection)
        await sessions.forget_dead(policy.fingerprint, policy.now, policy.idle)
        if old is not None:
            await sessions.close(old)
        await sessions.open(
            hashlib.sha256(session_id.encode()).hexdigest(), policy.fingerprint, policy.now, policy.lifetime
        )
        await uow.commit()
    response.set_cookie(
        COOKIE,
        session_id,
        max_age=int(policy.lifetime.total_seconds()),
        path="/",
        secure=policy.secure,
        httponly=True,
        samesite="strict",
    )


async def close_session(request: Request, response: Response) -> None:
    """Sign out: the session is deleted, so the cookie opens nothing even if it was copied."""
    session_hash = _session_hash(request)
    if session_hash is not None:
        async with SqlUnitOfWork(request.app.state.db) as uow:
            await SqlAdminSessions(uow.connection).close(session_hash)
            await uow.commit()
    response.delete_cookie(COOKIE, path="/", secure=_Policy(request).secure, httponly=True, samesite="strict")


async def has_session(request: Request, *, activity: bool = True) -> bool:
    """Whether the request carries a live session; with ``activity`` it restarts the idle clock."""
    session_hash = _session_hash(request)
    if session_hash is None:
        return False
    policy = _Policy(request)
    async with SqlUnitOfWork(request.app.state.db, read_only=not activity) as uow:
        sessions = SqlAdminSessions(uow.connection)
        if not activity:
            return await sessions.is_live(session_hash, policy.fingerprint, policy.now, policy.idle)
        live = await sessions.touch(session_hash, policy.fingerprint, policy.now, policy.idle)
        await uow.commit()
    return live


async def signed_in(request: Request) -> None:
    """Dependency of every admin page route but the sign-in ones."""
    if not await has_session(request):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "sign in at /admin/login")
