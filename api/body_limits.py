"""Request body limits: every route has one, enforced before anything reads past it.

A pure ASGI middleware, outside routing, sessions and authentication: a declared
``Content-Length`` over the route's limit is answered 413 before the body is read; a
chunked body is counted as it streams and refused the moment it passes the limit. Every
413 closes the connection, so the server stops reading; a chunked body the route never
read closes it too (uvicorn would otherwise read the rest to reuse the connection). After
a 413 a little more is read and dropped (``DRAIN_MAX_BYTES``, ``DRAIN_SECONDS``): a client
still sending then reads its 413 instead of a reset connection.
The limits, by route, are in ``limit_for``: the one place for the rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from infra.settings import Settings

CLOSE = {"Connection": "close"}
#: After a 413, what is still read and dropped, at most, before the connection closes.
#: Closing with a client's bytes unread makes the kernel reset the connection, and a client
#: that is still sending (most send the whole body before reading) sees the reset, not the
#: 413. Bounded in bytes and time, so a huge or a stalled upload is still cut off.
DRAIN_MAX_BYTES = 4 * 1024 * 1024
DRAIN_SECONDS = 2.0


def limit_for(settings: Settings) -> Callable[[str], int]:
    """Bytes of body each path may send: Stripe's events and the sign-in form differ from the JSON API."""
    special = {
        "/webhooks/stripe": settings.stripe_webhook_max_body_bytes,
        "/admin/login": settings.admin_login_max_body_bytes,
    }

    def limit(path: str) -> int:
        return special.get(path, settings.http_max_body_bytes)

    return limit


class BodyTooLarge(HTTPException):
    """Raised from ``receive``: FastAPI lets an HTTPException through its body parsing, so the
    app's own handler answers it (JSON); the middleware answers it if nothing else did."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"the request body is over {limit} bytes, this route's limit",
            headers=CLOSE,
        )


class BodyLimits:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(BodyTooLarge(limit), scope, receive, send)
            return
        guard = _BodyGuard(limit, receive, send, chunked="transfer-encoding" in headers)
        try:
            await self.app(scope, guard.receive, guard.send)
        except BodyTooLarge as error:
            if guard.response_started:
                raise
            await _refuse(error, scope, receive, send)


class _BodyGuard:
    """One request's body count, and its response's keep-alive."""

    def __init__(self, limit: int, receive: Receive, send: Send, chunked: bool) -> None:
        self.limit, self._receive, self._send, self.chunked = limit, receive, send, chunked
        self.received = 0
        self.complete = False
        self.response_started = False

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise BodyTooLarge(self.limit)
            self.complete = not message.get("more_body", False)
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
            headers = message.get("headers", [])
            if self.chunked and not self.complete and not any(name.lower() == b"connection" for name, _ in headers):
                # Unread, of unknown length: close rather than let the server read it all.
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await self._send(message)


async def _refuse(error: BodyTooLarge, scope: Scope, receive: Receive, send: Send) -> None:
    """The 413 is sent at once; the response ends after the client's remaining bytes are drained."""
    response = JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    await _drain(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive) -> None:
    drained = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while drained <= DRAIN_MAX_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                drained += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return  # a stalled client: the connection closes
