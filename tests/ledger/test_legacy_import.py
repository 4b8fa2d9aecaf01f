"""`credits import-legacy` against real PostgreSQL (and once on the embedded default).

Histories come from tests/support/legacy_history.py, whose oracle of the old system says what each
member's balance must be; the import replays them through the ledger's own rules.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import func, select, text

from domain import CreditPolicy
from infra.db import Database
from infra.db.engine import alembic_config
from infra.db.legacy import LegacyLedgerWriter
from infra.db.tables import customers, ledger_entries, processed_events
from infra.settings import Settings
from service_layer.legacy_import import ImportRequest, ImportSummary, import_legacy
from tests.support import t
from tests.support.legacy_history import HEADER, generate, write_csv

#: Slow: runs the import command and its worker processes over thousands of members.
pytestmark = pytest.mark.slow

NOW = t(2026, 6, 1)
CREDITS_SCRIPT = str(Path(sys.executable).with_name("credits"))


class Quiet:
    """Progress and report lines, kept for the assertions."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def start(self, phase: str, total: int | None) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def say(self, line: str) -> None:
        self.lines.append(line)


async def run_import(db: Database, transactions: Path, **options) -> tuple[ImportSummary, Quiet]:
    writer = options.pop("writer", None)
    report = transactions.parent / "report.csv"
    out = Quiet()
    summary = await import_legacy(
        ImportRequest(transactions, report=report, **options), db, CreditPolicy(), NOW, out, writer=writer
    )
    return summary, out


async def balances(db: Database) -> dict[str, int]:
    async with db.connect() as connection:
        return dict((await connection.execute(select(customers.c.customer_id, customers.c.balance))).all())


async def count(db: Database, table) -> int:
    async with db.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar_one()


async def ledger_sums(db: Database) -> dict[str, int]:
    """Each customer's balance-moving entries summed: must equal the stored balance."""
    async with db.connect() as connection:
        rows = await connection.execute(
            select(ledger_entries.c.customer_id, func.sum(ledger_entries.c.credits))
            .where(ledger_entries.c.kind.not_in(("held", "released", "lapsed")))
            .group_by(ledger_entries.c.customer_id)
        )
        return dict(rows.all())


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


@pytest.fixture
def export(tmp_path: Path):
    return generate(tmp_path, members=150, rows_per_member=12, now=NOW, seed=3)


async def test_an_unsorted_export_imports_every_balance_the_old_system_showed(db, export):
    summary, out = await run_import(db, export.transactions, balances=export.balances)

    assert (summary.imported, summary.left_out, summary.mismatched, summary.exit_status) == (150, 0, 0, 0), out.lines
    assert await balances(db) == export.expected
    assert await count(db, processed_events) == export.rows
    assert read_csv(export.transactions.parent / "report.csv") == [
        ["MembershipId", "CustomerId", "Expected", "Imported"]
    ]


async def test_entries_sum_to_each_stored_balance(db, export):
    await run_import(db, export.transactions)
    stored, summed = await balances(db), await ledger_sums(db)
    assert stored == {customer: summed.get(customer, 0) for customer in stored}


async def test_a_rerun_imports_nothing_twice(db, export):
    await run_import(db, export.transactions)
    entries = await count(db, ledger_entries)

    again, _ = await run_import(db, export.transactions, balances=export.balances)

    assert (again.imported, again.already_imported, again.exit_status) == (0, 150, 0)
    assert await count(db, ledger_entries) == entries
    assert await count(db, processed_events) == export.rows
    assert await balances(db) == export.expected


async def test_dry_run_writes_nothing_and_reports_the_same(db, export):
    dry, dry_out = await run_import(db, export.transactions, balances=export.balances, dry_run=True)
    assert await count(db, customers) == 0 and await count(db, processed_events) == 0
    real, real_out = await run_import(db, export.transactions, balances=export.balances)
    assert (dry.imported, dry.left_out, dry.mismatched) == (real.imported, real.left_out, real.mismatched)
    assert dry_out.lines[:-1] == real_out.lines[:-1]


# In worker processes too: each over its own range of members, reporting back here.
@pytest.mark.parametrize("processes", [1, 3])
async def test_bad_rows_are_reported_with_their_lines_and_their_member_left_out_whole(db, tmp_path, processes):
    rows = [
        ("1", "good", "Credit", "10", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),  # line 2
        (
            "2",
            "bad",
            "Credit",
            "10",
            "2026-01-01T00:00:00Z",
            "2027-01-01T00:00:00Z",
        ),  # line 3: fine, but its member is bad
        ("3", "bad", "Refund", "5", "2026-01-02T00:00:00Z", ""),  # line 4
        ("4", "bad", "Debit", "-2", "2026-01-03T00:00:00", ""),  # line 5: naive
        ("5", "bad", "Debit", "2", "2026-01-04T00:00:00Z", ""),  # line 6: sign
        ("6", "bad", "Debit", "-1.5", "2026-01-05T00:00:00Z", ""),  # line 7
        ("7", "bad", "Adjusted", "0", "2026-01-06T00:00:00Z", ""),  # line 8
        ("8", "bad", "Credit", "10", "2026-01-07T00:00:00Z", ""),  # line 9
        ("9", "bad", "Debit", "-1", "", ""),  # line 10
        ("1", "dup", "Debit", "-1", "2026-01-08T00:00:00Z", ""),  # line 11: reuses Id 1
        ("10", "good2", "Credit", "3", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),  # line 12
    ]
    transactions = write_csv(tmp_path / "t.csv", HEADER, rows)
    with open(transactions, "a") as handle:
        handle.write("11,short,Debit\n")  # line 13: too few columns

    summary, out = await run_import(db, transactions, processes=processes)

    assert await balances(db) == {"good2": 3}  # "good" shares Id 1 with "dup": both left out
    assert (summary.imported, summary.left_out, summary.exit_status) == (1, 4, 1)
    problems = {(row[0], row[1], row[2]): row[5] for row in read_csv(tmp_path / "report-problems.csv")[1:]}
    assert set(problems) == {
        ("transactions", str(line), member)
        for line, member in [
            (2, "good"),
            (4, "bad"),
            (5, "bad"),
            (6, "bad"),
            (7, "bad"),
            (8, "bad"),
            (9, "bad"),
            (10, "bad"),
            (11, "dup"),
            (13, "short"),
        ]
    }
    assert "unknown Type 'Refund'" in problems[("transactions", "4", "bad")]
    assert "has no UTC offset" in problems[("transactions", "5", "bad")]
    assert "positive Amount 2 on a Debit row" in problems[("transactions", "6", "bad")]
    assert "is not an integer" in problems[("transactions", "7", "bad")]
    assert "zero Amount" in problems[("transactions", "8", "bad")]
    assert "Credit without ExpiresAt" in problems[("transactions", "9", "bad")]
    assert "missing CreatedAt" in problems[("transactions", "10", "bad")]
    assert "used by more than one row" in problems[("transactions", "11", "dup")]
    assert "column(s) where the header has" in problems[("transactions", "13", "short")]
    assert any(line.startswith("transactions line 4: member bad:") for line in out.lines)
    assert summary.bad_rows == 10


async def test_an_expired_row_our_rules_disagree_with_is_imported_by_our_rules_and_listed(db, tmp_path):
    rows = [
        ("1", "m1", "Credit", "10", "2025-01-01T00:00:00Z", "2025-04-01T00:00:00Z"),
        ("2", "m1", "Expired", "-7", "2025-04-02T00:00:00Z", ""),  # our rules expired 10
        ("3", "m2", "Credit", "10", "2025-01-01T00:00:00Z", "2025-04-01T00:00:00Z"),
        ("4", "m2", "Expired", "-10", "2025-04-02T00:00:00Z", ""),
    ]
    summary, _ = await run_import(db, write_csv(tmp_path / "t.csv", HEADER, rows))
    assert (summary.imported, summary.mismatched, summary.exit_status) == (2, 1, 1)
    assert await balances(db) == {"m1": 0, "m2": 0}
    [problem] = read_csv(tmp_path / "report-problems.csv")[1:]
    assert (
        problem[:5] == ["transactions", "3", "m1", "m1", "2"] and "says 7" in problem[5] and "expired 10" in problem[5]
    )


@pytest.mark.parametrize("processes", [1, 2])
async def test_balance_differences_are_printed_and_written_never_fixed(db, tmp_path, processes):
    rows = [
        ("1", "m1", "Credit", "10", "2026-01-01T00:00:00-05:00", "2027-01-01T00:00:00-05:00"),
        ("2", "m1", "Debit", "-12", "2026-03-08T03:30:00-04:00", ""),  # the morning after the DST change
        ("3", "m2", "Credit", "5", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ]
    transactions = write_csv(tmp_path / "t.csv", HEADER, rows)
    owed = write_csv(tmp_path / "b.csv", ("MembershipId", "Balance"), [("m1", "0"), ("m2", "5"), ("m3", "4")])
    mapping = write_csv(tmp_path / "map.csv", ("MembershipId", "CustomerId"), [("m1", "cus_1"), ("m2", "cus_2")])

    summary, out = await run_import(db, transactions, balances=owed, customer_map=mapping, processes=processes)

    assert await balances(db) == {"cus_1": -2, "cus_2": 5}  # the overdraft stays, as our rules keep it
    assert read_csv(tmp_path / "report.csv") == [
        ["MembershipId", "CustomerId", "Expected", "Imported"],
        ["m1", "cus_1", "0", "-2"],
        ["m3", "m3", "4", "0"],
    ]
    assert (summary.mismatched, summary.balance_differences, summary.exit_status) == (2, 2, 1)
    assert any("member m1 (customer cus_1): old system 0, imported -2" in line for line in out.lines)


async def test_a_customer_that_already_exists_is_left_out_not_merged(db, tmp_path):
    async with db.begin() as connection:
        await connection.execute(customers.insert().values(customer_id="m1"))
    rows = [
        ("1", "m1", "Credit", "10", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("2", "m2", "Credit", "3", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    ]
    summary, _ = await run_import(db, write_csv(tmp_path / "t.csv", HEADER, rows))
    assert (summary.imported, summary.left_out) == (1, 1)
    assert await balances(db) == {"m1": 0, "m2": 3}
    assert "already exists" in read_csv(tmp_path / "report-problems.csv")[1][5]


async def test_a_changed_history_after_an_import_is_left_out(db, tmp_path):
    first = [("1", "m1", "Credit", "10", "2026-01-01T00:00:00Z", "2027-01-01T00:00:00Z")]
    await run_import(db, write_csv(tmp_path / "t.csv", HEADER, first))
    summary, _ = await run_import(
        db, write_csv(tmp_path / "t.csv", HEADER, [*first, ("2", "m1", "Debit", "-4", "2026-02-01T00:00:00Z", "")])
    )
    assert (summary.imported, summary.left_out, summary.exit_status) == (0, 1, 1)
    assert await balances(db) == {"m1": 10}


async def test_copy_writes_exactly_the_rows_the_live_statements_write(db, export, empty_database):
    """The COPY path against `save_many` (the live path) on a second database: the same rows."""
    await asyncio.to_thread(command.upgrade, alembic_config(empty_database), "head")
    other = Database(empty_database)
    try:
        await run_import(db, export.transactions)
        await run_import(other, export.transactions, writer=LegacyLedgerWriter(other, use_copy=False))
        assert await snapshot(db) == await snapshot(other)
    finally:
        await other.dispose()


async def test_worker_processes_write_exactly_what_one_process_writes(db, export, empty_database):
    """Three worker processes, each over its own range of members, against one process: the same rows and summary."""
    await asyncio.to_thread(command.upgrade, alembic_config(empty_database), "head")
    other = Database(empty_database)
    try:
        together, _ = await run_import(db, export.transactions, balances=export.balances, processes=3)
        alone, _ = await run_import(other, export.transactions, balances=export.balances)
        assert together == alone and together.imported == 150
        assert await snapshot(db) == await snapshot(other)
    finally:
        await other.dispose()


async def snapshot(db: Database) -> dict[str, list]:
    """Every row the import writes, ids replaced by what they point at."""
    queries = {
        "customers": "SELECT customer_id, balance, overdraft, credits_depleted_at, frozen_since, unfrozen_at FROM customers ORDER BY 1",
        "lots": "SELECT customer_id, source, event_id, amount, remaining, issued_at, expires_at, payment_id, paid_cents, reversed, expired FROM credit_lots ORDER BY 1, 3",
        "entries": "SELECT e.customer_id, e.kind, e.credits, e.balance_after, e.overdraft_change, e.occurred_at, e.event_id, e.job_id, l.event_id, e.note "
        "FROM ledger_entries e LEFT JOIN credit_lots l ON l.id = e.lot_id ORDER BY e.customer_id, e.id",
        "movements": "SELECT e.customer_id, e.event_id, e.kind, l.event_id, m.credits FROM lot_movements m JOIN ledger_entries e ON e.id = m.entry_id "
        "JOIN credit_lots l ON l.id = m.lot_id ORDER BY e.customer_id, e.id, l.id",
        "processed": "SELECT event_id, event_type, customer_id, fingerprint, payload::jsonb::text FROM processed_events ORDER BY 1",
    }
    async with db.connect() as connection:
        return {name: [tuple(row) for row in await connection.execute(text(sql))] for name, sql in queries.items()}


# ------------------------------------------------------------------ the command itself


def credits(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([CREDITS_SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_exit_status_2_for_unusable_input_and_1_for_left_out_members(service_env, tmp_path):
    missing = credits(["import-legacy", str(tmp_path / "nope.csv")], service_env, tmp_path)
    assert missing.returncode == 2 and "nothing imported" in missing.stderr
    headless = tmp_path / "headless.csv"
    headless.write_text("Id,MembershipId,Type,Amount\n1,m1,Credit,5\n")
    lacking = credits(["import-legacy", str(headless)], service_env, tmp_path)
    assert lacking.returncode == 2 and "lacks column(s) CreatedAt, ExpiresAt" in lacking.stderr
    bad_flag = credits(["import-legacy", str(headless), "--bogus"], service_env, tmp_path)
    assert bad_flag.returncode == 2
    bad = write_csv(tmp_path / "bad.csv", HEADER, [("1", "m1", "Refund", "5", "2026-01-01T00:00:00Z", "")])
    left_out = credits(["import-legacy", str(bad), "--dry-run"], service_env, tmp_path)
    assert left_out.returncode == 1 and "1 left out" in left_out.stdout


def test_a_crash_mid_import_then_a_rerun_leaves_every_total_exact(service_env, pg_url, db, tmp_path):
    # The command imports as of the real clock: the history ends now.
    export = generate(tmp_path, members=3000, rows_per_member=20, now=datetime.now(UTC), seed=5)
    process = subprocess.Popen(
        [CREDITS_SCRIPT, "import-legacy", str(export.transactions)],
        cwd=tmp_path,
        env=service_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while asyncio.run(_count_at(pg_url, "customers")) == 0:
            assert process.poll() is None, "the import ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    imported_before = asyncio.run(_count_at(pg_url, "customers"))
    assert 0 < imported_before < 3000, "the kill must land mid-way"

    rerun = credits(
        ["import-legacy", str(export.transactions), "--balances", str(export.balances)], service_env, tmp_path
    )

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{imported_before} already imported before" in rerun.stdout
    assert asyncio.run(_count_at(pg_url, "processed_events")) == export.rows
    assert asyncio.run(_balances_at(pg_url)) == export.expected
    assert "0 balance difference(s)" in rerun.stdout


def test_a_worker_process_killed_mid_import_is_exit_3_and_a_rerun_finishes(service_env, pg_url, db, tmp_path):
    export = generate(tmp_path, members=3000, rows_per_member=20, now=datetime.now(UTC), seed=6)
    command = [CREDITS_SCRIPT, "import-legacy", str(export.transactions), "--processes", "2"]
    process = subprocess.Popen(
        command, cwd=tmp_path, env=service_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        while asyncio.run(_count_at(pg_url, "customers")) == 0:
            assert process.poll() is None, "the import ended before a worker could be killed"
            time.sleep(0.05)
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        # Not multiprocessing's resource tracker: one of the import's own workers.
        workers = [pid for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert workers, "the import runs its members in worker processes"
        os.kill(int(workers[0]), signal.SIGKILL)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 3, stderr
    assert "worker process of the import ended unexpectedly" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr

    rerun = credits(
        ["import-legacy", str(export.transactions), "--balances", str(export.balances)], service_env, tmp_path
    )

    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert asyncio.run(_count_at(pg_url, "processed_events")) == export.rows
    assert asyncio.run(_balances_at(pg_url)) == export.expected


async def _count_at(url: str, table: str) -> int:
    db = Database(url)
    try:
        async with db.connect() as connection:
            return (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
    finally:
        await db.dispose()


async def _balances_at(url: str) -> dict[str, int]:
    db = Database(url)
    try:
        return await balances(db)
    finally:
        await db.dispose()


def test_the_embedded_default_imports_too(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.upper() not in {name.upper() for name in Settings.model_fields}}
    env.update(TMPDIR=str(tmp_path))
    work = tmp_path / "work"
    work.mkdir()
    export = generate(work, members=40, rows_per_member=10, now=datetime.now(UTC), seed=9)
    assert credits(["migrate"], env, work).returncode == 0

    first = credits(["import-legacy", str(export.transactions), "--balances", str(export.balances)], env, work)
    again = credits(["import-legacy", str(export.transactions)], env, work)

    assert first.returncode == 0, first.stdout + first.stderr
    assert "40 imported" in first.stdout and "0 balance difference(s)" in first.stdout
    assert again.returncode == 0 and "40 already imported before" in again.stdout
    assert (work / "legacy-import-report.csv").exists() and (work / "legacy-import-report-problems.csv").exists()
