"""The external sort behind `credits import-legacy`: the export files, staged in a scratch SQLite file.

A member's rows may be anywhere in an unsorted export of any size. The files are streamed
into a temporary SQLite database (on disk, not in memory) and read back one member at a
time, so memory holds one member's history whatever the file's size. The same on
PostgreSQL and on the embedded default: the ledger database is not touched here.
"""

from __future__ import annotations

import csv
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from domain.legacy import BALANCE_COLUMNS, MAP_COLUMNS, TRANSACTION_COLUMNS

_SCHEMA = """
CREATE TABLE rows (line INTEGER, member TEXT, row_id TEXT, type TEXT, amount TEXT, created_at TEXT, expires_at TEXT, problem TEXT);
CREATE TABLE map (member TEXT PRIMARY KEY, customer_id TEXT, line INTEGER, problem TEXT);
CREATE TABLE balances (member TEXT PRIMARY KEY, balance TEXT, line INTEGER, problem TEXT);
CREATE TABLE file_problems (file TEXT, line INTEGER, problem TEXT);
"""
#: Rows go to SQLite this many at a time (bounded memory, few round trips).
CHUNK = 10_000


class UnusableInput(Exception):
    """A file that cannot be read at all, or lacks a required column: nothing is imported."""


@dataclass(frozen=True)
class RawRow:
    line: int
    fields: tuple[str, str, str, str, str, str]
    #: Set when the row could not even be split into its columns, or shares its Id.
    problem: str | None


@dataclass
class StagedMember:
    membership_id: str
    rows: list[RawRow]
    #: The customer id the map gives, or None (then the MembershipId is used).
    customer_id: str | None = None
    expected_balance: str | None = None
    #: Problems of the member's lines in the map or balances files (file, line, problem).
    problems: list[tuple[str, int, str]] = field(default_factory=list)


class Staging:
    """The scratch database; ``with Staging() as staging`` removes it afterwards."""

    def __init__(self, directory: str | None = None) -> None:
        self._dir: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(
            prefix="credits-legacy-", dir=directory
        )
        self.path = Path(self._dir.name) / "staging.sqlite3"
        self.sql = sqlite3.connect(self.path)
        self.sql.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA temp_store=FILE;" + _SCHEMA)

    @classmethod
    def reading(cls, path: Path) -> Staging:
        """Another process's view of a loaded staging file: read only, left in place on exit."""
        staging = cls.__new__(cls)
        staging._dir, staging.path = None, path
        staging.sql = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        return staging

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, *exc) -> None:
        self.sql.close()
        if self._dir is not None:
            self._dir.cleanup()

    # ------------------------------------------------------------------ loading

    def load_transactions(self, path: Path, advance: Callable[[int], None] = lambda _: None) -> int:
        """Stream the transactions CSV in; returns how many rows it has. ``advance`` gets bytes read."""
        count = 0
        for chunk in _chunks(_records(path, TRANSACTION_COLUMNS, advance)):
            self.sql.executemany(
                "INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [_row_values(line, fields, problem) for line, fields, problem in chunk],
            )
            count += len(chunk)
        self.sql.execute("CREATE INDEX rows_member ON rows (member, line)")
        self._mark_duplicate_ids()
        self.sql.commit()
        return count

    def load_map(self, path: Path) -> None:
        for line, fields, problem in _records(path, MAP_COLUMNS):
            member, customer = (value.strip() for value in fields)
            if problem is None and not customer:
                problem = "missing CustomerId"
            self._keyed("map", path.name, line, member, customer, problem)
        # Two memberships into one customer would merge two histories: both are left out.
        self.sql.execute(
            "UPDATE map SET problem = 'CustomerId ' || quote(customer_id) || ' is mapped from more than one MembershipId' "
            "WHERE problem IS NULL AND customer_id IN (SELECT customer_id FROM map GROUP BY customer_id HAVING count(*) > 1)"
        )
        self.sql.commit()

    def load_balances(self, path: Path) -> None:
        for line, fields, problem in _records(path, BALANCE_COLUMNS):
            member, balance = (value.strip() for value in fields)
            self._keyed("balances", path.name, line, member, balance, problem)
        self.sql.commit()

    def _keyed(self, table: str, file: str, line: int, member: str, value: str, problem: str | None) -> None:
        """One map or balances line, keyed by member; a member listed twice is a problem."""
        if not member:
            self.sql.execute(
                "INSERT INTO file_problems VALUES (?, ?, ?)", (file, line, problem or "missing MembershipId")
            )
            return
        column = "customer_id" if table == "map" else "balance"
        self.sql.execute(
            f"INSERT INTO {table} (member, {column}, line, problem) VALUES (?, ?, ?, ?) "
            f"ON CONFLICT (member) DO UPDATE SET problem = 'MembershipId listed more than once (lines ' || line || ' and ' || excluded.line || ')'",
            (member, value, line, problem),
        )

    def _mark_duplicate_ids(self) -> None:
        # Two rows with one Id would get one event id: neither can be told apart from a re-run.
        self.sql.execute(
            "CREATE TEMP TABLE duplicate_ids AS SELECT row_id FROM rows WHERE row_id <> '' GROUP BY row_id HAVING count(*) > 1"
        )
        self.sql.execute(
            "UPDATE rows SET problem = 'Id ' || quote(row_id) || ' is used by more than one row' "
            "WHERE problem IS NULL AND row_id IN (SELECT row_id FROM duplicate_ids)"
        )

    # ------------------------------------------------------------------ reading

    def member_count(self) -> int:
        return self.sql.execute("SELECT count(DISTINCT member) FROM rows").fetchone()[0]

    def boundaries(self, parts: int) -> list[str]:
        """The first MembershipId of each of ``parts`` ranges holding about as many members each
        (the first range starts at the first member); fewer when there are fewer members."""
        count = self.member_count()
        query = "SELECT member FROM (SELECT DISTINCT member FROM rows ORDER BY member) LIMIT 1 OFFSET ?"
        offsets = sorted({count * part // parts for part in range(parts)} - {count})
        return [self.sql.execute(query, (offset,)).fetchone()[0] for offset in offsets]

    def members(self, first: str | None = None, before: str | None = None) -> Iterator[StagedMember]:
        """Every member with rows (from ``first``, up to but not including ``before``), one at a
        time, in MembershipId order, with their map and balance lines."""
        bounds = {"r.member >= ?": first, "r.member < ?": before}
        where = " AND ".join(condition for condition, value in bounds.items() if value is not None) or "1"
        query = (
            "SELECT r.member, r.line, r.row_id, r.type, r.amount, r.created_at, r.expires_at, r.problem, "
            "m.customer_id, m.line, m.problem, b.balance, b.line, b.problem "
            "FROM rows r LEFT JOIN map m ON m.member = r.member LEFT JOIN balances b ON b.member = r.member "
            f"WHERE {where} ORDER BY r.member, r.line"
        )
        current: StagedMember | None = None
        for record in self.sql.execute(query, [value for value in bounds.values() if value is not None]):
            if current is None or current.membership_id != record[0]:
                if current is not None:
                    yield current
                current = _member(record)
            # Fields in parse_row's order: Id, MembershipId, Type, Amount, CreatedAt, ExpiresAt.
            current.rows.append(
                RawRow(record[1], (record[2], record[0], record[3], record[4], record[5], record[6]), record[7])
            )
        if current is not None:
            yield current

    def balances_without_history(self) -> Iterator[tuple[str, str, str | None]]:
        """Members the balances file lists but the transactions file does not: (member, balance, customer)."""
        yield from self.sql.execute(
            "SELECT b.member, b.balance, m.customer_id FROM balances b LEFT JOIN map m ON m.member = b.member "
            "WHERE b.problem IS NULL AND NOT EXISTS (SELECT 1 FROM rows r WHERE r.member = b.member) ORDER BY b.member"
        )

    def file_problems(self) -> Iterator[tuple[str, int, str]]:
        yield from self.sql.execute("SELECT file, line, problem FROM file_problems ORDER BY file, line")


def _member(record: tuple) -> StagedMember:
    member = StagedMember(record[0], [], customer_id=record[8], expected_balance=record[11])
    if record[10] is not None:
        member.problems.append(("map", record[9], record[10]))
    if record[13] is not None:
        member.problems.append(("balances", record[12], record[13]))
    return member


def _row_values(line: int, fields: tuple[str, ...], problem: str | None) -> tuple:
    row_id, member, kind, amount, created_at, expires_at = fields
    return (line, member.strip(), row_id.strip(), kind, amount, created_at, expires_at, problem)


def _records(
    path: Path, columns: tuple[str, ...], advance: Callable[[int], None] = lambda _: None
) -> Iterator[tuple[int, tuple[str, ...], str | None]]:
    """(line, the named columns' values, problem) for each record after the header (line 1)."""
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except OSError as error:
        raise UnusableInput(f"cannot read {path}: {error.strerror or error}") from None
    with handle:
        reader = csv.reader(_counting(handle, advance))
        try:
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in columns if name not in header]
            if missing:
                raise UnusableInput(
                    f"{path}: header line lacks column(s) {', '.join(missing)} (expected {','.join(columns)})"
                )
            positions = [header.index(name) for name in columns]
            line = reader.line_num
            for record in reader:
                first, line = line + 1, reader.line_num
                if not record:
                    continue  # a blank line
                if len(record) != len(header):
                    yield first, _pad(record, positions), f"{len(record)} column(s) where the header has {len(header)}"
                    continue
                yield first, tuple(record[p] for p in positions), None
        except UnicodeDecodeError:
            raise UnusableInput(f"{path}: not UTF-8 text") from None
        except csv.Error as error:
            raise UnusableInput(f"{path} line {reader.line_num}: {error}") from None


def _counting(handle, advance: Callable[[int], None]) -> Iterator[str]:
    """The file's lines, telling ``advance`` how many characters went by (for the progress bar)."""
    read = 0
    for number, text in enumerate(handle):
        read += len(text)
        if number % 8192 == 8191:
            advance(read)
            read = 0
        yield text
    advance(read)


def _pad(record: list[str], positions: list[int]) -> tuple[str, ...]:
    return tuple(record[p] if p < len(record) else "" for p in positions)


def _chunks(records: Iterator) -> Iterator[list]:
    chunk: list = []
    for record in records:
        chunk.append(record)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
