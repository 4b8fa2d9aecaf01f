"""Credit history from the old membership system: its rows, checked, and replayed through our rules.

The old `MembershipCreditTransactions` table holds `Credit`, `Debit`, `Expired` and `Adjusted`
rows. Nothing here re-implements a ledger rule: each row becomes a call on `Account`, the
same aggregate live events go through (lots, oldest-first spending, overdraft, expiry).
Pure: no I/O, no clock; the caller says what "now" is.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from domain.model import Account, EntryKind, Lot, LotSource
from domain.policy import CreditPolicy

#: Columns of the transactions export, in the order the documented SQL writes them.
TRANSACTION_COLUMNS = ("Id", "MembershipId", "Type", "Amount", "CreatedAt", "ExpiresAt")
MAP_COLUMNS = ("MembershipId", "CustomerId")
BALANCE_COLUMNS = ("MembershipId", "Balance")

#: Fixed forever: event ids derive from it, so a re-run recognises what an earlier run imported.
LEGACY_NAMESPACE = uuid.UUID("6f0b7c1e-2a59-4f0e-9c61-4d1f3e0a8b27")
#: Amounts beyond this are typos, and would not fit the ledger's integer columns.
MAX_AMOUNT = 1_000_000_000
_NAMESPACE_BYTES = LEGACY_NAMESPACE.bytes
_INTEGER = re.compile(r"^[+-]?\d+(\.0*)?$")
_json_string = json.encoder.encode_basestring_ascii  # what json.dumps writes a str as (ensure_ascii)


class LegacyType(StrEnum):
    CREDIT = "Credit"
    DEBIT = "Debit"
    EXPIRED = "Expired"
    ADJUSTED = "Adjusted"


class _once:
    """`functools.cached_property` without the lock Python 3.11 takes on every first access:
    a million rows each compute their id, payload and fingerprint once."""

    def __init__(self, compute) -> None:
        self.compute, self.name, self.__doc__ = compute, compute.__name__, compute.__doc__

    def __get__(self, row, owner=None):
        if row is None:
            return self
        value = row.__dict__[self.name] = self.compute(row)  # the instance's value wins from now on
        return value


class BadRow(ValueError):
    """A row that cannot be replayed; its member is left out whole."""


def legacy_event_id(row_id: str) -> str:
    """The idempotency key of an old row: the same on every run, for the same old `Id`.

    `uuid.uuid5(LEGACY_NAMESPACE, row_id)`, spelled out: a million rows go through here."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + row_id.encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"legacy:{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(frozen=True)
class LegacyRow:
    line: int
    row_id: str
    membership_id: str
    type: LegacyType
    amount: int
    created_at: datetime
    expires_at: datetime | None

    # Computed once: a row's id and fingerprint are asked for several times on the way to the database.
    @_once
    def event_id(self) -> str:
        return legacy_event_id(self.row_id)

    @property
    def event_type(self) -> str:
        """Its type as recorded with its idempotency record."""
        return f"legacy.{self.type.value.lower()}"

    def order_key(self) -> tuple:
        """Time order; rows at the same moment in `Id` order (numeric ids numerically)."""
        numeric = self.row_id.isdigit()
        return (self.created_at, 0 if numeric else 1, int(self.row_id) if numeric else 0, self.row_id)

    @_once
    def payload(self) -> dict[str, str | int | None]:
        """The row as recorded with its idempotency record (times in UTC, as parsed)."""
        return {
            "Id": self.row_id,
            "MembershipId": self.membership_id,
            "Type": self.type.value,
            "Amount": self.amount,
            "CreatedAt": self.created_at.isoformat(),
            "ExpiresAt": self.expires_at.isoformat() if self.expires_at else None,
        }

    @_once
    def payload_json(self) -> str:
        """``json.dumps(payload, sort_keys=True, separators=(",", ":"))``, byte for byte (the
        fingerprint hashes it, so earlier imports are recognised), spelled out: a million rows
        go through here, and only the two free-text values need the encoder."""
        expires = f'"{self.expires_at.isoformat()}"' if self.expires_at else "null"
        return (
            f'{{"Amount":{self.amount},"CreatedAt":"{self.created_at.isoformat()}","ExpiresAt":{expires},'
            f'"Id":{_json_string(self.row_id)},"MembershipId":{_json_string(self.membership_id)},"Type":"{self.type.value}"}}'
        )

    @_once
    def fingerprint(self) -> str:
        return hashlib.sha256(self.payload_json.encode()).hexdigest()


def parse_row(line: int, fields: Sequence[str]) -> LegacyRow:
    """One transactions row (its TRANSACTION_COLUMNS, in order), checked. Raises BadRow saying what is wrong."""
    row_id, membership_id, kind, amount, created_at, expires_at = fields
    row_id, membership_id = row_id.strip(), membership_id.strip()
    if not row_id:
        raise BadRow("missing Id")
    if not membership_id:
        raise BadRow("missing MembershipId")
    try:
        row_type = LegacyType(kind.strip())
    except ValueError:
        raise BadRow(f"unknown Type {kind.strip()!r} (expected Credit, Debit, Expired or Adjusted)") from None
    credits = parse_amount(amount, "Amount")
    if credits == 0:
        raise BadRow("zero Amount")
    _check_sign(row_type, credits)
    created = parse_moment(created_at, "CreatedAt")
    expires = None
    if row_type is LegacyType.CREDIT:
        if not expires_at.strip():
            raise BadRow("Credit without ExpiresAt")
        expires = parse_moment(expires_at, "ExpiresAt")
        if expires <= created:
            raise BadRow("ExpiresAt is not after CreatedAt")
    return LegacyRow(line, row_id, membership_id, row_type, credits, created, expires)


def parse_amount(text: str, column: str) -> int:
    text = text.strip()
    if not _INTEGER.match(text):
        raise BadRow(f"{column} {text!r} is not an integer" if text else f"missing {column}")
    value = int(text.split(".")[0])
    if abs(value) > MAX_AMOUNT:
        raise BadRow(f"{column} {value} is out of range")
    return value


def parse_moment(text: str, column: str) -> datetime:
    text = text.strip()
    if not text:
        raise BadRow(f"missing {column}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRow(f"{column} {text!r} is not an ISO 8601 date") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise BadRow(f"{column} {text!r} has no UTC offset")
    # In UTC, as live events are: month arithmetic and comparisons then agree with theirs.
    return moment.astimezone(UTC)


def _check_sign(row_type: LegacyType, credits: int) -> None:
    # The old system stored credits positive, debits and expiries negative, adjustments either.
    if row_type is LegacyType.CREDIT and credits < 0:
        raise BadRow(f"negative Amount {credits} on a Credit row")
    if row_type in (LegacyType.DEBIT, LegacyType.EXPIRED) and credits > 0:
        raise BadRow(f"positive Amount {credits} on a {row_type.value} row")


@dataclass(frozen=True)
class ExpiryMismatch:
    """An `Expired` row our replay disagrees with: reported, never guessed around."""

    line: int
    row_id: str
    old_expired: int
    replayed: int

    def describe(self) -> str:
        return f"Expired row says {self.old_expired} credit(s) expired; our rules expired {self.replayed} by then"


@dataclass
class MemberReplay:
    account: Account
    mismatches: list[ExpiryMismatch] = field(default_factory=list)


def replay(
    customer_id: str, rows: Iterable[LegacyRow], policy: CreditPolicy, now: datetime, sweep_event_id: str
) -> MemberReplay:
    """Replay one member's history in time order (ties by `Id`), then expire what is due by ``now``.

    `Credit` issues a lot with its own `ExpiresAt`; `Debit` and negative `Adjusted` spend
    oldest first (a shortfall becomes overdraft); positive `Adjusted` issues an adjustment
    lot the policy dates. `Expired` moves nothing: our rules have already expired that lot,
    and the row is checked against what they expired.
    """
    account = Account(customer_id)
    result = MemberReplay(account)
    checker = _ExpiryCheck(result)
    every_lot: list[Lot] = []
    for row in sorted(rows, key=LegacyRow.order_key):
        before = len(account.lots)
        _apply(account, row, policy)
        checker.observe(row)
        # As between live events (the repository loads open lots only), spent lots leave the
        # account; every lot is kept aside to be written. An issuance appends its lot.
        every_lot += account.lots[before:]
        account.lots = [lot for lot in account.lots if lot.remaining > 0]
    account.catch_up(now, sweep_event_id)
    account.lots = every_lot
    return result


def _apply(account: Account, row: LegacyRow, policy: CreditPolicy) -> None:
    note = f"imported: {row.type.value} {row.row_id}"
    if row.type is LegacyType.CREDIT:
        account.issue(
            row.amount,
            row.created_at,
            row.event_id,
            policy,
            source=LotSource.PAYMENT,
            note=note,
            expires_at=row.expires_at,
        )
    elif row.type is LegacyType.DEBIT:
        account.debit(-row.amount, row.created_at, row.event_id, note=note)
    elif row.type is LegacyType.ADJUSTED:
        account.adjust(row.amount, row.created_at, row.event_id, policy, note=note)
    else:
        account.catch_up(row.created_at, row.event_id)


class _ExpiryCheck:
    """Matches each `Expired` row with expiries our replay wrote and no earlier row claimed."""

    def __init__(self, result: MemberReplay) -> None:
        self.result = result
        self.seen = 0
        self.unclaimed: list[int] = []

    def observe(self, row: LegacyRow) -> None:
        entries = self.result.account.new_entries
        self.unclaimed += [-entry.credits for entry in entries[self.seen :] if entry.kind is EntryKind.EXPIRED]
        self.seen = len(entries)
        if row.type is LegacyType.EXPIRED:
            self._claim(row)

    def _claim(self, row: LegacyRow) -> None:
        wanted = -row.amount
        # One row per expired lot, or one row for all that expired at once: either matches.
        if wanted in self.unclaimed:
            self.unclaimed.remove(wanted)
            return
        total = 0
        for count, credits in enumerate(self.unclaimed, start=1):
            total += credits
            if total == wanted:
                del self.unclaimed[:count]
                return
        self.result.mismatches.append(ExpiryMismatch(row.line, row.row_id, wanted, sum(self.unclaimed)))
        self.unclaimed.clear()
