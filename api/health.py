"""Liveness and readiness for load balancers and supervisors.

``/healthz``: the process answers (restart it if not). ``/readyz``: it can do its work now —
PostgreSQL reachable and migrated to head, the broker reachable — else 503 with the reasons,
so a load balancer stops sending traffic while a dependency is down, without a restart.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from infra.db.engine import current_revision, head_revision
from infra.logging import scrub

router = APIRouter(include_in_schema=False)

#: A dependency that does not answer within this is as good as down for a readiness probe.
CHECK_TIMEOUT_SECONDS = 3.0


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    state = request.app.state
    checks = {"database": await _database(state.db), "broker": await _broker(state.broker)}
    reasons = [f"{name}: {problem}" for name, (ok, problem) in checks.items() if not ok]
    body = {
        "status": "not ready" if reasons else "ready",
        "checks": {name: problem or "ok" for name, (_, problem) in checks.items()},
    }
    if reasons:
        body["reasons"] = reasons
    return JSONResponse(body, status_code=503 if reasons else 200)


async def _database(db) -> tuple[bool, str | None]:
    """Reachable, and at the migration head (a restored old backup, a skipped `credits migrate`)."""
    if db is None:
        return False, "not open yet"
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            async with db.connect() as connection:
                current = await current_revision(connection)
    except Exception as error:  # any failure to answer is "not ready", with what it said
        return False, f"unreachable ({_said(error)})"
    head = head_revision()
    if current != head:
        return False, f"not migrated: at {current or 'an empty schema'}, needs {head} (run `credits migrate`)"
    return True, None


async def _broker(broker) -> tuple[bool, str | None]:
    if broker is None:
        # The embedded default: reads are served; webhooks and "retry now" answer 503 on their own.
        return True, "not configured (REDIS_URL unset): event-producing routes answer 503"
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            await asyncio.to_thread(_ping, broker)
    except Exception as error:
        return False, f"unreachable ({_said(error)})"
    return True, None


def _ping(broker) -> None:
    client = getattr(broker, "client", None)
    if client is not None:
        client.ping()  # Redis
    else:
        _ = broker.connection  # RabbitMQ: opens (or reuses) this thread's connection, raising if it cannot


def _said(error: BaseException) -> str:
    text = str(error) or f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
    return scrub(f"{type(error).__name__}: {text}"[:300])
