"""Engine construction and the start-up schema check."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class SchemaNotReady(SystemExit):
    """The database is not at the migration head: refuse to start."""


class Database:
    """One async engine. Create it on the event loop that will use it (asyncpg is loop-bound)."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = url
        parsed = make_url(url)
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
            event.listen(self.engine.sync_engine, "begin", _sqlite_begin_immediate)
        else:
            self.engine = create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
        self._writer: asyncio.Lock | None = None

    async def acquire_writer(self) -> None:
        """On SQLite, queue transactions here: SQLite has one writer, and its busy handler
        waits by sleeping, which would cost far more than the work. No-op on PostgreSQL,
        where row locks do the serialising."""
        if self.is_sqlite:
            if self._writer is None:
                self._writer = asyncio.Lock()
            await self._writer.acquire()

    def release_writer(self) -> None:
        if self._writer is not None and self._writer.locked():
            self._writer.release()

    @property
    def safe_url(self) -> str:
        return make_url(self.url).render_as_string(hide_password=True)

    def begin(self):
        """``async with db.begin() as conn``: one transaction, committed on success."""
        return self.engine.begin()

    def connect(self):
        return self.engine.connect()

    @asynccontextmanager
    async def alone(self, name: str) -> AsyncIterator[bool]:
        """``async with db.alone("pay_referrals") as alone``: False while another process holds ``name``.

        A PostgreSQL session advisory lock on a connection of its own, released when the block
        ends, or by the server when that connection dies (a crashed holder frees it). On
        SQLite there is one process: always True."""
        if self.is_sqlite:
            yield True
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        async with self.engine.connect() as connection:
            alone = (await connection.execute(select(func.pg_try_advisory_lock(key)))).scalar_one()
            try:
                yield alone
            finally:
                if alone:  # a session lock outlives transactions: give it back before the pool reuses the connection
                    await connection.execute(select(func.pg_advisory_unlock(key)))

    async def dispose(self) -> None:
        await self.engine.dispose()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_begin_immediate), not the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # WAL with synchronous=NORMAL survives an application crash; only an OS crash can lose the last commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin_immediate(connection) -> None:
    # SQLite has one writer. Taking the write lock at BEGIN makes concurrent transactions
    # queue on busy_timeout instead of failing when a reader later tries to write.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


async def current_revision(connection: AsyncConnection) -> str | None:
    return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())


def require_current_schema_now(url: str) -> None:
    """The same check from synchronous code (a process refusing to boot)."""

    async def check() -> None:
        db = Database(url)
        try:
            await require_current_schema(db)
        finally:
            await db.dispose()

    asyncio.run(check())


async def require_current_schema(db: Database) -> None:
    """Raise SchemaNotReady unless the database is migrated to head."""
    try:
        async with db.connect() as connection:
            current = await current_revision(connection)
    except SchemaNotReady:
        raise
    except Exception as error:  # unreachable database: say so plainly
        raise SchemaNotReady(f"cannot reach the database at {db.safe_url}: {error}") from None
    head = head_revision()
    if current != head:
        raise SchemaNotReady(
            f"database at {db.safe_url} is not migrated (at {current or 'an empty schema'}, "
            f"needs {head}): run `credits migrate` first"
        )
