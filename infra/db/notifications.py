"""The notifications outbox: written in the transaction of what caused it, sent later."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.notifications import Notice
from infra.db.repository import upsert_into
from infra.db.tables import (
    NOTIFICATION_IS_PENDING,
    credit_lots,
    customer_profiles,
    customers,
    expiry_warnings,
    notifications,
)

#: The notices as arrays, each with the address its customer gave (a notice without one is kept,
#: as ``no_address``). One statement however many, without per-parameter processing.
ENQUEUE_MANY = """
INSERT INTO notifications (key, customer_id, kind, to_address, subject, body, created_at, status, send_after)
SELECT q.key, q.customer_id, q.kind, p.contact_email, q.subject, q.body, q.at,
       CASE WHEN coalesce(p.contact_email, '') <> '' THEN 'pending' ELSE 'no_address' END, q.at
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) WITH ORDINALITY AS q(key, customer_id, kind, subject, body, at, position)
LEFT JOIN customer_profiles p ON p.customer_id = q.customer_id
ORDER BY q.position
ON CONFLICT DO NOTHING
RETURNING key
"""


class SqlNotificationOutbox:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def enqueue(self, notice: Notice, now: datetime) -> bool:
        """Queue a notice once per key (False if its key was queued before)."""
        return notice.key in await self.enqueue_many([(notice, now)])

    async def enqueue_many(self, queued: Sequence[tuple[Notice, datetime]]) -> set[str]:
        """Queue each (notice, moment) once per key, in one statement however many (two on SQLite); the keys that were new."""
        if not queued:
            return set()
        if self.connection.dialect.name == "postgresql":
            columns = list(
                zip(*((n.key, n.customer_id, n.kind.value, n.subject, n.body, at) for n, at in queued), strict=True)
            )
            return set((await self.connection.exec_driver_sql(ENQUEUE_MANY, tuple(map(list, columns)))).scalars())
        # As the customer gave it: the normalised form (referral rules) may be another mailbox.
        emails = dict(
            (
                await self.connection.execute(
                    select(customer_profiles.c.customer_id, customer_profiles.c.contact_email).where(
                        customer_profiles.c.customer_id.in_({notice.customer_id for notice, _ in queued})
                    )
                )
            ).all()
        )
        rows = [
            {
                "key": notice.key,
                "customer_id": notice.customer_id,
                "kind": notice.kind.value,
                "to_address": emails.get(notice.customer_id),
                "subject": notice.subject,
                "body": notice.body,
                "created_at": now,
                "status": "pending" if emails.get(notice.customer_id) else "no_address",
                "send_after": now,
            }
            for notice, now in queued
        ]
        statement = upsert_into(self.connection, notifications).on_conflict_do_nothing().returning(notifications.c.key)
        return set((await self.connection.execute(statement, rows)).scalars())

    async def claim(self, now: datetime, lease: timedelta, limit: int) -> list:
        """Take due pending notifications for sending: marked `sending` (committed by the caller)
        before any is sent, so a crash mid-send is never followed by a second send."""
        query = (
            select(notifications)
            .where(NOTIFICATION_IS_PENDING, notifications.c.send_after <= now)
            .order_by(notifications.c.send_after, notifications.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = list(await self.connection.execute(query))
        if rows:
            await self.connection.execute(
                update(notifications)
                .where(notifications.c.id.in_([r.id for r in rows]))
                .values(status="sending", leased_until=now + lease, attempts=notifications.c.attempts + 1)
            )
        return rows

    async def finish(
        self,
        notification_id: int,
        status: str,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
        refused: bool = False,
    ) -> None:
        values: dict = {"status": status, "leased_until": None, "last_error": error}
        if refused:
            values["refusals"] = notifications.c.refusals + 1
        if status == "sent":
            values["sent_at"] = now
        if retry_at is not None:
            values["send_after"] = retry_at
        await self.connection.execute(
            update(notifications)
            .where(notifications.c.id == notification_id, notifications.c.status == "sending")
            .values(**values)
        )

    async def abandon_stale(self, now: datetime) -> int:
        """Sends whose worker died mid-way: whether the server got them is unknown, so they are
        marked uncertain and never sent again (at most once per key)."""
        result = await self.connection.execute(
            update(notifications)
            .where(notifications.c.status == "sending", notifications.c.leased_until < now)
            .values(status="uncertain", last_error="the sender stopped mid-send; not sent again")
        )
        return result.rowcount

    async def lots_expiring(self, now: datetime, until: datetime, limit: int) -> list:
        """Open lots expiring in (now, until] not yet warned about for that date, of customers not frozen."""
        warned = select(expiry_warnings.c.lot_id).where(
            expiry_warnings.c.lot_id == credit_lots.c.id, expiry_warnings.c.expires_at == credit_lots.c.expires_at
        )
        query = (
            select(credit_lots.c.id, credit_lots.c.customer_id, credit_lots.c.remaining, credit_lots.c.expires_at)
            .join(customers, customers.c.customer_id == credit_lots.c.customer_id)
            .where(
                credit_lots.c.remaining > 0,
                credit_lots.c.expires_at > now,
                credit_lots.c.expires_at <= until,
                customers.c.frozen_since.is_(None),
                ~warned.exists(),
            )
            .order_by(credit_lots.c.expires_at)
            .limit(limit)
        )
        return list(await self.connection.execute(query))

    async def mark_warned(self, lots: Sequence[tuple[int, datetime]], now: datetime) -> None:
        """Remember each (lot, expiry date) as warned about, in one statement."""
        if lots:
            await self.connection.execute(
                upsert_into(self.connection, expiry_warnings).on_conflict_do_nothing(),
                [{"lot_id": lot_id, "expires_at": expires_at, "warned_at": now} for lot_id, expires_at in lots],
            )
