"""Admin page sessions and sign-in attempt counters, in the database every web process shares."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import case, delete, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from infra.db.repository import upsert_into
from infra.db.tables import admin_sessions, admin_sign_in_attempts


class SqlAdminSessions:
    """Sessions by the hash of their cookie's id. A session is live while it was seen within
    ``idle`` and has not reached its ``expires_at``, and was made under the current admin token."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def open(self, session_hash: str, token_fingerprint: str, now: datetime, lifetime: timedelta) -> None:
        await self.connection.execute(
            insert(admin_sessions).values(
                session_hash=session_hash,
                token_fingerprint=token_fingerprint,
                created_at=now,
                last_seen_at=now,
                expires_at=now + lifetime,
            )
        )

    async def touch(self, session_hash: str, token_fingerprint: str, now: datetime, idle: timedelta) -> bool:
        """Whether the session is live; if it is, it counts as seen now (the idle clock restarts)."""
        found = await self.connection.execute(
            update(admin_sessions)
            .where(admin_sessions.c.session_hash == session_hash, *_live(token_fingerprint, now, idle))
            .values(last_seen_at=now)
            .returning(admin_sessions.c.session_hash)
        )
        return found.first() is not None

    async def is_live(self, session_hash: str, token_fingerprint: str, now: datetime, idle: timedelta) -> bool:
        """The same check without counting as activity (the live stream's periodic re-check)."""
        found = await self.connection.execute(
            select(admin_sessions.c.session_hash).where(
                admin_sessions.c.session_hash == session_hash, *_live(token_fingerprint, now, idle)
            )
        )
        return found.first() is not None

    async def close(self, session_hash: str) -> None:
        await self.connection.execute(delete(admin_sessions).where(admin_sessions.c.session_hash == session_hash))

    async def forget_dead(self, token_fingerprint: str, now: datetime, idle: timedelta) -> None:
        """Delete sessions that can never be used again (expired, idle, or of a rotated token)."""
        await self.connection.execute(
            delete(admin_sessions).where(
                or_(
                    admin_sessions.c.expires_at <= now,
                    admin_sessions.c.last_seen_at <= now - idle,
                    admin_sessions.c.token_fingerprint != token_fingerprint,
                )
            )
        )


def _live(token_fingerprint: str, now: datetime, idle: timedelta) -> tuple:
    return (
        admin_sessions.c.token_fingerprint == token_fingerprint,
        admin_sessions.c.last_seen_at > now - idle,
        admin_sessions.c.expires_at > now,
    )


class SqlSignInAttempts:
    """Fixed-window counters, one row per bucket (a client address, or everyone)."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def count(self, bucket: str, now: datetime, window: timedelta) -> tuple[int, datetime]:
        """Count one attempt in ``bucket``; returns the attempts in its current window and when that ends.

        One statement, so concurrent attempts (from any process) are each counted."""
        table = admin_sign_in_attempts
        statement = upsert_into(self.connection, table).values(bucket=bucket, window_ends=now + window, attempts=1)
        ended = table.c.window_ends <= now
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.bucket],
            set_={
                "attempts": case((ended, 1), else_=table.c.attempts + 1),
                "window_ends": case((ended, statement.excluded.window_ends), else_=table.c.window_ends),
            },
        ).returning(table.c.attempts, table.c.window_ends)
        attempts, window_ends = (await self.connection.execute(statement)).one()
        return attempts, window_ends

    async def forget_ended(self, now: datetime) -> None:
        """Drop counters whose window is over: the table holds only the buckets seen lately."""
        await self.connection.execute(delete(admin_sign_in_attempts).where(admin_sign_in_attempts.c.window_ends <= now))
