"""Old-system credit histories for tests and the benchmark, with an independent oracle.

The oracle is the old `MembershipCreditService` as docs/MIGRATION.md describes it, written
from that description alone (nothing from `domain/`): lots with their own expiry, spent
oldest first, expired lots gone, a shortfall owed and repaid by the next issuance. The
generator writes the rows that system would have stored, `Expired` rows included, and the
balance it would show; `import-legacy` must arrive at the same balances.

    python -m tests.support.legacy_history OUT_DIR --members 1000 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from dateutil.relativedelta import relativedelta

HEADER = ("Id", "MembershipId", "Type", "Amount", "CreatedAt", "ExpiresAt")
#: Local times with their offsets: history crosses daylight-saving changes.
LOCAL = ZoneInfo("America/New_York")
EXPIRATION_MONTHS = 12
#: How far back the generated histories go.
YEARS = 3
OPEN_LOTS = "open-lots.csv"


@dataclass
class OldRow:
    id: int
    member: str
    type: str
    amount: int
    created_at: datetime
    expires_at: datetime | None = None

    def fields(self) -> tuple[str, ...]:
        expires = _render(self.expires_at, self.id) if self.expires_at else ""
        return (str(self.id), self.member, self.type, str(self.amount), _render(self.created_at, self.id), expires)


def _render(moment: datetime, salt: int) -> str:
    # Most rows in local time with its DST offset, some in UTC: the same instants either way.
    return (
        moment.astimezone(LOCAL).isoformat() if salt % 3 else moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
    )


@dataclass
class OldAccount:
    """The oracle: one membership's credits under the old rules."""

    lots: list[list] = field(default_factory=list)  # [created_at, id, expires_at, remaining]
    owed: int = 0

    def due(self, at: datetime) -> list[list]:
        return [lot for lot in self.lots if lot[3] > 0 and lot[2] <= at]

    def expire(self, lot: list) -> int:
        credits, lot[3] = lot[3], 0
        return credits

    def add(self, row_id: int, credits: int, at: datetime, expires_at: datetime) -> None:
        repaid = min(self.owed, credits)
        self.owed -= repaid
        self.lots.append([at, row_id, expires_at, credits - repaid])

    def spend(self, credits: int, at: datetime) -> None:
        for lot in sorted(self.lots, key=lambda lot: (lot[0], lot[1])):
            if credits == 0:
                break
            if lot[3] > 0 and lot[2] > at:
                taken = min(lot[3], credits)
                lot[3] -= taken
                credits -= taken
        self.owed += credits

    def balance(self, at: datetime) -> int:
        return sum(lot[3] for lot in self.lots if lot[2] > at) - self.owed


class Ids:
    def __init__(self, start: int = 1) -> None:
        self.next = start

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def member_history(
    rng: random.Random, member: str, ids: Ids, start: datetime, now: datetime, rows: int
) -> tuple[list[OldRow], int]:
    """About ``rows`` rows of one membership between ``start`` and ``now``, and its balance at ``now``."""
    history, account = _history(rng, member, ids, start, now, rows)
    return history, account.balance(now)


def _history(
    rng: random.Random, member: str, ids: Ids, start: datetime, now: datetime, rows: int
) -> tuple[list[OldRow], OldAccount]:
    account, history = OldAccount(), []
    moment = start + timedelta(minutes=rng.randrange(60 * 24 * 30))
    step = (now - moment) / max(rows, 1)
    while len(history) < rows and moment < now:
        kind = rng.choices(("Credit", "Debit", "Adjusted+", "Adjusted-"), weights=(40, 50, 5, 5))[0]
        _expire_rows(account, history, ids, member, moment, rng)
        history.append(_operation(account, ids, member, kind, moment, rng))
        # Now and then a second row at the very same moment: ties are ordered by Id.
        if rng.random() > 0.1:
            moment += step * rng.uniform(0.2, 1.8)
    return history, account


def _expire_rows(
    account: OldAccount, history: list[OldRow], ids: Ids, member: str, at: datetime, rng: random.Random
) -> None:
    """The old system expired lazily, on the next look at the balance: one row per lot, or one for all."""
    due = account.due(at)
    if not due:
        return
    expired = [account.expire(lot) for lot in due]
    if rng.random() < 0.5:
        history += [OldRow(ids.take(), member, "Expired", -credits, at) for credits in expired if credits]
    elif sum(expired):
        history.append(OldRow(ids.take(), member, "Expired", -sum(expired), at))


def _operation(account: OldAccount, ids: Ids, member: str, kind: str, at: datetime, rng: random.Random) -> OldRow:
    row_id = ids.take()
    if kind == "Credit":
        credits, expires = rng.choice((4, 8, 10, 20)), at + relativedelta(months=EXPIRATION_MONTHS)
        account.add(row_id, credits, at, expires)
        return OldRow(row_id, member, "Credit", credits, at, expires)
    if kind == "Adjusted+":
        credits = rng.randint(1, 5)
        account.add(row_id, credits, at, at + relativedelta(months=EXPIRATION_MONTHS))
        return OldRow(row_id, member, "Adjusted", credits, at)
    credits = rng.randint(1, 6)
    account.spend(credits, at)
    return OldRow(row_id, member, "Debit" if kind == "Debit" else "Adjusted", -credits, at)


@dataclass
class Export:
    transactions: Path
    balances: Path
    #: The old system's balance of every member at ``now`` (the oracle's).
    expected: dict[str, int]
    rows: int


def generate(
    directory: Path, members: int, rows_per_member: int, now: datetime, seed: int = 1, keep_expected: bool = True
) -> Export:
    """Write transactions.csv (rows shuffled, members split across the file), balances.csv, and
    open-lots.csv: the lots still open at ``now`` (`balances_at` moves the balances to a later time)."""
    rng = random.Random(seed)
    ids, expected, count = Ids(), {}, 0
    start = now - timedelta(days=365 * YEARS)
    transactions, balances = directory / "transactions.csv", directory / "balances.csv"
    with (
        open(transactions, "w", newline="") as out,
        open(balances, "w", newline="") as owed,
        open(directory / OPEN_LOTS, "w", newline="") as lots,
    ):
        rows_out, balances_out, lots_out = csv.writer(out), csv.writer(owed), csv.writer(lots)
        rows_out.writerow(HEADER)
        balances_out.writerow(("MembershipId", "Balance"))
        lots_out.writerow(("MembershipId", "ExpiresAt", "Remaining"))

        def histories() -> Iterator[OldRow]:
            for number in range(members):
                member = f"m{number:07d}"
                history, account = _history(rng, member, ids, start, now, rng.randint(1, 2 * rows_per_member - 1))
                balance = account.balance(now)
                balances_out.writerow((member, balance))
                lots_out.writerows(
                    (member, lot[2].isoformat(), lot[3]) for lot in account.lots if lot[3] > 0 and lot[2] > now
                )
                if keep_expected:
                    expected[member] = balance
                yield from history

        for row in shuffled(histories(), rng, window=20_000):
            rows_out.writerow(row.fields())
            count += 1
    return Export(transactions, balances, expected, count)


def balances_at(directory: Path, at: datetime) -> Path:
    """balances-at.csv: the old system's balances at ``at`` (after the export's ``now``), from open-lots.csv.

    Between the two, nothing happens but expiry: an open lot means nothing is owed, so each
    balance loses exactly the lots that expire by ``at``."""
    lost: dict[str, int] = {}
    with open(directory / OPEN_LOTS, newline="") as lots:
        for member, expires_at, remaining in list(csv.reader(lots))[1:]:
            if datetime.fromisoformat(expires_at) <= at:
                lost[member] = lost.get(member, 0) + int(remaining)
    moved = directory / "balances-at.csv"
    with open(directory / "balances.csv", newline="") as before, open(moved, "w", newline="") as after:
        out = csv.writer(after)
        for number, (member, balance) in enumerate(csv.reader(before)):
            out.writerow((member, balance if number == 0 else int(balance) - lost.get(member, 0)))
    return moved


def shuffled(items: Iterator, rng: random.Random, window: int) -> Iterator:
    """A shuffle in bounded memory: each item leaves a random slot of a ``window``-sized buffer."""
    buffer: list = []
    for item in items:
        if len(buffer) < window:
            buffer.append(item)
            continue
        slot = rng.randrange(window)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple]) -> Path:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--members", type=int, default=1000)
    parser.add_argument("--rows-per-member", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    export = generate(
        args.directory, args.members, args.rows_per_member, datetime.now(UTC), args.seed, keep_expected=False
    )
    print(f"{export.rows} rows over {args.members} members: {export.transactions}, {export.balances}")


if __name__ == "__main__":
    main()
