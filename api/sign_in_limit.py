"""How often anyone may try to sign in to the admin page: per client address, and in all.

Every attempt is counted before the token is even compared, in PostgreSQL, so the limit holds
across web processes and concurrent requests (each is counted by one atomic upsert). A client
past its address's limit is not counted in the overall one: one noisy address cannot use up
everyone's attempts. IPv6 clients are counted by their /64, which one host usually holds whole.
"""

from __future__ import annotations

import ipaddress
import math
from datetime import timedelta

from fastapi import Request

from infra.db.admin_sessions import SqlSignInAttempts
from service_layer.unit_of_work import SqlUnitOfWork

EVERYONE = "all"


def client_bucket(request: Request) -> str:
    host = request.client.host if request.client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"addr:{host[:50]}"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"addr:{address.ipv4_mapped}"
        return f"net:{ipaddress.ip_network(f'{address}/64', strict=False)}"
    return f"addr:{address}"


async def count_sign_in_attempt(request: Request) -> int | None:
    """Count this attempt: None if it is allowed, else how many seconds until it would be."""
    settings = request.app.state.settings
    now = request.app.state.session_clock.now()
    window = timedelta(minutes=settings.admin_sign_in_window_minutes)
    async with SqlUnitOfWork(request.app.state.db) as uow:
        attempts = SqlSignInAttempts(uow.connection)
        await attempts.forget_ended(now)
        refused_until = None
        for bucket, limit in (
            (client_bucket(request), settings.admin_sign_in_limit_per_address),
            (EVERYONE, settings.admin_sign_in_limit_total),
        ):
            made, window_ends = await attempts.count(bucket, now, window)
            if made > limit:
                refused_until = window_ends
                break
        await uow.commit()
    return None if refused_until is None else max(1, math.ceil((refused_until - now).total_seconds()))
