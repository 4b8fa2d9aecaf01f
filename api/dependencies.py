"""What the API's routes take from the app: a unit of work, the clock's now, the broker to publish on."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import HTTPException, Request, status

from messages import Event, Publisher
from service_layer.unit_of_work import SqlUnitOfWork


def uow(request: Request, read_only: bool = False) -> SqlUnitOfWork:
    return SqlUnitOfWork(request.app.state.db, read_only=read_only)


def now(request: Request) -> datetime:
    return request.app.state.clock.now()


def broker_or_503(request: Request):
    # Webhooks and "retry now" hand work to the workers over the broker; without one (the
    # embedded default) no worker could receive it, so those routes answer 503 rather than lose it.
    if request.app.state.broker is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "no broker is set (BROKER_URL or REDIS_URL): nothing could relay this"
        )
    return request.app.state.broker


def publisher(request: Request):
    sender = Publisher(broker_or_503(request))

    async def publish(event: Event) -> None:
        await asyncio.to_thread(sender.publish, event)

    return publish
