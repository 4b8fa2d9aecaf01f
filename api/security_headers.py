"""Browser security headers on every response the web sends (pure ASGI: streams pass untouched).

The admin page is the only HTML we serve, and it needs nothing but our own files: no inline
script or style (they are in api/static, served at /admin/static), no frames, no other origin.
"""

from __future__ import annotations

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: The API docs (/docs, /redoc: Swagger UI and ReDoc, served by us from fastapi-offline's files)
#: start themselves with a small inline script and inline styles that FastAPI writes; those two
#: pages show only our own schema and take no input into their HTML, so they alone may run it.
API_DOCS_PATHS = ("/docs", "/redoc")
API_DOCS_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'none'; base-uri 'none'"
)
#: A year; only when the session cookie is Secure, i.e. the site is served over HTTPS.
#: Not includeSubDomains: the domain's other hosts are not ours to pin.
HSTS = "max-age=31536000"


def security_headers(hsts: bool, policy: str = CONTENT_SECURITY_POLICY) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-security-policy", policy.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        # Our own pages still send a Referer to us (the same-origin check's fallback); no one else gets one.
        (b"referrer-policy", b"same-origin"),
    ]
    if hsts:
        headers.append((b"strict-transport-security", HSTS.encode()))
    return headers


class SecurityHeaders:
    def __init__(self, app, *, hsts: bool) -> None:
        self.app = app
        self.headers = security_headers(hsts)
        self.docs_headers = security_headers(hsts, API_DOCS_POLICY)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        ours = self.docs_headers if scope["path"] in API_DOCS_PATHS else self.headers

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message = {
                    **message,
                    "headers": [*message.get("headers", []), *(h for h in ours if h[0] not in present)],
                }
            await send(message)

        await self.app(scope, receive, send_with_headers)
