"""The embedded default: no DATABASE_URL, no REDIS_URL — SQLite and an in-process Redis.

The real `credits` console script in a scratch working directory, with every credits
setting stripped from the environment (as on a laptop after `make demo`).
"""

from __future__ import annotations

import csv
import mailbox
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dateutil.relativedelta import relativedelta
from sqlalchemy import select

from domain import CreditPolicy
from infra.db import Database
from infra.db.tables import credit_lots, ledger_entries
from infra.settings import Settings
from messages import PaymentSucceeded
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork

CREDITS_SCRIPT = str(Path(sys.executable).with_name("credits"))
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)
MONTH_LINE = re.compile(r"^(\d{4})-(\d{2})" + r"\s+(\d+)" * 9 + "$")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_ENV}
    # The demo's fresh database goes under TMPDIR: keep it inside this test's directory.
    env.update(TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")
    assert "DATABASE_URL" not in env and "REDIS_URL" not in env
    return env


def credits(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([CREDITS_SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def figure(out: str, label: str) -> int:
    """A summary figure: ``label`` then a whole number (thousands separated by commas)."""
    found = re.search(rf"^  {re.escape(label)}\s+([\d,]+)\b", out, re.M)
    assert found, f"no {label!r} in:\n{out}"
    return int(found[1].replace(",", ""))


@pytest.mark.slow
def test_demo_shows_the_whole_business_and_keeps_what_it_is_asked_to(embedded_env, workdir, tmp_path):
    started = time.monotonic()
    result = credits(["demo", "--customers", "25", "--months", "14", "--keep"], embedded_env, workdir, timeout=300)
    elapsed = time.monotonic() - started
    out = result.stdout

    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr}"
    # A loose guard against a hang; the under-a-minute figure of the default run is measured by hand.
    assert elapsed < 150, f"the demo took {elapsed:.1f}s"
    assert "credits demo: 25 customers over 14 months, embedded SQLite + in-process Redis" in out
    assert "SimulatedPaymentProvider (no network, no money)" in out

    # One progress line per month: 14 consecutive months, ending with last month.
    months = [(int(m[1]), int(m[2])) for m in map(MONTH_LINE.match, out.splitlines()) if m]
    assert len(months) == 14, out
    this_month = datetime.now(UTC).replace(day=1)
    expected = [
        ((this_month - relativedelta(months=n)).year, (this_month - relativedelta(months=n)).month)
        for n in range(14, 0, -1)
    ]
    assert months == expected

    # The ledger: units on every line, the overdraft explained, the books balanced.
    assert re.search(
        r"^  ledger reconciles\s+yes\s+\(entries sum -?\d+ = on account \d+ - overdraft \d+\)$", out, re.M
    ), out
    assert figure(out, "dead letters") == 0
    assert figure(out, "customers") == 25
    assert figure(out, "credits sold") > 0 and re.search(r"^  credits sold\s+[\d,]+ credits$", out, re.M)
    assert figure(out, "credits expired") > 0  # unused for 12 months
    assert re.search(
        r"^  overdraft\s+[\d,]+ credits: jobs done on credit after a customer ran out; their next payment pays it back first$",
        out,
        re.M,
    )
    assert re.search(r"^  payments\s+[\d,]+\s+\$[\d,]+\.\d\d collected$", out, re.M)
    events = re.search(r"^  events\s+([\d,]+)\s+published \((\d+) duplicates ignored\), (\d+) applied", out, re.M)
    assert int(events[1].replace(",", "")) == int(events[2]) + int(events[3]) and int(events[3]) > 100

    # Dunning against the simulated provider: failed payments retried, most recovered.
    dunning = re.search(
        r"^  failed payments\s+(\d+)\s+retried on the dunning schedule against the SimulatedPaymentProvider: (\d+) recovered, (\d+) still unpaid$",
        out,
        re.M,
    )
    assert (
        dunning and int(dunning[1]) > 0 and int(dunning[2]) > 0 and int(dunning[1]) == int(dunning[2]) + int(dunning[3])
    ), out
    # Referrals qualified and paid on Fridays through the manual gateway's CSV.
    rewards = re.search(
        r"^  referral rewards\s+(\d+)\s+\$([\d,.]+) earned; (\d+) payout\(s\), \$([\d,.]+), exported on Fridays",
        out,
        re.M,
    )
    assert rewards and int(rewards[1]) > 0 and int(rewards[3]) > 0, out
    # Notifications written to the mail file.
    emails = re.search(r"^  emails to customers\s+(\d+)\s+in the mail file \((\d+) messages\): (.+)$", out, re.M)
    assert emails and int(emails[1]) == int(emails[2]) > 0 and "payment failed" in emails[3], out

    # The at-risk list: oldest first, each with its last failed payment's state.
    header = re.search(r"^at risk: out of credits for more than 14 days: (\d+) customer\(s\)", out, re.M)
    assert header, out
    rows = re.findall(r"^  (demo-\S+)\s+\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC\s+(\d+)  (\S+)$", out[header.end() :], re.M)
    assert len(rows) == min(int(header[1]), 15) > 0
    days = [int(d) for _, d, _ in rows]
    assert all(d >= 14 for d in days) and days == sorted(days, reverse=True)

    # --keep: the database, the payouts CSV and the mail file, where it says, under TMPDIR.
    kept = dict(re.findall(r"^  (database|payouts CSV|mail file)\s+(?:sqlite\+aiosqlite:///)?(\S+)", out, re.M))
    paths = {name: Path(path) for name, path in kept.items()}
    assert set(paths) == {"database", "payouts CSV", "mail file"}
    assert all(path.is_file() and tmp_path in path.parents for path in paths.values())
    with paths["payouts CSV"].open() as csv_file:
        payouts = list(csv.DictReader(csv_file))
    assert len(payouts) == int(rewards[3]) and {p["status"] for p in payouts} == {"exported"}
    assert {p["method"] for p in payouts} <= {"cash_app", "manual"}
    assert sum(int(p["amount_cents"]) for p in payouts) == round(float(rewards[4].replace(",", "")) * 100)
    box = mailbox.mbox(paths["mail file"])
    assert len(box) == int(emails[1]) and all(message["To"].endswith("@example.com") for message in box)
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_demo_leaves_nothing_behind_unless_asked(embedded_env, workdir, tmp_path):
    result = credits(["demo", "--customers", "3", "--months", "2"], embedded_env, workdir, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "nothing left behind (database, payouts CSV and mail file removed; --keep keeps them)" in result.stdout
    assert list(workdir.iterdir()) == [] and list(tmp_path.glob("credits-demo-*")) == []


async def test_run_expire_credits_on_the_embedded_default(embedded_env, workdir):
    migrated = credits(["migrate"], embedded_env, workdir)
    assert migrated.returncode == 0, migrated.stderr
    assert '"event": "database_migrated"' in migrated.stderr
    database_file = workdir / "credits.sqlite3"
    assert database_file.is_file()

    # A lot issued 13 months ago is past its 12-month expiry; only the sweep writes that down.
    db = Database(f"sqlite+aiosqlite:///{database_file}")
    issued = datetime.now(UTC) - relativedelta(months=13)
    try:
        event = PaymentSucceeded(
            event_id="pay-old", customer_id="old-timer", occurred_at=issued, payment_id="in_1", credits=3
        )
        await handlers.apply_event(event, SqlUnitOfWork(db), CreditPolicy())
    finally:
        await db.dispose()

    result = credits(["run", "expire_credits"], embedded_env, workdir)
    assert result.returncode == 0, result.stderr
    assert re.search(r"enqueued expire_credits as message [0-9a-f-]{36}", result.stderr)
    assert "expire_credits done" in result.stderr

    db = Database(f"sqlite+aiosqlite:///{database_file}")
    try:
        async with db.connect() as connection:
            remaining = (
                await connection.execute(
                    select(credit_lots.c.remaining).where(credit_lots.c.customer_id == "old-timer")
                )
            ).scalar_one()
            expired = (
                await connection.execute(
                    select(ledger_entries.c.credits, ledger_entries.c.occurred_at).where(
                        ledger_entries.c.customer_id == "old-timer", ledger_entries.c.kind == "expired"
                    )
                )
            ).all()
    finally:
        await db.dispose()
    assert remaining == 0
    assert [(credits_, at.replace(tzinfo=UTC)) for credits_, at in expired] == [(-3, issued + relativedelta(months=12))]

    lapse = credits(["run", "lapse_holds"], embedded_env, workdir)
    assert lapse.returncode == 0, lapse.stderr
    assert "lapse_holds done" in lapse.stderr


def test_run_refuses_an_unmigrated_embedded_database(embedded_env, workdir):
    # Regression: the in-process worker's boot failed after Dramatiq's event-loop thread had
    # started, and the process hung forever instead of exiting.
    result = credits(["run", "expire_credits"], embedded_env, workdir, timeout=30)
    assert result.returncode == 1
    assert "database at sqlite+aiosqlite:///credits.sqlite3 is not migrated" in result.stderr
    assert "run `credits migrate` first" in result.stderr


@pytest.mark.parametrize("command", [["worker"], ["scheduler"]])
def test_worker_and_scheduler_need_redis(embedded_env, workdir, command):
    result = credits(command, embedded_env, workdir, timeout=30)
    assert result.returncode == 2
    assert f"credits {command[0]} needs BROKER_URL (or REDIS_URL)" in result.stderr
