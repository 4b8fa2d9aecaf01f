"""The embedded default: no DATABASE_URL, no REDIS_URL — SQLite and an in-process Redis.

The real `credits` console script in a scratch working directory, with every credits
setting stripped from the environment (as on a laptop after `make demo`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
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
MONTH_LINE = re.compile(r"^(\d{4})-(\d{2})\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)$")


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


def test_demo_runs_on_the_embedded_default(embedded_env, workdir, tmp_path):
    started = time.monotonic()
    result = credits(["demo", "--customers", "25", "--months", "13"], embedded_env, workdir)
    elapsed = time.monotonic() - started
    out = result.stdout

    assert result.returncode == 0, f"stdout:\n{out}\nstderr:\n{result.stderr}"
    assert elapsed < 30, f"the demo took {elapsed:.1f}s"
    assert "credits demo: 25 customers over 13 months, embedded SQLite + in-process Redis" in out

    # One progress line per month: 13 consecutive months, ending with last month.
    months = [(int(m[1]), int(m[2])) for m in map(MONTH_LINE.match, out.splitlines()) if m]
    assert len(months) == 13, out
    this_month = datetime.now(timezone.utc).replace(day=1)
    expected = [((this_month - relativedelta(months=n)).year, (this_month - relativedelta(months=n)).month) for n in range(13, 0, -1)]
    assert months == expected

    assert "ledger reconciles       yes" in out
    assert re.search(r"^  dead letters\s+0$", out, re.M), out
    published = int(re.search(r"events published\s+(\d+)\s+\((\d+) duplicates ignored\)", out)[1])
    applied = int(re.search(r"events applied\s+(\d+)", out)[1])
    duplicates = int(re.search(r"\((\d+) duplicates ignored\)", out)[1])
    assert applied > 100 and published == applied + duplicates
    assert re.search(r"^  customers\s+25$", out, re.M)

    header = re.search(r"^out of credits for more than 14 days: (\d+) customer\(s\)", out, re.M)
    assert header, out
    rows = re.findall(r"^  (demo-\S+)\s+\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC\s+(\d+)$", out[header.end():], re.M)
    assert len(rows) == min(int(header[1]), 15)
    days = [int(d) for _, d in rows]
    assert all(d >= 14 for d in days) and days == sorted(days, reverse=True)  # oldest first

    # A fresh database of its own, not a file in the working directory.
    db_path = Path(re.search(r"^database: sqlite\+aiosqlite:///(\S+)$", out, re.M)[1])
    assert db_path.is_file() and tmp_path in db_path.parents
    assert list(workdir.iterdir()) == []


async def test_run_expire_credits_on_the_embedded_default(embedded_env, workdir):
    migrated = credits(["migrate"], embedded_env, workdir)
    assert migrated.returncode == 0, migrated.stderr
    assert "database migrated to head" in migrated.stderr
    database_file = workdir / "credits.sqlite3"
    assert database_file.is_file()

    # A lot issued 13 months ago is past its 12-month expiry; only the sweep writes that down.
    db = Database(f"sqlite+aiosqlite:///{database_file}")
    issued = datetime.now(timezone.utc) - relativedelta(months=13)
    try:
        event = PaymentSucceeded(event_id="pay-old", customer_id="old-timer", occurred_at=issued, payment_id="in_1", credits=3)
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
            remaining = (await connection.execute(select(credit_lots.c.remaining).where(credit_lots.c.customer_id == "old-timer"))).scalar_one()
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
    assert [(credits_, at.replace(tzinfo=timezone.utc)) for credits_, at in expired] == [(-3, issued + relativedelta(months=12))]

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
