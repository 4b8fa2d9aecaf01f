"""Bring members' credit histories over from the old membership system (`credits import-legacy`).

Stage the export (an external sort by member), then for each member: check every row,
replay the history through the ledger's own rules, and write the member whole together with
one idempotency record per old row. Many members share a transaction; a re-run, or a run
after a crash, finds what is already there and imports nothing twice.
"""

from __future__ import annotations

import asyncio
import csv
import ctypes
import gc
import multiprocessing
import os
import queue
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol

from domain import CreditPolicy, DomainError
from domain.legacy import BadRow, LegacyRow, parse_amount, parse_row, replay
from infra.db.engine import Database
from infra.db.legacy import LegacyLedgerWriter, Outcome, ReplayedMember, Settled
from infra.legacy_staging import StagedMember, Staging

#: A transaction holds this many members, or about this many rows, whichever comes first.
GROUP_MEMBERS = 500
GROUP_ROWS = 20_000
#: Lines of each kind printed; the files hold them all.
PRINTED = 20
#: Report calls a worker process sends at once; messages waiting for the main process, at most.
RELAYED = 1_000
QUEUED = 16


class ImportInterrupted(Exception):
    """The import stopped part way (a worker process died): what was committed stays imported."""


class Progress(Protocol):
    """Where the import shows how far it is, and prints its report lines."""

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...

    def say(self, line: str) -> None: ...


@dataclass(frozen=True)
class ImportRequest:
    transactions: Path
    balances: Path | None = None
    customer_map: Path | None = None
    report: Path = Path("legacy-import-report.csv")
    dry_run: bool = False
    #: Worker processes replaying and writing members (PostgreSQL only; 1: all in this one).
    processes: int = 1

    @property
    def problems_file(self) -> Path:
        """The bad-row list, beside the balance report."""
        return self.report.with_name(f"{self.report.stem}-problems.csv")


@dataclass
class ImportSummary:
    rows: int = 0
    members: int = 0
    imported: int = 0
    already_imported: int = 0
    left_out: int = 0
    mismatched: int = 0
    bad_rows: int = 0
    balance_differences: int = 0
    dry_run: bool = False

    @property
    def exit_status(self) -> int:
        return 1 if self.left_out or self.mismatched else 0

    def describe(self) -> str:
        verb = "would be imported" if self.dry_run else "imported"
        return (
            f"{self.rows} row(s), {self.members} member(s): {self.imported} {verb}, {self.already_imported} already imported before, "
            f"{self.left_out} left out, {self.mismatched} mismatched; {self.bad_rows} bad row(s), {self.balance_differences} balance difference(s)"
            + (" — dry run, nothing written" if self.dry_run else "")
        )


@dataclass
class _Pending:
    """A group of replayed members waiting for their transaction, with what each needs reported."""

    members: list[tuple[ReplayedMember, StagedMember, list]] = field(default_factory=list)
    rows: int = 0


async def import_legacy(
    request: ImportRequest,
    db: Database,
    policy: CreditPolicy,
    now: datetime,
    progress: Progress,
    writer: LegacyLedgerWriter | None = None,
) -> ImportSummary:
    """Raises UnusableInput (nothing imported) when a file cannot be read or lacks a column.

    On PostgreSQL, members are replayed and written by ``request.processes`` worker processes,
    each over its own range of MembershipIds with its own connection; on the embedded
    SQLite (one writer) or with a given ``writer``, here."""
    summary = ImportSummary(dry_run=request.dry_run)
    with Staging() as staging:
        progress.start("reading", request.transactions.stat().st_size if request.transactions.exists() else None)
        summary.rows = staging.load_transactions(request.transactions, progress.advance)
        if request.customer_map:
            staging.load_map(request.customer_map)
        if request.balances:
            staging.load_balances(request.balances)
        with _Reports(request, progress.say, summary) as reports:
            for file, line, problem in staging.file_problems():
                reports.problem(file, line, "", "", "", problem)
            rules = _Rules(policy, now)
            progress.start("importing members", staging.member_count())
            if writer is None and not db.is_sqlite and request.processes > 1:
                await _import_in_processes(
                    staging,
                    _Job(db.url, rules, request.dry_run, os.getpid(), staging.path),
                    request.processes,
                    progress,
                    reports,
                )
            else:
                await _import_members(
                    staging.members(), writer or LegacyLedgerWriter(db), rules, request.dry_run, progress, reports
                )
            for member, balance, customer in staging.balances_without_history():
                reports.no_history(member, customer or member, balance)
    progress.say(summary.describe())
    return summary


@dataclass(frozen=True)
class _Rules:
    policy: CreditPolicy
    now: datetime

    @property
    def sweep_event_id(self) -> str:
        # What is due at import time expires as the sweep would, under the sweep's kind of id.
        return f"sweep:{self.now.isoformat()}"


@contextmanager
def _rare_collections() -> Iterator[None]:
    """Far fewer garbage collections while replaying: each full one walks every object of the
    groups in hand, a quarter of the CPU otherwise. Replays make no reference cycles to wait for."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _import_members(
    members: Iterable[StagedMember],
    writer: LegacyLedgerWriter,
    rules: _Rules,
    dry_run: bool,
    progress: Progress,
    reports: _Reports,
) -> None:
    with _rare_collections():
        pending, writing = _Pending(), None
        for staged in members:
            reports.count_member()
            replayed = _replayed(staged, rules, reports)
            if replayed is None:
                progress.advance(1)
                continue
            pending.members.append(replayed)
            pending.rows += len(staged.rows)
            if len(pending.members) % 50 == 0:
                await asyncio.sleep(0)  # let the group in flight move on meanwhile
            if len(pending.members) >= GROUP_MEMBERS or pending.rows >= GROUP_ROWS:
                # One group is written while the next is replayed: the database works alongside.
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(_flush(pending, writer, dry_run, progress, reports))
                pending = _Pending()
        if writing is not None:
            await writing
        await _flush(pending, writer, dry_run, progress, reports)


def _replayed(staged: StagedMember, rules: _Rules, reports: _Reports) -> tuple | None:
    """The member's checked rows replayed, with its mismatches; None (reported) when it is left out."""
    customer_id = staged.customer_id or staged.membership_id
    problems = [(file, line, "", problem) for file, line, problem in staged.problems]
    rows: list[LegacyRow] = []
    for raw in staged.rows:
        try:
            if raw.problem is not None:
                raise BadRow(raw.problem)
            rows.append(parse_row(raw.line, raw.fields))
        except BadRow as bad:
            problems.append(("transactions", raw.line, raw.fields[0], str(bad)))
    expected = _expected_balance(staged, problems)
    if not problems:
        try:
            result = replay(customer_id, rows, rules.policy, rules.now, rules.sweep_event_id)
        except (DomainError, ValueError) as refused:
            problems.append(("transactions", None, "", f"refused by the ledger rules: {refused}"))
    if problems:
        reports.left_out(staged.membership_id, customer_id, problems)
        return None
    return ReplayedMember(staged.membership_id, customer_id, rows, result.account), expected, result.mismatches


def _expected_balance(staged: StagedMember, problems: list) -> int | None:
    if staged.expected_balance is None or any(file == "balances" for file, *_ in problems):
        return None
    try:
        return parse_amount(staged.expected_balance, "Balance")
    except BadRow as bad:
        problems.append(("balances", None, "", str(bad)))
        return None


async def _flush(
    pending: _Pending, writer: LegacyLedgerWriter, dry_run: bool, progress: Progress, reports: _Reports
) -> None:
    if not pending.members:
        return
    # Balances are read before writing: a successful write prunes spent lots from the accounts.
    balances = {member.membership_id: member.account.book_balance for member, _, _ in pending.members}
    settled = await writer.settle([member for member, _, _ in pending.members], dry_run)
    for member, expected, mismatches in pending.members:
        reports.settled(
            member.membership_id,
            member.customer_id,
            settled[member.membership_id],
            balances[member.membership_id],
            expected,
            mismatches,
        )
    progress.advance(len(pending.members))


class _Reports:
    """The bad-row list (always) and the balance report (with --balances), written as the import goes."""

    PROBLEM_COLUMNS = ("File", "Line", "MembershipId", "CustomerId", "Id", "Problem")
    BALANCE_COLUMNS = ("MembershipId", "CustomerId", "Expected", "Imported")

    def __init__(self, request: ImportRequest, say: Callable[[str], None], summary: ImportSummary) -> None:
        self.request, self.say, self.summary = request, say, summary
        self.printed = {"problem": 0, "balance": 0}

    def __enter__(self) -> _Reports:
        self._problems_handle = open(self.request.problems_file, "w", newline="", encoding="utf-8")
        self.problems = csv.writer(self._problems_handle)
        self.problems.writerow(self.PROBLEM_COLUMNS)
        self._balances_handle = (
            open(self.request.report, "w", newline="", encoding="utf-8") if self.request.balances else None
        )
        self.balances = csv.writer(self._balances_handle) if self._balances_handle else None
        if self.balances:
            self.balances.writerow(self.BALANCE_COLUMNS)
        return self

    def __exit__(self, *exc) -> None:
        self._problems_handle.close()
        if self._balances_handle:
            self._balances_handle.close()
        more = [
            f"{kind}s: {self.printed[kind] - PRINTED} more" for kind in self.printed if self.printed[kind] > PRINTED
        ]
        if more:
            self.say(f"... ({'; '.join(more)}; all of them in the files)")
        self.say(
            f"bad rows and left-out members: {self.request.problems_file}"
            + (f"; balance report: {self.request.report}" if self.balances else "")
        )

    def problem(self, file: str, line: int | None, member: str, customer: str, row_id: str, text: str) -> None:
        self.problems.writerow((file, line or "", member, customer, row_id, text))
        self._print(
            "problem",
            f"{file} line {line}: " if line else f"{file}: ",
            f"{'member ' + member + ': ' if member else ''}{text}",
        )

    def left_out(self, member: str, customer: str, problems: list) -> None:
        self.summary.left_out += 1
        for file, line, row_id, text in problems:
            self.summary.bad_rows += line is not None and file == "transactions"
            self.problem(file, line, member, customer, row_id, f"{text} (member left out)")

    def count_member(self) -> None:
        self.summary.members += 1

    def settled(
        self, member: str, customer: str, settled: Settled, balance: int, expected: int | None, mismatches: list
    ) -> None:
        if settled.outcome.left_out:
            self.left_out(member, customer, [("ledger", None, "", settled.reason or settled.outcome.value)])
            return
        if settled.outcome is Outcome.ALREADY_IMPORTED:
            self.summary.already_imported += 1
        else:
            self.summary.imported += 1
        for mismatch in mismatches:
            self.problem(
                "transactions",
                mismatch.line,
                member,
                customer,
                mismatch.row_id,
                f"{mismatch.describe()} (imported by our rules)",
            )
        differs = expected is not None and expected != balance
        if differs:
            self._difference(member, customer, expected, balance)
        self.summary.mismatched += bool(mismatches) or differs

    def no_history(self, member: str, customer: str, balance: str) -> None:
        """A balance for a member with no rows: nothing to import; a difference unless it is zero."""
        try:
            expected = parse_amount(balance, "Balance")
        except BadRow as bad:
            self.problem("balances", None, member, customer, "", str(bad))
            self.summary.mismatched += 1
            return
        if expected != 0:
            self._difference(member, customer, expected, 0)
            self.problem("balances", None, member, customer, "", "a balance for a member without transactions")
            self.summary.mismatched += 1

    def _difference(self, member: str, customer: str, expected: int, imported: int) -> None:
        self.summary.balance_differences += 1
        self.balances.writerow((member, customer, expected, imported))
        self._print("balance", "", f"member {member} (customer {customer}): old system {expected}, imported {imported}")

    def _print(self, kind: str, where: str, text: str) -> None:
        self.printed[kind] += 1
        if self.printed[kind] <= PRINTED:
            self.say(f"{where}{text}")


# ---------------------------------------------------------------- worker processes


@dataclass(frozen=True)
class _Job:
    """What a worker process needs (sent to it pickled): it opens its own connection and staging view."""

    url: str
    rules: _Rules
    dry_run: bool
    parent: int
    staging: Path
    first: str | None = None
    before: str | None = None


async def _import_in_processes(
    staging: Staging, job: _Job, processes: int, progress: Progress, reports: _Reports
) -> None:
    """Ranges of members to worker processes (replaying is CPU work; one core is not enough);
    their report calls come back here, in order per process, through a bounded queue."""
    bounds = staging.boundaries(processes)
    context = multiprocessing.get_context("spawn")  # nothing of this process's loop or connections is inherited
    relay = context.Queue(maxsize=QUEUED)
    children = [
        context.Process(target=_work, args=(replace(job, first=first, before=before), relay), daemon=True)
        for first, before in zip(bounds, [*bounds[1:], None], strict=True)
    ]
    for child in children:
        child.start()
    try:
        running = len(children)
        while running:
            calls = await asyncio.to_thread(_next_message, relay, children)
            if calls is None:
                running -= 1
                continue
            for name, args in calls:
                getattr(progress if name == "advance" else reports, name)(*args)
    finally:
        for child in children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()


def _next_message(relay, children: list) -> list | None:
    while True:
        try:
            return relay.get(timeout=1)
        except queue.Empty:
            if any(child.exitcode not in (None, 0) for child in children):
                raise ImportInterrupted("a worker process of the import ended unexpectedly") from None


def _work(job: _Job, relay) -> None:
    """A worker process: its range of members, replayed and written as in one process."""
    _die_with(job.parent)
    relayed = _Relayed(relay)
    try:
        asyncio.run(_work_async(job, relayed))
    except BaseException as error:
        relayed.calls.append(("say", (f"worker process failed: {type(error).__name__}: {error}",)))
        relayed.send()
        sys.exit(1)
    relayed.send()
    relay.put(None)


async def _work_async(job: _Job, relayed: _Relayed) -> None:
    db = Database(job.url, pool_size=2)
    try:
        with Staging.reading(job.staging) as staging:
            await _import_members(
                staging.members(job.first, job.before), LegacyLedgerWriter(db), job.rules, job.dry_run, relayed, relayed
            )
    finally:
        await db.dispose()


def _die_with(parent: int) -> None:
    """A killed import leaves no worker writing on: the kernel kills this process with its parent."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


class _Relayed:
    """The worker's stand-in for the progress bar and the reports: their calls, sent in batches."""

    def __init__(self, relay) -> None:
        self.relay, self.calls = relay, []

    def __getattr__(self, name: str) -> Callable:
        if name not in ("advance", "say", "count_member", "left_out", "settled"):
            raise AttributeError(name)
        return lambda *args: self._record(name, args)

    def _record(self, name: str, args: tuple) -> None:
        self.calls.append((name, args))
        if len(self.calls) >= RELAYED:
            self.send()

    def send(self) -> None:
        if self.calls:
            self.relay.put(self.calls)
            self.calls = []
