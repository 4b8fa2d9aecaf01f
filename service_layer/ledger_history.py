"""A customer's ledger history, as the API and the admin console show it (a read model).

Entries are listed by (occurred_at, id): the event's time, as the ledger orders it, and the
id to break ties. Paging is a keyset on that pair, carried in an opaque cursor, so entries
written while someone pages (newer ones, or older ones an out-of-order event brings) never
shift the pages that follow: nothing already there is lost or shown twice.

The public kinds are the stored ones, except that a gift shows from each side
(``gifted`` −n is ``gift_sent``, +n ``gift_received``). Freezing and unfreezing write no
entry (they move no credits), so they have no kind here; the customer's ``frozen_since``
shows a pause. ``credits`` is the signed change to the balance; for the hold kinds, which
move no balance, the signed change to what is available (held −n, released and lapsed +n).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from infra.db import Database
from infra.db import ledger_history as rows
from service_layer.errors import CustomerNotFound

HOLD_KINDS = ("held", "released", "lapsed")
CSV_COLUMNS = ("at", "kind", "credits", "balance_after", "event_id", "note")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"^v1\.(-?\d{1,18})\.(\d{1,19})$")
MAX_ID = 2**63 - 1


class BadCursor(ValueError):
    """Not a cursor this service made."""


@dataclass(frozen=True)
class LotMoved:
    issued_at: datetime
    expires_at: datetime
    #: Signed like its entry: − drawn from the lot, + added to it.
    credits: int


@dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    kind: str
    credits: int
    balance_after: int
    note: str | None
    event_id: str
    lots: list[LotMoved]


@dataclass(frozen=True)
class HistoryPage:
    entries: list[HistoryEntry]
    next_cursor: str | None


def encode_cursor(at: datetime, entry_id: int) -> str:
    micros = (at - _EPOCH) // timedelta(microseconds=1)
    return base64.urlsafe_b64encode(f"v1.{micros}.{entry_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadCursor("not a ledger cursor") from None
    found = _CURSOR.match(raw)
    if found is None or not 1 <= int(found.group(2)) <= MAX_ID:
        raise BadCursor("not a ledger cursor")
    try:
        at = _EPOCH + timedelta(microseconds=int(found.group(1)))
    except OverflowError:
        raise BadCursor("not a ledger cursor") from None
    return at, int(found.group(2))


def public_kind(kind: str, credits: int) -> str:
    if kind == "gifted":
        return "gift_sent" if credits < 0 else "gift_received"
    return kind


def signed_credits(kind: str, credits: int) -> int:
    """The stored hold entries carry the held amount; show what they did to *available*."""
    return -credits if kind == "held" else credits


def _entry(row, moved: list) -> HistoryEntry:
    sign = -1 if row.credits < 0 else 1
    return HistoryEntry(
        at=row.occurred_at,
        kind=public_kind(row.kind, row.credits),
        credits=signed_credits(row.kind, row.credits),
        balance_after=row.balance_after,
        note=row.note,
        event_id=row.event_id,
        lots=[LotMoved(m.issued_at, m.expires_at, sign * m.credits) for m in moved],
    )


async def history_page(db: Database, customer_id: str, cursor: str | None, limit: int) -> HistoryPage:
    """One page of the customer's entries, newest first. Raises BadCursor, CustomerNotFound."""
    before = decode_cursor(cursor) if cursor else None
    async with db.connect() as connection:
        await _one_snapshot(db, connection)  # entries and their lots agree
        if not await rows.customer_exists(connection, customer_id):
            raise CustomerNotFound(customer_id)
        found = await rows.entries_before(connection, customer_id, before, limit + 1)
        page = found[:limit]
        moved = await rows.lots_moved(connection, [r.id for r in page])
    next_cursor = encode_cursor(page[-1].occurred_at, page[-1].id) if len(found) > limit else None
    return HistoryPage([_entry(r, moved.get(r.id, [])) for r in page], next_cursor)


async def require_customer(db: Database, customer_id: str) -> None:
    async with db.connect() as connection:
        if not await rows.customer_exists(connection, customer_id):
            raise CustomerNotFound(customer_id)


async def history_csv(db: Database, customer_id: str) -> AsyncIterator[str]:
    """The whole history, oldest first, as CSV text in chunks (a header, then a chunk per batch)."""
    yield _csv_lines([CSV_COLUMNS])
    async with db.connect() as connection:
        await _one_snapshot(db, connection)
        async with connection.begin():
            async for batch in rows.all_entries(connection, customer_id):
                yield _csv_lines([_csv_row(r) for r in batch])


async def _one_snapshot(db: Database, connection) -> None:
    if not db.is_sqlite:  # SQLite's one writer gives every read a snapshot anyway
        await connection.execution_options(isolation_level="REPEATABLE READ")


def _csv_row(row) -> tuple:
    return (
        row.occurred_at.isoformat(),
        public_kind(row.kind, row.credits),
        signed_credits(row.kind, row.credits),
        row.balance_after,
        _cell(row.event_id),
        _cell(row.note or ""),
    )


def _cell(text: str) -> str:
    # A spreadsheet runs a cell starting with = + - @ as a formula: neutralise it (OWASP's advice).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv_lines(lines: list) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(lines)
    return out.getvalue()
