"""A throwaway PostgreSQL database for one benchmark run: created, migrated, dropped."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import asyncpg
from alembic import command

from infra.db.engine import alembic_config

#: A PostgreSQL database the benchmark may create databases from (trust auth on the machine).
ADMIN_DSN = os.environ.get("BENCH_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass(frozen=True)
class ScratchDatabase:
    name: str
    #: For asyncpg (seeding, raw SQL baselines).
    dsn: str
    #: For the project's Database and its workers (SQLAlchemy + asyncpg).
    url: str


@asynccontextmanager
async def scratch_database() -> AsyncIterator[ScratchDatabase]:
    """A new database at the schema's head, dropped on the way out (even after a failure)."""
    name = f"credits_bench_{uuid.uuid4().hex[:8]}"
    server = ADMIN_DSN.rsplit("/", 1)[0]
    scratch = ScratchDatabase(
        name, f"{server}/{name}", server.replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    )
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await asyncio.to_thread(command.upgrade, alembic_config(scratch.url), "head")
        yield scratch
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
