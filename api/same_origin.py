"""State-changing admin page requests must come from the admin page itself (no cross-site requests).

The session cookie is SameSite=Strict and data calls take JSON only; this is the third wall:
the browser's `Origin` (or, when a browser sends none, the origin of its `Referer`) must be
one of ADMIN_ALLOWED_ORIGINS, or, when that is unset, the host the request was sent to.
Anything else, or neither header, is refused with 403 before the route runs.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi import HTTPException, Request, status

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an http(s) URL or origin; None for anything else (e.g. "null")."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme]


def _allowed(request: Request) -> set[tuple[str, str, int]]:
    configured = request.app.state.settings.admin_allowed_origins
    if configured:
        return {origin for origin in map(origin_of, configured) if origin}
    host = request.headers.get("host", "")
    # Behind a TLS-terminating proxy the request arrives as http while the page is https.
    return {origin for scheme in {request.url.scheme, "https"} if (origin := origin_of(f"{scheme}://{host}"))}


def require_same_origin(request: Request) -> None:
    if request.method in SAFE_METHODS:
        return
    claimed = request.headers.get("origin")
    if claimed is None:
        claimed = request.headers.get("referer")
    if claimed is None or origin_of(claimed) not in _allowed(request):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "cross-origin request refused: send it from the admin page")
