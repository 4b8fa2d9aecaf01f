"""The Redis broker: a real Redis server, or an in-process fakeredis (with Lua) for the embedded default."""

from __future__ import annotations

import fakeredis
from dramatiq.brokers.redis import RedisBroker

from infra.settings import Settings

#: One in-process Redis per process, so the producer and the workers of the embedded default meet.
_EMBEDDED_SERVER = fakeredis.FakeServer()


def redis_broker(settings: Settings, middleware: list | None = None) -> RedisBroker:
    """The real RedisBroker, over a real or in-process Redis. ``middleware=None`` keeps Dramatiq's defaults."""
    if settings.redis_url:
        return RedisBroker(url=settings.redis_url, middleware=middleware)
    return RedisBroker(client=fakeredis.FakeRedis(server=_EMBEDDED_SERVER), middleware=middleware)


def is_embedded(settings: Settings) -> bool:
    return not settings.redis_url
