"""README's "Running it for real", run exactly as written: its fenced block, in bash, from the
checkout. Only the variables the block itself reads first are set (a database name of this
test's own, a free port, this run's Redis database); everything else is the README's.

Then web, worker and scheduler must stay up, an event published must be applied, and
Ctrl-C (SIGINT to the foreground process group) must stop them all.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select

from infra.db import Database
from infra.db.tables import customers
from infra.settings import Settings
from messages import PaymentSucceeded, Publisher
from tests.support import ROOT, free_port, stop_process, wait_until

SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)
#: The processes must keep running at least this long after the web answers.
STAYS_UP_SECONDS = 10


def readme_block(section: str) -> str:
    readme = (ROOT / "README.md").read_text()
    body = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    [block] = re.findall(r"^```sh\n(.*?)^```$", body, re.S | re.M)
    return block


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"^```sh\n(.*?)^```$", readme, re.S | re.M)[1]
    assert first.split("\n")[:2] == ["make demo", "make test"] and first.strip().count("\n") == 1


def test_readme_block_parametrises_only_through_its_own_variables():
    block = readme_block("Running it for real")
    assert "honcho start" in block and "credits migrate" in block and ". .venv/bin/activate" in block
    assert re.search(r"^createdb -h 127\.0\.0\.1 -U postgres ", block, re.M)
    assert set(re.findall(r"\$\{(\w+):-", block)) == {"CREDITS_DB", "PORT", "REDIS_URL"}


@pytest.fixture
def database_name():
    name = f"credits_readme_{uuid.uuid4().hex[:10]}"
    yield name
    subprocess.run(
        ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", "--force", name], capture_output=True, timeout=60
    )


async def balance_of(database_url: str, customer_id: str) -> int | None:
    db = Database(database_url)
    try:
        async with db.connect() as connection:
            return (
                await connection.execute(select(customers.c.balance).where(customers.c.customer_id == customer_id))
            ).scalar()
    except Exception:
        return None  # not created or not migrated yet
    finally:
        await db.dispose()


@pytest.mark.slow
def test_running_it_for_real_as_the_readme_says(database_name, redis_url, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_ENV and k != "VIRTUAL_ENV"}
    env.update(CREDITS_DB=database_name, PORT=str(port), REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    script = tmp_path / "running-it-for-real.sh"
    script.write_text("set -e\n" + readme_block("Running it for real"))
    log_path = tmp_path / "honcho.log"
    shell = subprocess.Popen(
        ["bash", str(script)],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log = lambda: log_path.read_text(errors="replace")  # noqa: E731
    base = f"http://127.0.0.1:{port}"
    database_url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database_name}"

    def ready() -> bool:
        assert shell.poll() is None, f"the README's commands exited with {shell.returncode}:\n{log()}"
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=180, interval=0.5, message=f"the web on {base} to be ready")
        wait_until(
            lambda: "Worker process is ready for action" in log() and "scheduler_started" in log(),
            timeout=60,
            message="worker and scheduler to start",
        )
        started = time.monotonic()

        customer = f"readme-{uuid.uuid4().hex[:8]}"
        publisher = Publisher.from_url(redis_url)
        publisher.publish(
            PaymentSucceeded(
                event_id=f"pay-{customer}",
                customer_id=customer,
                occurred_at=datetime.now(UTC),
                payment_id=f"in_{customer}",
                credits=4,
            )
        )
        publisher.close()
        wait_until(
            lambda: asyncio.run(balance_of(database_url, customer)) == 4,
            timeout=60,
            interval=0.5,
            message="the published payment to be applied",
        )

        while time.monotonic() - started < STAYS_UP_SECONDS:
            assert shell.poll() is None, f"honcho stopped after {time.monotonic() - started:.1f}s:\n{log()}"
            time.sleep(0.5)
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        assert not re.search(r"\| (web|worker|scheduler)\.1 (stopped|exited)", log()), log()  # none ended meanwhile
    finally:
        stop_process(shell, signal.SIGINT, group=True)  # Ctrl-C in the terminal
    output = log()
    for process in ("web.1", "worker.1", "scheduler.1"):
        assert f"{process} started" in output and f"{process} stopped" in output, output
    assert "database migrated to head" in output
