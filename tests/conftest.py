"""Fixtures over the real services: a fresh PostgreSQL database and a private Redis database per run.

Nothing here skips: if PostgreSQL or Redis is unreachable the run fails, loudly.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest
import redis
from alembic import command
from sqlalchemy import text

from infra.db import Database
from infra.db.engine import alembic_config
from tests.support import (
    LEDGER_TABLES,
    BrokerUnderTest,
    WorkerProcesses,
    rabbitmq_reset,
    rabbitmq_vhost,
    start_worker_processes,
)

POSTGRES_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_SERVER_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
RABBITMQ_SERVER_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672")


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


#: Fixtures that start worker processes: a test taking one is ``slow`` (left out of ``make test-fast``).
SLOW_FIXTURES = frozenset({"start_workers"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def pg_url() -> str:
    """A database of its own for this test run, migrated to head, dropped at the end."""
    name = f"credits_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    url = f"{base}/{name}"
    command.upgrade(alembic_config(url), "head")
    yield url
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def empty_database() -> str:
    """A PostgreSQL database with no schema at all (never migrated), dropped after the test."""
    name = f"credits_unmigrated_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    base = POSTGRES_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    yield f"{base}/{name}"
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis logical database no concurrent test run is using (claimed in db 0), flushed."""
    admin = redis.Redis.from_url(f"{REDIS_SERVER_URL}/0")
    owner = uuid.uuid4().hex
    for index in range(1, 16):
        if admin.set(f"credits-tests:db:{index}", owner, nx=True, ex=3 * 3600):
            break
    else:
        raise RuntimeError("all Redis databases 1-15 are claimed by other test runs")
    url = f"{REDIS_SERVER_URL}/{index}"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()
    if admin.get(f"credits-tests:db:{index}") == owner.encode():
        admin.delete(f"credits-tests:db:{index}")


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """A RabbitMQ vhost of this run's own (127.0.0.1:5672, guest), deleted at the end."""
    vhost = f"credits-test-{uuid.uuid4().hex[:12]}"
    rabbitmq_vhost("add", vhost)
    yield f"{RABBITMQ_SERVER_URL}/{vhost}"
    rabbitmq_vhost("delete", vhost)


#: Every queue the workers declare (workers/actors.py).
BROKER_QUEUES = ("credit_events", "credit_payments", "credit_sweeps", "credit_notifications", "default")


@pytest.fixture(params=["redis", "rabbitmq"])
def message_broker(request, redis_url: str) -> BrokerUnderTest:
    """The delivery tests run on both brokers, each emptied before the test."""
    if request.param == "redis":
        redis.Redis.from_url(redis_url).flushdb()
        return BrokerUnderTest("redis", redis_url)
    url = request.getfixturevalue("rabbitmq_url")
    rabbitmq_reset(url, BROKER_QUEUES)
    return BrokerUnderTest("rabbitmq", url)


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
async def database(pg_url: str) -> Database:
    db = Database(pg_url)
    yield db
    await db.dispose()


@pytest.fixture
async def db(database: Database) -> Database:
    """The test database, emptied before the test."""
    async with database.begin() as connection:
        await connection.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
    return database


@pytest.fixture
def service_env(pg_url: str, redis_url: str) -> dict[str, str]:
    """Environment for processes under test: real PostgreSQL and Redis, short retry back-off."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url,
        EVENT_MIN_BACKOFF_MS="100",
        EVENT_MAX_BACKOFF_MS="2000",
        LOG_LEVEL="INFO",
        # The tests use fixed historical dates; the event-time window has tests of its own.
        EVENT_MAX_AGE_DAYS="36500",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def start_workers(service_env: dict[str, str], tmp_path: Path) -> Callable[..., WorkerProcesses]:
    """Start real `dramatiq workers.actors` processes; all are stopped after the test."""
    started: list[WorkerProcesses] = []

    def start(
        processes: int = 1, threads: int = 2, env: dict[str, str] | None = None, supervised: bool = False
    ) -> WorkerProcesses:
        log_path = tmp_path / f"workers-{len(started)}.log"
        workers = start_worker_processes(
            {**service_env, **(env or {})}, log_path, processes, threads, supervised=supervised
        )
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop()


@pytest.fixture
def fake_stripe():
    """A local fake Stripe server (tests/support/fake_stripe.py) for the real SDK."""
    from tests.support.fake_stripe import FakeStripe

    with FakeStripe(timeout_delay=2.5) as server:
        yield server


@pytest.fixture
def stripe_env(service_env: dict[str, str], fake_stripe) -> dict[str, str]:
    """`service_env` with the Stripe SDK pointed at the fake (a client timeout shorter than its delays)."""
    return {
        **service_env,
        "STRIPE_API_KEY": "sk_test_" + uuid.uuid4().hex[:12],
        "STRIPE_API_BASE": fake_stripe.url,
        "STRIPE_TIMEOUT_SECONDS": "1",
    }
