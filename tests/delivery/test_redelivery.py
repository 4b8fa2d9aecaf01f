"""A dead worker process's messages come back quickly with the SHIPPED settings.

No accelerated maintenance here (no ``Janitor``, no REDIS_* overrides): the operator's
``credits worker`` with the defaults of infra/settings.py. Under load one worker process is
killed with SIGKILL; the messages it had fetched (its Redis ack set) must be redelivered and
applied within the bound docs/OPERATIONS.md ("Supervision") states, and the group goes on
working (the supervisor restarts it).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import asyncpg
import pytest

from infra.settings import Settings
from messages import EVENTS_QUEUE, Publisher
from tests.support.faults import (
    assert_ledger_as_expected,
    leftovers,
    plain_dsn,
    processed_count,
    publish_all,
    report,
    worker_children,
    workload,
)

pytestmark = pytest.mark.slow

#: Enough to keep both processes busy past the kill and the restart, on this shared machine.
EVENTS = 1_500
#: Documented in docs/OPERATIONS.md: a dead process's messages are back on their queue within
#: heartbeat timeout + one maintenance interval of its death (plus this much for a loaded
#: machine), and applied once the messages queued before them are (Dramatiq requeues at the tail).
SLACK_SECONDS = 10
#: The issue's target for "applied": two minutes.
APPLIED_BOUND_SECONDS = 120


def _main_process(supervisor_pid: int) -> int | None:
    """The `dramatiq` main process the supervisor (`credits worker`) is running now."""
    children = [pid for pid in _children(supervisor_pid)]
    return children[0] if children else None


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry))
    return found


def _stranded(client, broker_id: str) -> dict[str, str]:
    """redis message id → event id, for every message the process had fetched and not acknowledged."""
    stranded = {}
    for queue in (EVENTS_QUEUE, f"{EVENTS_QUEUE}.DQ"):
        for redis_id in client.smembers(f"dramatiq:__acks__.{broker_id}.{queue}"):
            body = client.hget(f"dramatiq:{queue}.msgs", redis_id)
            if body is not None:
                stranded[redis_id.decode()] = json.loads(json.loads(body)["kwargs"]["event"])["event_id"]
    return stranded


async def test_a_killed_worker_process_messages_are_applied_within_the_documented_bound(
    db, pg_url, redis_client, redis_url, service_env, start_workers, tmp_path
):
    assert not {k for k in service_env if k.startswith("REDIS_HEARTBEAT") or k.startswith("REDIS_MAINTENANCE")}
    shipped = Settings()
    requeue_bound = shipped.redis_heartbeat_timeout_seconds + shipped.redis_maintenance_interval_seconds + SLACK_SECONDS
    prefix = "rd"
    events = workload(EVENTS, customers=100, seed=1606, prefix=prefix)
    publisher = Publisher.from_url(redis_url)
    publish_all(publisher, events)
    publisher.close()

    workers = start_workers(processes=2, threads=4, supervised=True)
    connection = await asyncpg.connect(plain_dsn(pg_url))
    try:
        while await processed_count(connection, prefix) < EVENTS // 10:
            await asyncio.sleep(0.05)
        main = _main_process(workers.process.pid)
        broker_ids = {
            r["pid"]: r["broker_id"] for r in workers.records() if r.get("event") == "worker_heartbeat_started"
        }
        victim = next(
            pid
            for pid in worker_children(main)
            if redis_client.scard(f"dramatiq:__acks__.{broker_ids[pid]}.{EVENTS_QUEUE}")
        )
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        stranded = _stranded(redis_client, broker_ids[victim])
        assert stranded, "the killed process held no messages: the test proves nothing"
        at_kill = await processed_count(connection, prefix)

        async def all_applied() -> bool:
            done = await connection.fetchval(
                "SELECT count(*) FROM processed_events WHERE event_id = ANY($1::text[])", list(stranded.values())
            )
            return done == len(stranded)

        def requeued() -> bool:  # Dramatiq's maintenance put them back on the queue (or acknowledged)
            return not redis_client.exists(
                *(f"dramatiq:__acks__.{broker_ids[victim]}.{q}" for q in (EVENTS_QUEUE, f"{EVENTS_QUEUE}.DQ"))
            )

        applied_after = requeued_after = None
        while applied_after is None or requeued_after is None:
            elapsed = time.monotonic() - killed_at
            assert requeued_after is not None or elapsed < requeue_bound, f"not requeued after {elapsed:.0f}s"
            assert elapsed < APPLIED_BOUND_SECONDS, (
                f"after {elapsed:.0f}s: not all {len(stranded)} stranded events applied"
            )
            if requeued_after is None and requeued():
                requeued_after = elapsed
            if applied_after is None and await all_applied():
                applied_after = elapsed
            await asyncio.sleep(0.2)

        # The group was started again (by the supervisor) and everything else was applied too.
        while await processed_count(connection, prefix) < EVENTS or leftovers(redis_client, [EVENTS_QUEUE]):
            assert time.monotonic() - killed_at < 180, (
                f"{await processed_count(connection, prefix)} of {EVENTS} applied, Redis {leftovers(redis_client, [EVENTS_QUEUE])}"
            )
            await asyncio.sleep(0.2)
        assert _main_process(workers.process.pid) != main, "the supervisor did not start a new group"
        lost, doubled = await assert_ledger_as_expected(connection, events, prefix)
    finally:
        await connection.close()

    report(
        tmp_path,
        "worker_killed_shipped_settings",
        events=EVENTS,
        heartbeat_timeout_seconds=shipped.redis_heartbeat_timeout_seconds,
        maintenance_interval_seconds=shipped.redis_maintenance_interval_seconds,
        applied_before_kill=at_kill,
        stranded_by_kill=len(stranded),
        requeued_seconds=round(requeued_after, 1),
        requeue_bound_seconds=requeue_bound,
        stranded_applied_seconds=round(applied_after, 1),
        applied_bound_seconds=APPLIED_BOUND_SECONDS,
        throughput_note="stranded messages go back at the tail of the queue: applied after what was queued before them",
        lost=lost,
        doubled=doubled,
    )
