"""Writes replayed legacy members into the ledger: each member whole, with its idempotency records.

A group of members is one transaction. On PostgreSQL the rows go in with COPY (ids reserved
from the tables' own sequences first, so lots, entries and movements can refer to each
other); elsewhere (the embedded SQLite) through the live path's own `save_many`. Both write
the same rows: the column values come from the repository's mapping functions.
If a group fails, its members are written one per transaction, so one member's failure
never costs the others; a member that fails alone is reported, not retried.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

import asyncpg
from sqlalchemy import String, bindparam, func, insert, select, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from domain import Account
from domain.legacy import LegacyRow
from infra.db.engine import Database
from infra.db.repository import SqlAccountRepository, customer_values, entry_values, lot_values
from infra.db.tables import credit_lots, customers, ledger_entries, lot_movements, processed_events

#: Ids per IN list (SQLite allows 32,766 bound parameters per statement).
_IN_CHUNK = 5_000
_WRITE_ERRORS = (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError)


class Outcome(StrEnum):
    IMPORTED = "imported"
    #: Every row of the member was imported by an earlier run, with the same content.
    ALREADY_IMPORTED = "already imported"
    #: Left out: the customer exists already (live, or another membership maps to it).
    CUSTOMER_EXISTS = "customer exists"
    #: Left out: some of its rows were imported before, but the history now differs.
    HISTORY_CHANGED = "history changed"
    #: Left out: the database refused the member's rows.
    FAILED = "failed"

    @property
    def left_out(self) -> bool:
        return self in (Outcome.CUSTOMER_EXISTS, Outcome.HISTORY_CHANGED, Outcome.FAILED)


@dataclass
class ReplayedMember:
    membership_id: str
    customer_id: str
    rows: list[LegacyRow]
    account: Account

    def __post_init__(self) -> None:
        self._lots = list(self.account.lots)
        self._entries = list(self.account.new_entries)

    def rewind(self) -> None:
        """Back to the unsaved replay: a write attempt that rolled back leaves ids and cleared lists behind."""
        for lot in self._lots:
            lot.id = None
        self.account.lots = list(self._lots)
        self.account.changed_lots = list(self._lots)
        self.account.new_entries = list(self._entries)


@dataclass(frozen=True)
class Settled:
    outcome: Outcome
    reason: str | None = None


class LegacyLedgerWriter:
    def __init__(self, db: Database, *, use_copy: bool | None = None) -> None:
        self.db = db
        self.use_copy = (not db.is_sqlite) if use_copy is None else use_copy

    async def settle(self, members: Sequence[ReplayedMember], dry_run: bool) -> dict[str, Settled]:
        """What became of each member (by MembershipId). A dry run decides the same, writes nothing."""
        if dry_run:
            async with self.db.connect() as connection:
                return await _classify(connection, members)
        try:
            return await self._settle_together(members)
        except _WRITE_ERRORS as error:
            if len(members) == 1:
                return {members[0].membership_id: Settled(Outcome.FAILED, _first_line(error))}
        settled: dict[str, Settled] = {}
        for member in members:
            settled.update(await self.settle([member], dry_run=False))
        return settled

    async def _settle_together(self, members: Sequence[ReplayedMember]) -> dict[str, Settled]:
        await self.db.acquire_writer()
        try:
            async with self.db.begin() as connection:
                settled = await _classify(connection, members)
                new = [m for m in members if settled[m.membership_id].outcome is Outcome.IMPORTED]
                for member in new:
                    member.rewind()
                if new:
                    await (_copy(connection, new) if self.use_copy else _insert(connection, new))
            return settled
        finally:
            self.db.release_writer()


async def _classify(connection: AsyncConnection, members: Sequence[ReplayedMember]) -> dict[str, Settled]:
    """Which members an earlier run imported, which cannot be imported, and which are new."""
    seen = dict(
        await _present(
            connection,
            processed_events.c.event_id,
            [row.event_id for m in members for row in m.rows],
            processed_events.c.fingerprint,
        )
    )
    existing = {row[0] for row in await _present(connection, customers.c.customer_id, [m.customer_id for m in members])}
    settled: dict[str, Settled] = {}
    for member in members:
        settled[member.membership_id] = _settled(member, seen, existing)
        existing.add(member.customer_id)  # a later membership of the group mapped to it is refused too
    return settled


async def _present(connection: AsyncConnection, key, values: list[str], *columns) -> list[tuple]:
    """(key, *columns) of the rows whose key is among ``values``."""
    found: list[tuple] = []
    if connection.dialect.name == "postgresql":
        # One array parameter, however many values (an IN list would bind each one).
        query = select(key, *columns).where(key == func.any(bindparam("values", type_=ARRAY(String))))
        return [tuple(row) for row in await connection.execute(query, {"values": values})]
    for chunk in _chunked(values):
        found += [tuple(row) for row in await connection.execute(select(key, *columns).where(key.in_(chunk)))]
    return found


def _settled(member: ReplayedMember, seen: dict[str, str], existing: set[str]) -> Settled:
    imported_before = sum(1 for row in member.rows if row.event_id in seen) if seen else 0
    if imported_before:
        matching = sum(1 for row in member.rows if seen.get(row.event_id) == row.fingerprint)
        if matching == len(member.rows):
            return Settled(Outcome.ALREADY_IMPORTED)
        return Settled(
            Outcome.HISTORY_CHANGED,
            f"{imported_before} of its {len(member.rows)} rows were imported before ({matching} unchanged): its history differs from that import",
        )
    if member.customer_id in existing:
        return Settled(Outcome.CUSTOMER_EXISTS, f"customer {member.customer_id!r} already exists in credits")
    return Settled(Outcome.IMPORTED)


async def _insert(connection: AsyncConnection, members: Sequence[ReplayedMember]) -> None:
    """The live path's statements: a customer row, then `save_many` writes what the replay changed."""
    await connection.execute(insert(customers), [{"customer_id": member.customer_id} for member in members])
    await connection.execute(
        insert(processed_events), [_processed(member, row) for member in members for row in member.rows]
    )
    await SqlAccountRepository(connection).save_many([member.account for member in members])


async def _copy(connection: AsyncConnection, members: Sequence[ReplayedMember]) -> None:
    """The same rows as `_insert`, by COPY: a few statements per group, whatever its size."""
    lots = [(member, lot) for member in members for lot in member.account.lots]
    entries = [(member, entry) for member in members for entry in member.account.new_entries]
    for (_, lot), lot_id in zip(lots, await _reserve_ids(connection, "credit_lots", len(lots)), strict=True):
        lot.id = lot_id
    entry_ids = await _reserve_ids(connection, "ledger_entries", len(entries))
    driver = (await connection.get_raw_connection()).driver_connection
    await _copy_rows(driver, customers, [{"customer_id": m.customer_id, **customer_values(m.account)} for m in members])
    await _copy_rows(driver, credit_lots, [{"id": lot.id, **lot_values(m.customer_id, lot)} for m, lot in lots])
    await _copy_rows(
        driver,
        ledger_entries,
        [
            {"id": entry_id, **entry_values(m.customer_id, e)}
            for entry_id, (m, e) in zip(entry_ids, entries, strict=True)
        ],
    )
    # The narrow tables as tuples straight away: millions of rows, no mapping function to share.
    movements = [
        (entry_id, movement.lot.id, movement.credits)
        for entry_id, (_, entry) in zip(entry_ids, entries, strict=True)
        for movement in entry.movements
    ]
    await _copy_tuples(driver, lot_movements, ("entry_id", "lot_id", "credits"), movements)
    # The JSON column takes the payload as JSON text through COPY.
    processed = [_processed_tuple(member, row) for member in members for row in member.rows]
    await _copy_tuples(driver, processed_events, _PROCESSED_COLUMNS, processed)


async def _reserve_ids(connection: AsyncConnection, table: str, count: int) -> list[int]:
    """``count`` new ids from the table's own sequence, ascending (as the live inserts would get them)."""
    if not count:
        return []
    query = text(f"SELECT nextval(pg_get_serial_sequence('{table}', 'id')) FROM generate_series(1, :count)")
    return sorted((await connection.execute(query, {"count": count})).scalars())


async def _copy_rows(driver, table, rows: list[dict]) -> None:
    # The dicts come from one mapping function each: their keys are in one order.
    if rows:
        await _copy_tuples(driver, table, tuple(rows[0]), [tuple(row.values()) for row in rows])


async def _copy_tuples(driver, table, columns: Sequence[str], records: list[tuple]) -> None:
    if records:
        await driver.copy_records_to_table(table.name, records=records, columns=list(columns))


_PROCESSED_COLUMNS = ("event_id", "event_type", "customer_id", "fingerprint", "payload")


def _processed(member: ReplayedMember, row: LegacyRow) -> dict:
    """The idempotency record of one old row (its payload is the row, as replayed)."""
    return dict(
        zip(
            _PROCESSED_COLUMNS,
            (row.event_id, row.event_type, member.customer_id, row.fingerprint, row.payload),
            strict=True,
        )
    )


def _processed_tuple(member: ReplayedMember, row: LegacyRow) -> tuple:
    """`_processed` for COPY: the payload as JSON text."""
    return (row.event_id, row.event_type, member.customer_id, row.fingerprint, row.payload_json)


def _chunked(items: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
