"""Maps the Account aggregate to rows and back, explicitly (no ORM instrumentation of the domain)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta

from sqlalchemy import bindparam, exists, func, insert, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import Account, Entry, Hold, HoldStatus, Lot, LotSource
from infra.db.tables import (
    ENTRY_IS_CHARGE,
    HOLD_IS_ACTIVE,
    LOT_IS_OPEN,
    credit_lots,
    customers,
    holds,
    ledger_entries,
    lot_movements,
    processed_events,
)
from messages import Event
from service_layer.errors import EventConflict

def upsert_into(connection: AsyncConnection, table):
    """An INSERT that takes ON CONFLICT clauses, in the connection's dialect."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


#: The customer row's part of the aggregate (the rest are its lots and holds).
CUSTOMER_STATE = (customers.c.overdraft, customers.c.credits_depleted_at, customers.c.frozen_since, customers.c.unfrozen_at)


class SqlAccountRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def lock(self, customer_id: str, *, create: bool, job_ids: Iterable[str] = (), payment_ids: Iterable[str] = ()) -> Account | None:
        """Load an account holding its row lock until the transaction ends (serialises its writers)."""
        if not create:
            return await self._load(customer_id, for_update=True, job_ids=job_ids, payment_ids=payment_ids)
        [account] = await self.lock_many([customer_id], {customer_id: job_ids}, {customer_id: payment_ids})
        return account

    async def lock_many(
        self,
        customer_ids: Sequence[str],
        job_ids: Mapping[str, Iterable[str]],
        payment_ids: Mapping[str, Iterable[str]] = {},
        wait_at_most: timedelta | None = None,
        create: Collection[str] | None = None,
    ) -> list[Account]:
        """Create-or-lock the accounts, in id order (two batches never deadlock), and load them.

        ``job_ids`` are the jobs whose earlier charges each account must know, ``payment_ids``
        the payments whose lots each loads even when spent. ``create``: the ids that may be
        created when missing (None: all); a missing id not in it is neither created nor returned. ``wait_at_most`` bounds
        the wait for a lock another transaction holds (PostgreSQL raises LockNotAvailable)."""
        customer_ids = sorted(set(customer_ids))
        if wait_at_most is not None and self.connection.dialect.name == "postgresql":
            await self.connection.execute(text(f"SET LOCAL lock_timeout = {int(wait_at_most.total_seconds() * 1000)}"))
        # One statement whatever the number (a multi-row VALUES list, which PostgreSQL takes in
        # order): ON CONFLICT DO UPDATE locks each existing row, in id order.
        upsert = upsert_into(self.connection, customers)
        upsert = upsert.on_conflict_do_update(
            index_elements=[customers.c.customer_id], set_={"customer_id": upsert.excluded.customer_id}
        ).returning(customers.c.customer_id, *CUSTOMER_STATE)
        rows = {}
        if create is not None:
            # Some may not be created: lock those that exist first, all in id order (locking
            # the created ones and then the others would cross another transaction's order).
            query = select(customers.c.customer_id, *CUSTOMER_STATE).where(customers.c.customer_id.in_(customer_ids))
            rows = {row.customer_id: row for row in await self.connection.execute(query.order_by(customers.c.customer_id).with_for_update())}
        created = [c for c in customer_ids if c not in rows and (create is None or c in create)]
        if created:
            rows |= {row.customer_id: row for row in await self.connection.execute(upsert, [{"customer_id": c} for c in created])}
        customer_ids = [c for c in customer_ids if c in rows]
        accounts = await self._load_many(customer_ids, rows)
        await self._load_charged_jobs(accounts, job_ids)
        for account in accounts:
            if payment_ids.get(account.customer_id):
                await self._load_spent_payment_lots(account, list(payment_ids[account.customer_id]))
        return accounts

    async def get(self, customer_id: str) -> Account | None:
        """Load an account for reading, without a lock."""
        return await self._load(customer_id, for_update=False, job_ids=())

    async def lock_available(self, customer_ids: Sequence[str]) -> list[Account]:
        """Lock those of the given accounts no other transaction holds (for sweeps)."""
        query = (
            select(customers.c.customer_id)
            .where(customers.c.customer_id.in_(sorted(set(customer_ids))))
            .order_by(customers.c.customer_id)
            .with_for_update(skip_locked=True)
        )
        locked = (await self.connection.execute(query)).scalars().all()
        return await self._load_many(locked)

    async def customers_with_due_lots(self, now: datetime, limit: int, exclude: Iterable[str] = ()) -> list[str]:
        return await self._customers_due(credit_lots, LOT_IS_OPEN, now, limit, exclude)

    async def customers_with_due_holds(self, now: datetime, limit: int, exclude: Iterable[str] = ()) -> list[str]:
        return await self._customers_due(holds, HOLD_IS_ACTIVE, now, limit, exclude)

    async def _customers_due(self, table, is_open, now: datetime, limit: int, exclude: Iterable[str]) -> list[str]:
        """Customers owning the ``limit`` earliest open rows of ``table`` due by ``now`` (index-ordered).

        Frozen customers are left out: nothing of theirs expires until they are unfrozen."""
        # NOT EXISTS probes each due row's customer by primary key; a NOT IN over the frozen
        # customers scanned the whole customers table per batch (45 s a batch at 1,000,000).
        frozen = exists().where(customers.c.customer_id == table.c.customer_id, customers.c.frozen_since.is_not(None))
        query = select(table.c.customer_id).where(is_open, table.c.expires_at <= now, ~frozen)
        exclude = list(exclude)
        if exclude:
            query = query.where(table.c.customer_id.not_in(exclude))
        query = query.order_by(table.c.expires_at).limit(limit)
        return list(dict.fromkeys((await self.connection.execute(query)).scalars()))

    async def _load(
        self, customer_id: str, *, for_update: bool, job_ids: Iterable[str], payment_ids: Iterable[str] = ()
    ) -> Account | None:
        query = select(*CUSTOMER_STATE).where(customers.c.customer_id == customer_id)
        if for_update:
            query = query.with_for_update()
        customer_row = (await self.connection.execute(query)).first()
        if customer_row is None:
            return None
        [account] = await self._load_many([customer_id], {customer_id: customer_row})
        await self._load_charged_jobs([account], {customer_id: job_ids})
        payment_ids = list(payment_ids)
        if payment_ids:
            await self._load_spent_payment_lots(account, payment_ids)
        return account

    async def _load_charged_jobs(self, accounts: Sequence[Account], job_ids: Mapping[str, Iterable[str]]) -> None:
        """Which of the given jobs each account has already been charged for (one statement)."""
        pairs = [(account.customer_id, job_id) for account in accounts for job_id in job_ids.get(account.customer_id, ())]
        if not pairs:
            return
        rows = await self.connection.execute(
            select(ledger_entries.c.customer_id, ledger_entries.c.job_id).where(
                tuple_(ledger_entries.c.customer_id, ledger_entries.c.job_id).in_(pairs), ENTRY_IS_CHARGE
            )
        )
        by_id = {account.customer_id: account for account in accounts}
        for row in rows:
            by_id[row.customer_id].charged_jobs.add(row.job_id)

    async def _load_spent_payment_lots(self, account: Account, payment_ids: list[str]) -> None:
        # Spent payment lots too: whether a payment issued credits, and what, is decided on them.
        rows = await self.connection.execute(
            select(credit_lots).where(
                credit_lots.c.customer_id == account.customer_id, credit_lots.c.payment_id.in_(payment_ids), credit_lots.c.remaining == 0
            )
        )
        account.lots += [_lot(row) for row in rows]

    async def _load_many(self, customer_ids: Sequence[str], customer_rows: dict | None = None) -> list[Account]:
        """Accounts for ``customer_ids`` in three statements, whatever their number (sweeps load batches)."""
        if not customer_ids:
            return []
        if customer_rows is None:
            rows = await self.connection.execute(
                select(customers.c.customer_id, *CUSTOMER_STATE).where(
                    customers.c.customer_id.in_(customer_ids)
                )
            )
            customer_rows = {row.customer_id: row for row in rows}
        lots_of: dict[str, list[Lot]] = {customer_id: [] for customer_id in customer_ids}
        lot_rows = await self.connection.execute(
            select(credit_lots)
            .where(credit_lots.c.customer_id.in_(customer_ids), LOT_IS_OPEN)
            .order_by(credit_lots.c.expires_at, credit_lots.c.issued_at, credit_lots.c.id)
        )
        for r in lot_rows:
            lots_of[r.customer_id].append(_lot(r))
        holds_of: dict[str, dict[str, Hold]] = {customer_id: {} for customer_id in customer_ids}
        for r in await self.connection.execute(select(holds).where(holds.c.customer_id.in_(customer_ids), HOLD_IS_ACTIVE)):
            holds_of[r.customer_id][r.job_id] = Hold(r.job_id, r.credits, r.placed_at, r.expires_at, HoldStatus(r.status), r.closed_at, id=r.id)
        return [
            Account(
                customer_id=customer_id,
                lots=lots_of[customer_id],
                holds=holds_of[customer_id],
                overdraft=customer_rows[customer_id].overdraft,
                depleted_at=customer_rows[customer_id].credits_depleted_at,
                frozen_since=customer_rows[customer_id].frozen_since,
                unfrozen_at=customer_rows[customer_id].unfrozen_at,
            )
            for customer_id in customer_ids
            if customer_id in customer_rows
        ]

    async def save(self, account: Account) -> None:
        await self.save_many([account])

    async def save_many(self, accounts: Sequence[Account]) -> None:
        """Write what changed in ``accounts``: new lots and holds, updated ones, the new entries and
        the customer rows — one statement per kind of change, however many accounts."""
        conn = self.connection
        lots = [(account, lot) for account in accounts for lot in _unique(account.changed_lots)]
        stored_lots = [lot for _, lot in lots if lot.id is not None]
        await self._insert_new(
            credit_lots,
            lots,
            lambda account, lot: lot_values(account.customer_id, lot),
        )
        if stored_lots:
            await conn.execute(
                update(credit_lots)
                .where(credit_lots.c.id == bindparam("lot_id"))
                .values(
                    remaining=bindparam("new_remaining"),
                    reversed=bindparam("new_reversed"),
                    expired=bindparam("new_expired"),
                    expires_at=bindparam("new_expires_at"),
                ),
                [
                    {"lot_id": lot.id, "new_remaining": lot.remaining, "new_reversed": lot.reversed, "new_expired": lot.expired, "new_expires_at": lot.expires_at}
                    for lot in stored_lots
                ],
            )

        changed_holds = [(account, hold) for account in accounts for hold in _unique(account.changed_holds)]
        stored_holds = [hold for _, hold in changed_holds if hold.id is not None]
        # Closed holds first: a job booked again after its hold lapsed (in memory, before the
        # sweep) would otherwise meet its old row still active in the one-active-hold index.
        if stored_holds:
            await conn.execute(
                update(holds).where(holds.c.id == bindparam("hold_id")).values(status=bindparam("new_status"), closed_at=bindparam("new_closed_at")),
                [{"hold_id": h.id, "new_status": h.status.value, "new_closed_at": h.closed_at} for h in stored_holds],
            )
        await self._insert_new(
            holds,
            changed_holds,
            lambda account, hold: {
                "customer_id": account.customer_id,
                "job_id": hold.job_id,
                "credits": hold.credits,
                "placed_at": hold.placed_at,
                "expires_at": hold.expires_at,
                "status": hold.status.value,
                "closed_at": hold.closed_at,
            },
        )

        entries = [(account, entry) for account in accounts for entry in account.new_entries]
        if entries:
            entry_ids = await self._insert_returning_ids(
                ledger_entries,
                [entry_values(account.customer_id, entry) for account, entry in entries],
            )
            movements = [
                {"entry_id": entry_id, "lot_id": movement.lot.id, "credits": movement.credits}
                for entry_id, (_, entry) in zip(entry_ids, entries, strict=True)
                for movement in entry.movements
            ]
            if movements:
                await conn.execute(insert(lot_movements), movements)

        if accounts:
            await conn.execute(
                update(customers)
                .where(customers.c.customer_id == bindparam("account_id"))
                .values(
                    balance=bindparam("new_balance"),
                    overdraft=bindparam("new_overdraft"),
                    credits_depleted_at=bindparam("new_credits_depleted_at"),
                    frozen_since=bindparam("new_frozen_since"),
                    unfrozen_at=bindparam("new_unfrozen_at"),
                    updated_at=func.now(),
                ),
                [{"account_id": a.customer_id, **{f"new_{name}": value for name, value in customer_values(a).items()}} for a in accounts],
            )
        for account in accounts:
            account.new_entries.clear()
            account.changed_lots.clear()
            account.changed_holds.clear()
            account.lots = [lot for lot in account.lots if lot.remaining > 0]
            account.holds = {job: hold for job, hold in account.holds.items() if hold.status is HoldStatus.ACTIVE}


    async def _insert_new(self, table, items: list[tuple[Account, Lot | Hold]], row) -> None:
        """Insert the items that have no id yet, in one statement, and give each its new id."""
        new = [(account, item) for account, item in items if item.id is None]
        if new:
            ids = await self._insert_returning_ids(table, [row(account, item) for account, item in new])
            for (_, item), new_id in zip(new, ids, strict=True):
                item.id = new_id

    async def _insert_returning_ids(self, table, rows: list[dict]) -> list[int]:
        """Insert ``rows`` in one statement; their new ids, in the rows' order."""
        result = await self.connection.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
        return list(result.scalars())


def lot_values(customer_id: str, lot: Lot) -> dict:
    """A lot's credit_lots row (without its id)."""
    return {
        "customer_id": customer_id,
        "source": lot.source.value,
        "event_id": lot.event_id,
        "amount": lot.amount,
        "remaining": lot.remaining,
        "issued_at": lot.issued_at,
        "expires_at": lot.expires_at,
        "payment_id": lot.payment_id,
        "paid_cents": lot.paid_cents,
        "reversed": lot.reversed,
        "expired": lot.expired,
    }


def entry_values(customer_id: str, entry: Entry) -> dict:
    """An entry's ledger_entries row (without its id); its lots must have their ids."""
    return {
        "customer_id": customer_id,
        "kind": entry.kind.value,
        "credits": entry.credits,
        "balance_after": entry.balance_after,
        "overdraft_change": entry.overdraft_change,
        "occurred_at": entry.occurred_at,
        "event_id": entry.event_id,
        "job_id": entry.job_id,
        "lot_id": entry.movements[0].lot.id if entry.credits > 0 and entry.movements else None,
        "note": entry.note,
    }


def customer_values(account: Account) -> dict:
    """The customer row's state columns, as ``account`` leaves them."""
    return {
        "balance": account.book_balance,
        "overdraft": account.overdraft,
        "credits_depleted_at": account.depleted_at,
        "frozen_since": account.frozen_since,
        "unfrozen_at": account.unfrozen_at,
    }


def _lot(row) -> Lot:
    return Lot(row.amount, row.remaining, row.issued_at, row.expires_at, LotSource(row.source), row.event_id, id=row.id, payment_id=row.payment_id, paid_cents=row.paid_cents, reversed=row.reversed, expired=row.expired)


def _unique(items: list) -> list:
    """Each object once (by identity), in first-seen order: the domain notes a lot per movement."""
    return list({id(item): item for item in items}.values())


class SqlEventLog:
    """Which events have been applied: the idempotency record, written in the effect's transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def seen(self, event_id: str) -> bool:
        query = select(processed_events.c.event_id).where(processed_events.c.event_id == event_id)
        return (await self.connection.execute(query)).first() is not None

    async def claim(self, event: Event) -> bool:
        """True if the event is new (now recorded); False if this exact event was applied before.

        Raises EventConflict when the id was used for a different payload.
        """
        if event.event_id in await self.claim_new([event]):
            return True
        existing = (
            await self.connection.execute(
                select(processed_events.c.fingerprint).where(processed_events.c.event_id == event.event_id)
            )
        ).scalar_one()
        if existing != event.fingerprint():
            raise EventConflict(
                f"event_id {event.event_id!r} was already applied with a different payload; refusing to apply this one"
            )
        return False

    async def claim_new(self, events: Sequence[Event]) -> set[str]:
        """Record the events in one statement; the ids that were new (the others were seen before)."""
        inserted = await self.connection.execute(
            upsert_into(self.connection, processed_events).on_conflict_do_nothing().returning(processed_events.c.event_id),
            [
                {
                    "event_id": event.event_id,
                    "event_type": event.type,
                    "customer_id": event.customer_id,
                    "fingerprint": event.fingerprint(),
                    "payload": event.model_dump(mode="json"),
                }
                for event in events
            ],
        )
        return set(inserted.scalars())
