"""Bearer tokens: one for the booking front end, one for admins; each route takes exactly one."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

_bearer = HTTPBearer(auto_error=False)


def _require_token(setting: str, *, optional: bool = False):
    def check(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
        token = getattr(request.app.state.settings, setting)
        if token is None and optional:
            return
        expected = token.get_secret_value()
        given = credentials.credentials if credentials else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    return Depends(check)


frontend = _require_token("frontend_api_token")
admin = _require_token("admin_api_token")
#: /metrics: the scraper's token when METRICS_TOKEN is set; open otherwise.
scraper = _require_token("metrics_token", optional=True)
