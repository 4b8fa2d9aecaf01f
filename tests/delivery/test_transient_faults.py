"""Transient faults are retried with back-off and end in exactly one application; a worker
refuses to start on a database it cannot use.

The database outage is real: the workers reach PostgreSQL through a TCP proxy in this module,
which is stopped (listener closed, every forwarded connection cut) and started again on the
same port. A fault inside a transaction is real too: the worker's backend is terminated
with pg_terminate_backend while it waits on a lock the test holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from sqlalchemy import func, select, text

from infra.db.tables import dead_letters, ledger_entries, processed_events
from messages import Publisher
from tests.support import ROOT, eventually, reconciliation, wait_until
from tests.support.delivery import (
    customer_row,
    dead_lettered,
    entries_of,
    job,
    log_records,
    outcomes_of,
    payment,
    retry_lines,
    scalar,
    wait_for_outcomes,
)
from tests.support.faults import (
    RETRY_DELAY,
    TcpProxy,
)


def retry_delays(workers, message_id: str) -> list[int]:
    return [int(RETRY_DELAY.match(line)["ms"]) for line in retry_lines(workers, message_id)]


async def test_database_outage_is_retried_with_backoff_then_applied_once(
    db, redis_client, redis_url, pg_url, start_workers
):
    proxy = TcpProxy()
    proxy.start()
    try:
        # Boot through the proxy (the schema check needs the database), then warm the pool.
        workers = start_workers(processes=1, threads=2, env={"DATABASE_URL": proxy.url(pg_url)})
        publisher = Publisher.from_url(redis_url)
        first = publisher.publish(payment("outage-pay", "cust-outage", 5))
        assert wait_for_outcomes(workers, [first]) == {first: "event_applied"}

        proxy.stop()  # PostgreSQL is now unreachable from the workers (and every pooled connection is dead)
        during = publisher.publish(job("outage-done", "cust-outage", "outage-job", credits=2))
        wait_until(
            lambda: len(retry_lines(workers, during)) >= 4,
            timeout=30,
            message="four retries while the database is down",
        )
        # Still nothing applied, nothing dead-lettered: the event is waiting in Redis, not lost.
        assert during not in outcomes_of(workers)
        assert (
            await scalar(
                db,
                select(func.count()).select_from(processed_events).where(processed_events.c.event_id == "outage-done"),
            )
            == 0
        )
        assert dead_lettered(redis_client) == {}
        failures = [
            r for r in log_records(workers) if r.get("level") == "error" and "unhandled exception" in r.get("event", "")
        ]
        assert failures and all("exception" in r for r in failures), "the failed attempts should log their error"

        proxy.start()  # the database is back
        assert wait_for_outcomes(workers, [during], timeout=30) == {during: "event_applied"}
    finally:
        proxy.stop()

    # Applied exactly once, after retries with exponential back-off within the configured bounds.
    assert [r["event"] for r in outcomes_of(workers)[during]] == ["event_applied"]
    delays = retry_delays(workers, during)
    assert len(delays) >= 4
    assert all(100 <= delay <= 2000 for delay in delays), delays  # EVENT_MIN/MAX_BACKOFF_MS
    assert all(delay >= 100 * 2**attempt for attempt, delay in enumerate(delays[:4])), delays  # doubling
    charges = [e for e in await entries_of(db, "cust-outage") if e["job_id"] == "outage-job"]
    assert [(e["kind"], e["credits"]) for e in charges] == [("debited", -2)]
    assert (await customer_row(db, "cust-outage"))["balance"] == 3
    assert await scalar(db, select(func.count()).select_from(processed_events)) == 2
    assert await scalar(db, select(func.count()).select_from(dead_letters)) == 0
    assert dead_lettered(redis_client) == {}
    assert await reconciliation(db) == []
    assert proxy.connections >= 2  # the pool reconnected through the restarted proxy
    publisher.close()


async def test_connection_killed_inside_a_transaction_is_retried_and_applied_once(
    db, redis_client, redis_url, start_workers
):
    workers = start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    first = publisher.publish(payment("kill-pay", "cust-kill", 5))
    assert wait_for_outcomes(workers, [first]) == {first: "event_applied"}
    event = job("kill-done", "cust-kill", "kill-job", credits=4)

    async with db.connect() as blocker, db.connect() as admin:
        # Hold the event's idempotency key in an open transaction: the worker, having already
        # locked and touched the customer row, waits on it mid-transaction.
        await blocker.begin()
        await blocker.execute(
            processed_events.insert().values(
                event_id="kill-done",
                event_type=event.type,
                customer_id="cust-kill",
                fingerprint=event.fingerprint(),
                payload={},
            )
        )
        message_id = publisher.publish(event)

        await eventually(lambda: _waiters(admin, exclude=None), message="the worker waiting inside its transaction")
        [killed] = await _waiters(admin, exclude=None)
        assert (await admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": killed})).scalar() is True
        await admin.commit()
        wait_until(lambda: len(retry_lines(workers, message_id)) >= 1, message="the killed attempt to be retried")
        # The retry, on a new connection, waits on the same key again; nothing of either attempt is visible.
        await eventually(lambda: _waiters(admin, exclude=killed), message="the retry waiting on the key")
        async with db.connect() as reader:
            assert (
                await reader.execute(
                    select(func.count()).select_from(ledger_entries).where(ledger_entries.c.event_id == "kill-done")
                )
            ).scalar() == 0
        await blocker.rollback()  # let it through

    assert wait_for_outcomes(workers, [message_id]) == {message_id: "event_applied"}
    assert [r["event"] for r in outcomes_of(workers)[message_id]] == ["event_applied"]
    charges = [e for e in await entries_of(db, "cust-kill") if e["job_id"] == "kill-job"]
    assert [(e["kind"], e["credits"], e["event_id"]) for e in charges] == [("debited", -4, "kill-done")]
    assert (await customer_row(db, "cust-kill"))["balance"] == 1
    assert await scalar(db, select(func.count()).select_from(dead_letters)) == 0
    assert dead_lettered(redis_client) == {}
    assert await reconciliation(db) == []
    publisher.close()


async def _waiters(admin, exclude: int | None) -> list[int]:
    """Backends blocked on a lock while writing processed_events (the worker's claim), but not ``exclude``."""
    pids = (
        (
            await admin.execute(
                text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND wait_event_type = 'Lock' AND query ILIKE '%processed_events%'"
                )
            )
        )
        .scalars()
        .all()
    )
    await admin.commit()  # pg_stat_activity is a snapshot per transaction: end it to see changes
    return [pid for pid in pids if pid != exclude]


def _start_refused_worker(env: dict[str, str], timeout: float = 60.0) -> tuple[int, str]:
    """Run a worker that should refuse to boot; returns its exit code and output."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # its own process group: the worker process too
        output, _ = process.communicate()
        raise AssertionError(f"the worker did not exit within {timeout}s:\n{output}") from None
    return process.returncode, output


@pytest.mark.slow
def test_a_worker_refuses_to_start_on_an_unmigrated_database(service_env, empty_database):
    returncode, output = _start_refused_worker({**service_env, "DATABASE_URL": empty_database})
    assert returncode != 0, output
    assert "not migrated" in output and "credits migrate" in output, output
    assert "Worker process is ready for action" not in output


@pytest.mark.slow
async def test_a_worker_refuses_to_start_without_a_reachable_database(service_env):
    proxy = TcpProxy()
    proxy.start()
    proxy.stop()  # a port that refuses connections
    returncode, output = _start_refused_worker({**service_env, "DATABASE_URL": proxy.url(service_env["DATABASE_URL"])})
    assert returncode != 0, output
    assert "cannot reach the database" in output, output
    assert "Worker process is ready for action" not in output
