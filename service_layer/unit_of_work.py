"""The PostgreSQL unit of work: one transaction, its repositories, commit or roll back (the port is in ports.py)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db import Database
from infra.db.notifications import SqlNotificationOutbox
from infra.db.payments import SqlDunningRepository, SqlStripeRepository
from infra.db.referrals import SqlReferralRepository
from infra.db.repository import SqlAccountRepository, SqlEventLog
from service_layer.ports import UnitOfWork, UnitOfWorkFactory

__all__ = ["SqlUnitOfWork", "UnitOfWork", "UnitOfWorkFactory"]


class SqlUnitOfWork:
    """Nothing is written unless ``commit()`` is called; leaving the block rolls back the rest."""

    def __init__(self, db: Database, *, read_only: bool = False) -> None:
        self.db = db
        #: A read-only unit of work reads one snapshot (REPEATABLE READ): the customer row,
        #: lots and holds are read by separate statements and must agree with each other.
        self.read_only = read_only
        self._connection: AsyncConnection | None = None

    async def __aenter__(self) -> SqlUnitOfWork:
        await self.db.acquire_writer()
        try:
            self._connection = await self.db.engine.connect()
            if self.read_only and not self.db.is_sqlite:
                await self._connection.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            await self._connection.begin()
        except BaseException:
            if self._connection is not None:
                await self._connection.close()
                self._connection = None
            self.db.release_writer()
            raise
        self.accounts = SqlAccountRepository(self._connection)
        self.events = SqlEventLog(self._connection)
        self.dunning = SqlDunningRepository(self._connection)
        self.stripe = SqlStripeRepository(self._connection)
        self.referrals = SqlReferralRepository(self._connection)
        self.notifications = SqlNotificationOutbox(self._connection)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._connection is not None
        try:
            if self._connection.in_transaction():
                await self._connection.rollback()
        finally:
            await self._connection.close()
            self._connection = None
            self.db.release_writer()

    async def commit(self) -> None:
        assert self._connection is not None
        await self._connection.commit()

    @property
    def connection(self) -> AsyncConnection:
        """For read models and small writes that need no repository (the admin page's notes)."""
        assert self._connection is not None
        return self._connection
