"""Maps the Account aggregate to rows and back, explicitly (no ORM instrumentation of the domain)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import MappingProxyType

from sqlalchemy import bindparam, exists, func, insert, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import Account, Entry, Hold, HoldStatus, Lot, LotSource
from infra.db.account_statements import (
    LOCK_AND_LOAD,
    LOCK_AVAILABLE_AND_LOAD,
    WRITE,
    account_from_row,
    lock_parameters,
    write_parameters,
)
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


#: No ids for any customer (``lock_many``'s default ``payment_ids``).
NO_IDS: Mapping[str, Iterable[str]] = MappingProxyType({})

#: The customer row's part of the aggregate (the rest are its lots and holds).
CUSTOMER_STATE = (
    customers.c.overdraft,
    customers.c.credits_depleted_at,
    customers.c.frozen_since,
    customers.c.unfrozen_at,
)


class SqlAccountRepository:
    """On PostgreSQL a batch is locked and loaded in one statement and written in one
    (infra/db/account_statements.py); on the embedded SQLite, which has no row locks (a writer
    holds the whole database), through portable statements, a few per batch."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        self._postgres = connection.dialect.name == "postgresql"

    async def lock(
        self, customer_id: str, *, create: bool, job_ids: Iterable[str] = (), payment_ids: Iterable[str] = ()
    ) -> Account | None:
        """Load an account holding its row lock until the transaction ends (serialises its writers)."""
        accounts = await self.lock_many(
            [customer_id], {customer_id: job_ids}, {customer_id: payment_ids}, create=None if create else ()
        )
        return accounts[0] if accounts else None

    async def lock_many(
        self,
        customer_ids: Sequence[str],
        job_ids: Mapping[str, Iterable[str]],
        payment_ids: Mapping[str, Iterable[str]] = NO_IDS,
        wait_at_most: timedelta | None = None,
        create: Collection[str] | None = None,
    ) -> list[Account]:
        """Lock the accounts, in id order (two batches never deadlock), and load their live state.

        ``job_ids`` are the jobs whose earlier charges each account must know; ``payment_ids``
        the payments whose lots each account needs even when spent. ``create``: the ids that are
        created when missing (None: all); a missing id not in it is neither created nor returned.
        ``wait_at_most`` bounds the wait for a lock another transaction holds (PostgreSQL raises
        LockNotAvailable)."""
        customer_ids = sorted(set(customer_ids))
        creatable = customer_ids if create is None else sorted(set(create) & set(customer_ids))
        if self._postgres:
            parameters = lock_parameters(customer_ids, creatable, job_ids, payment_ids, wait_at_most)
            return await self._lock_and_load(LOCK_AND_LOAD, parameters)
        if creatable:
            insert = upsert_into(self.connection, customers).on_conflict_do_nothing()
            await self.connection.execute(insert, [{"customer_id": customer_id} for customer_id in creatable])
        accounts = await self._load_many(customer_ids)
        await self._load_charged_jobs(accounts, job_ids)
        await self._load_spent_payment_lots(accounts, payment_ids)
        return accounts

    async def _lock_and_load(self, statement: str, parameters: tuple) -> list[Account]:
        """Run a LOCK_AND_LOAD statement until every account it returns is fresh.

        An account is stale when a writer committed between the statement's snapshot and the
        moment we got its lock (we waited for it), or missing when another transaction created
        it meanwhile: the statement runs again for those, now with a snapshot taken after them.
        Uncontended, that is never."""
        ids, creatable, *rest = parameters
        accounts: dict[str, Account] = {}
        while ids:
            rows = (await self.connection.exec_driver_sql(statement, (ids, creatable, *rest))).all()
            returned = {row[0] for row in rows}
            accounts.update((row[0], account_from_row(row)) for row in rows if row[1])
            again = {row[0] for row in rows if not row[1]} | (set(creatable) - returned)
            ids = [customer_id for customer_id in ids if customer_id in again]
            creatable = [customer_id for customer_id in creatable if customer_id in again]
        return [accounts[customer_id] for customer_id in sorted(accounts)]

    async def get(self, customer_id: str) -> Account | None:
        """Load an account for reading, without a lock."""
        accounts = await self._load_many([customer_id])
        return accounts[0] if accounts else None

    async def lock_available(self, customer_ids: Sequence[str]) -> list[Account]:
        """Lock those of the given accounts no other transaction holds (for sweeps), and load them."""
        customer_ids = sorted(set(customer_ids))
        if self._postgres:
            return await self._lock_and_load(LOCK_AVAILABLE_AND_LOAD, lock_parameters(customer_ids, (), {}, {}, None))
        return await self._load_many(customer_ids)

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

    async def _load_charged_jobs(self, accounts: Sequence[Account], job_ids: Mapping[str, Iterable[str]]) -> None:
        """Which of the given jobs each account has already been charged for (one statement)."""
        pairs = [
            (account.customer_id, job_id) for account in accounts for job_id in job_ids.get(account.customer_id, ())
        ]
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

    async def _load_spent_payment_lots(
        self, accounts: Sequence[Account], payment_ids: Mapping[str, Iterable[str]]
    ) -> None:
        # Spent payment lots too: whether a payment issued credits, and what, is decided on them.
        pairs = [
            (account.customer_id, payment_id)
            for account in accounts
            for payment_id in payment_ids.get(account.customer_id, ())
        ]
        if not pairs:
            return
        rows = await self.connection.execute(
            select(credit_lots).where(
                tuple_(credit_lots.c.customer_id, credit_lots.c.payment_id).in_(pairs), credit_lots.c.remaining == 0
            )
        )
        by_id = {account.customer_id: account for account in accounts}
        for row in rows:
            by_id[row.customer_id].lots.append(_lot(row))

    async def _load_many(self, customer_ids: Sequence[str]) -> list[Account]:
        """Accounts for ``customer_ids`` in three statements, whatever their number (the portable path)."""
        if not customer_ids:
            return []
        rows = await self.connection.execute(
            select(customers.c.customer_id, *CUSTOMER_STATE).where(customers.c.customer_id.in_(customer_ids))
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
        for r in await self.connection.execute(
            select(holds).where(holds.c.customer_id.in_(customer_ids), HOLD_IS_ACTIVE)
        ):
            holds_of[r.customer_id][r.job_id] = Hold(
                r.job_id, r.credits, r.placed_at, r.expires_at, HoldStatus(r.status), r.closed_at, id=r.id
            )
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
        the customer rows — in one statement on PostgreSQL, one per kind of change elsewhere."""
        if not accounts:
            return
        lots = [(account, lot) for account in accounts for lot in _unique(account.changed_lots)]
        changed_holds = [(account, hold) for account in accounts for hold in _unique(account.changed_holds)]
        await (self._write if self._postgres else self._write_portable)(accounts, lots, changed_holds)
        for account in accounts:
            account.new_entries.clear()
            account.changed_lots.clear()
            account.changed_holds.clear()
            account.lots = [lot for lot in account.lots if lot.remaining > 0]
            account.holds = {job: hold for job, hold in account.holds.items() if hold.status is HoldStatus.ACTIVE}

    async def _write(self, accounts: Sequence[Account], lots: list, changed_holds: list) -> None:
        """The one write statement; new lots and holds get their ids from it."""
        writes = write_parameters(accounts, lots, changed_holds)
        new_ids = {
            (kind, position): new_id
            for kind, position, new_id in await self.connection.exec_driver_sql(WRITE, writes.parameters)
        }
        for kind, items in (("lot", writes.new_lots), ("hold", writes.new_holds)):
            for position, item in enumerate(items, start=1):
                item.id = new_ids[kind, position]

    async def _write_portable(self, accounts: Sequence[Account], lots: list, changed_holds: list) -> None:
        await self._insert_new(credit_lots, lots, lambda account, lot: lot_values(account.customer_id, lot))
        await self._update_each(
            credit_lots,
            [
                {
                    "id": lot.id,
                    "remaining": lot.remaining,
                    "reversed": lot.reversed,
                    "expired": lot.expired,
                    "expires_at": lot.expires_at,
                }
                for _, lot in lots
                if lot.id is not None
            ],
        )
        # Closed holds first: a job booked again after its hold lapsed (in memory, before the
        # sweep) would otherwise meet its old row still active in the one-active-hold index.
        await self._update_each(
            holds,
            [
                {"id": h.id, "status": h.status.value, "closed_at": h.closed_at}
                for _, h in changed_holds
                if h.id is not None
            ],
        )
        await self._insert_new(holds, changed_holds, lambda account, hold: hold_values(account.customer_id, hold))
        entries = [(account, entry) for account in accounts for entry in account.new_entries]
        if entries:
            entry_ids = await self._insert_returning_ids(
                ledger_entries, [entry_values(account.customer_id, entry) for account, entry in entries]
            )
            movements = [
                {"entry_id": entry_id, "lot_id": movement.lot.id, "credits": movement.credits}
                for entry_id, (_, entry) in zip(entry_ids, entries, strict=True)
                for movement in entry.movements
            ]
            if movements:
                await self.connection.execute(insert(lot_movements), movements)
        await self._update_each(
            customers, [{"customer_id": a.customer_id, **customer_values(a)} for a in accounts], updated_at=func.now()
        )

    async def _update_each(self, table, rows: list[dict], **fixed) -> None:
        """One UPDATE of ``table`` per row, in one executemany: each row's first key picks the row,
        the others are its new values (``fixed`` is set on every row)."""
        if not rows:
            return
        key, *columns = rows[0]
        statement = (
            update(table)
            .where(table.c[key] == bindparam(f"b_{key}"))
            .values({**{name: bindparam(f"b_{name}") for name in columns}, **fixed})
        )
        await self.connection.execute(statement, [{f"b_{name}": value for name, value in row.items()} for row in rows])

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


def hold_values(customer_id: str, hold: Hold) -> dict:
    """A hold's holds row (without its id)."""
    return {
        "customer_id": customer_id,
        "job_id": hold.job_id,
        "credits": hold.credits,
        "placed_at": hold.placed_at,
        "expires_at": hold.expires_at,
        "status": hold.status.value,
        "closed_at": hold.closed_at,
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
    return Lot(
        row.amount,
        row.remaining,
        row.issued_at,
        row.expires_at,
        LotSource(row.source),
        row.event_id,
        id=row.id,
        payment_id=row.payment_id,
        paid_cents=row.paid_cents,
        reversed=row.reversed,
        expired=row.expired,
    )


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
            upsert_into(self.connection, processed_events)
            .on_conflict_do_nothing()
            .returning(processed_events.c.event_id),
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
