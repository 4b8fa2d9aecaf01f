"""Periodic work end to end: `credits run <job>` enqueues on real Redis, real workers sweep
PostgreSQL; sweeps are idempotent (twice, or two at once, change nothing more); an `--as-of`
in the future is refused; two schedulers never both enqueue the same tick.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dramatiq
import dramatiq.brokers.redis
import pytest
from sqlalchemy import func, select

from domain import CreditPolicy
from infra.db.tables import credit_lots, dead_letters, holds, ledger_entries
from messages import Publisher
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import ROOT, reconciliation, wait_until
from tests.support.delivery import (
    customer_row,
    dead_letter_rows,
    dead_lettered,
    entries_of,
    job,
    ledger_snapshot,
    log_records,
    payment,
    raw_broker,
    retry_lines,
    scalar,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)

SWEEPS_QUEUE = "credit_sweeps"
CREDITS_CLI = Path(sys.executable).with_name("credits")
ENQUEUED = re.compile(r"enqueued (?P<job>\w+) as message (?P<id>[0-9a-f-]{36})")
UTC = UTC


def credits_run(service_env: dict[str, str], job_name: str, as_of: str | None) -> subprocess.Popen:
    """Start `credits run <job> [--as-of ...]`, the operator's command, as its own process."""
    command = [str(CREDITS_CLI), "run", job_name, *(["--as-of", as_of] if as_of else [])]
    return subprocess.Popen(
        command, cwd=ROOT, env=service_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def sweep_message(broker, actor_name: str, as_of: str) -> str:
    """Enqueue a periodic job's message as any producer could; returns its id."""
    message = dramatiq.Message(
        queue_name=SWEEPS_QUEUE, actor_name=actor_name, args=(), kwargs={"as_of": as_of}, options={}
    )
    return broker.enqueue(message).message_id


def enqueued(process: subprocess.Popen) -> str:
    """Wait for a `credits run` to finish; returns the message id it enqueued."""
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    match = ENQUEUED.search(output)
    assert match, output
    return match["id"]


def sweeps(service_env, job_name: str, as_of: str | None, times: int = 1) -> list[str]:
    """Run `credits run` ``times`` times at once; returns the message ids."""
    processes = [credits_run(service_env, job_name, as_of) for _ in range(times)]
    return [enqueued(process) for process in processes]


def sweep_results(workers, message_ids) -> dict[str, dict]:
    """Wait for each sweep message's `sweep_done` line; message id → that line."""

    def done() -> dict[str, dict]:
        return {
            r["message_id"]: r
            for r in log_records(workers)
            if r.get("event") == "sweep_done" and r.get("message_id") in message_ids
        }

    wait_until(lambda: len(done()) == len(message_ids), timeout=30, message=f"{len(message_ids)} sweep(s) done")
    return done()


def at(year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, 12, tzinfo=UTC)


async def expired_entries(db) -> list[dict]:
    async with db.connect() as connection:
        rows = (
            (
                await connection.execute(
                    select(ledger_entries)
                    .where(ledger_entries.c.kind == "expired")
                    .order_by(ledger_entries.c.customer_id, ledger_entries.c.id)
                )
            )
            .mappings()
            .all()
        )
    return [dict(row) for row in rows]


async def test_expire_credits_writes_each_expiry_once_even_run_twice_and_concurrently(
    db, redis_client, redis_url, service_env, start_workers
):
    # Two processes, and batches of 3 due lots, so two concurrent sweeps really interleave.
    workers = start_workers(processes=2, threads=2, env={"SWEEP_BATCH_SIZE": "3"})
    publisher = Publisher.from_url(redis_url)
    events = [
        payment("a-pay", "exp-a", 10, at(2024, 1, 10)),  # expires 2025-01-10, 7 left
        job("a-done", "exp-a", "a-job", at(2024, 2, 1), credits=3),
        payment("b-pay-old", "exp-b", 5, at(2024, 3, 1)),  # expires 2025-03-01
        payment("b-pay-new", "exp-b", 8, at(2025, 1, 15)),  # expires 2026-01-15: not due
        payment("c-pay", "exp-c", 4, at(2024, 5, 1)),  # spent before it expires
        job("c-done", "exp-c", "c-job", at(2024, 5, 2), credits=4),
        payment("d-pay", "exp-d", 6, at(2025, 5, 1)),  # expires 2026-05-01: not due
        *(payment(f"bulk-{n}-pay", f"exp-bulk-{n:02d}", 2 + n, at(2024, 1, 1 + n)) for n in range(10)),
    ]
    applied = [publisher.publish(event) for event in events]
    assert set(wait_for_outcomes(workers, applied).values()) == {"event_applied"}
    before = {c: await customer_row(db, c) for c in ("exp-c", "exp-d")}
    entries_before = {c: await entries_of(db, c) for c in ("exp-c", "exp-d")}
    as_of = "2025-06-01T00:00:00+00:00"

    # Two operators run the same sweep at the same moment.
    first = sweeps(service_env, "expire_credits", as_of, times=2)
    results = sweep_results(workers, first)

    expired = await expired_entries(db)
    due = {
        "exp-a": (7, at(2025, 1, 10)),
        "exp-b": (5, at(2025, 3, 1)),
        **{f"exp-bulk-{n:02d}": (2 + n, at(2025, 1, 1 + n)) for n in range(10)},
    }
    # One expiry entry per due lot, dated at the lot's expiry, none for anything else.
    assert {e["customer_id"]: (-e["credits"], e["occurred_at"]) for e in expired} == due
    assert len(expired) == len(due)
    assert {e["event_id"] for e in expired} == {f"sweep:{as_of}"}
    # The two sweeps shared the work between them instead of doing it twice.
    assert sum(r["entries"] for r in results.values()) == len(due)

    a, b = await customer_row(db, "exp-a"), await customer_row(db, "exp-b")
    assert (a["balance"], a["overdraft"], a["credits_depleted_at"]) == (0, 0, at(2025, 1, 10))
    assert (b["balance"], b["credits_depleted_at"]) == (8, None)
    for n in range(10):
        bulk = await customer_row(db, f"exp-bulk-{n:02d}")
        assert (bulk["balance"], bulk["credits_depleted_at"]) == (0, at(2025, 1, 1 + n))
    for c in ("exp-c", "exp-d"):  # nothing due: untouched
        assert {k: v for k, v in (await customer_row(db, c)).items() if k != "updated_at"} == {
            k: v for k, v in before[c].items() if k != "updated_at"
        }
        assert await entries_of(db, c) == entries_before[c]
    assert await scalar(db, select(func.min(credit_lots.c.remaining))) >= 0
    assert await reconciliation(db) == []

    # Running it again (three more, all at once) changes nothing more.
    snapshot = await ledger_snapshot(db)
    again = sweeps(service_env, "expire_credits", as_of, times=3)
    assert {m: r["entries"] for m, r in sweep_results(workers, again).items()} == {m: 0 for m in again}
    assert await ledger_snapshot(db) == snapshot

    assert dead_lettered(redis_client, SWEEPS_QUEUE) == {} and await dead_letter_rows(db) == {}
    assert all(retry_lines(workers, m) == [] for m in first + again)
    publisher.close()


async def test_a_sweep_as_of_the_future_or_a_bad_time_is_refused(
    db, redis_client, redis_url, service_env, start_workers
):
    workers = start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    # A lot that is due as of now: a refused sweep must not touch it.
    applied = publisher.publish(payment("old-pay", "exp-refused", 5, at(2024, 1, 10)))
    assert wait_for_outcomes(workers, [applied]) == {applied: "event_applied"}
    snapshot = await ledger_snapshot(db)

    future = (datetime.now(UTC) + timedelta(days=365)).isoformat()
    # `credits run` refuses these itself (tests/admin/test_cli.py); a message from
    # anywhere else (another producer, an old release) is refused by the actor.
    broker = dramatiq.brokers.redis.RedisBroker(url=redis_url)
    runs = {  # name → (the message, what the refusal must say)
        "future": (sweep_message(broker, "expire_credits", future), f"as_of {future} is in the future"),
        "lapse future": (sweep_message(broker, "lapse_holds", future), "is in the future"),
        "naive": (sweep_message(broker, "expire_credits", "2025-06-01T00:00:00"), "must carry a timezone"),
        "not a time": (sweep_message(broker, "expire_credits", "yesterday"), "must be an ISO 8601 timestamp"),
    }
    broker.close()
    refused = {name: (message_id, reason) for name, (message_id, reason) in runs.items()}
    ids = [message_id for message_id, _ in refused.values()]
    rows = await wait_for_dead_letter_rows(db, ids)
    wait_until(
        lambda: set(dead_lettered(redis_client, SWEEPS_QUEUE)) == set(ids),
        message="the refused sweeps in the Redis dead-letter queue",
    )
    records = log_records(workers)
    for name, (message_id, reason) in refused.items():
        assert rows[message_id]["queue_name"] == SWEEPS_QUEUE
        assert rows[message_id]["error"].startswith("Rejected: ") and reason in rows[message_id]["error"], (
            name,
            rows[message_id],
        )
        # Refused at once: one attempt, no retry, an error line tied to the message.
        assert sum(r.get("event") == f"Aborting message '{message_id}'." for r in records) == 1, name
        assert retry_lines(workers, message_id) == [], name
        assert any(
            r.get("event") == "message_dead_lettered" and r.get("message_id") == message_id and r["level"] == "error"
            for r in records
        ), name
    assert not any(r.get("event") == "sweep_done" for r in records)
    assert await ledger_snapshot(db) == snapshot  # nothing expired
    assert dead_lettered(redis_client) == {}  # the events queue is untouched
    publisher.close()


async def test_lapse_holds_lapses_each_due_hold_once(db, redis_client, redis_url, service_env, start_workers):
    workers = start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    paid = [
        publisher.publish(payment("h-pay", "hold-a", 10, at(2025, 1, 1))),
        publisher.publish(payment("h2-pay", "hold-b", 4, at(2025, 1, 1))),
    ]
    assert set(wait_for_outcomes(workers, paid).values()) == {"event_applied"}

    # Bookings place holds through the service layer (as the HTTP API does), at old times.
    policy = CreditPolicy()  # the workers' default policy: holds live 30 days
    for customer, job_id, credits, placed in [
        ("hold-a", "h-due", 3, at(2025, 1, 10)),  # lapses 2025-02-09
        ("hold-a", "h-live", 2, at(2025, 2, 5)),  # lapses 2025-03-07: not due
        ("hold-b", "h2-due", 4, at(2025, 1, 5)),  # lapses 2025-02-04
    ]:
        hold, created = await handlers.place_hold(SqlUnitOfWork(db), policy, customer, job_id, credits, placed)
        assert created and hold.expires_at == placed + timedelta(days=30)
    balances = {c: (await customer_row(db, c))["balance"] for c in ("hold-a", "hold-b")}
    as_of = "2025-03-01T00:00:00+00:00"

    results = sweep_results(workers, sweeps(service_env, "lapse_holds", as_of, times=2))
    assert sum(r["entries"] for r in results.values()) == 2

    async with db.connect() as connection:
        statuses = {r.job_id: (r.status, r.closed_at) for r in (await connection.execute(select(holds))).all()}
        lapsed = (
            (await connection.execute(select(ledger_entries).where(ledger_entries.c.kind == "lapsed"))).mappings().all()
        )
    assert statuses == {
        "h-due": ("lapsed", at(2025, 2, 9)),
        "h-live": ("active", None),
        "h2-due": ("lapsed", at(2025, 2, 4)),
    }
    assert sorted((e["job_id"], e["credits"], e["occurred_at"], e["event_id"]) for e in lapsed) == [
        ("h-due", 3, at(2025, 2, 9), f"sweep:{as_of}"),
        ("h2-due", 4, at(2025, 2, 4), f"sweep:{as_of}"),
    ]
    # A hold changes what is available, never the balance.
    assert {c: (await customer_row(db, c))["balance"] for c in balances} == balances
    assert await reconciliation(db) == []

    # Again (three more, all at once): nothing more.
    snapshot = await ledger_snapshot(db)
    again = sweeps(service_env, "lapse_holds", as_of, times=3)
    assert {m: r["entries"] for m, r in sweep_results(workers, again).items()} == {m: 0 for m in again}
    assert await ledger_snapshot(db) == snapshot

    # The live hold is still capturable by its job's completion; the lapsed one is debited directly.
    done = [
        publisher.publish(job("h-live-done", "hold-a", "h-live", at(2025, 3, 2), credits=2)),
        publisher.publish(job("h-due-done", "hold-a", "h-due", at(2025, 3, 3), credits=3)),
    ]
    assert set(wait_for_outcomes(workers, done).values()) == {"event_applied"}
    charges = {e["job_id"]: e["kind"] for e in await entries_of(db, "hold-a") if e["kind"] in ("captured", "debited")}
    assert charges == {"h-live": "captured", "h-due": "debited"}
    assert (await customer_row(db, "hold-a"))["balance"] == 5
    assert await reconciliation(db) == []
    assert (
        dead_lettered(redis_client, SWEEPS_QUEUE) == {}
        and await scalar(db, select(func.count()).select_from(dead_letters)) == 0
    )
    publisher.close()


class QueueingActor:
    """Stands in for a periodic actor in the test process: sends the message the real one would."""

    def __init__(self, broker: dramatiq.Broker, actor_name: str) -> None:
        self.broker = broker
        self.actor_name = actor_name

    def send(self) -> dramatiq.Message:
        return self.broker.enqueue(
            dramatiq.Message(queue_name=SWEEPS_QUEUE, actor_name=self.actor_name, args=(), kwargs={}, options={})
        )


def queued_actors(redis_client, queues: tuple[str, ...] = (SWEEPS_QUEUE,)) -> list[str]:
    names = []
    for queue in queues:
        ids = [i.decode() for i in redis_client.lrange(f"dramatiq:{queue}", 0, -1)]
        bodies = redis_client.hmget(f"dramatiq:{queue}.msgs", ids) if ids else []
        names += [json.loads(body)["actor_name"] for body in bodies]
    return names


async def test_two_schedulers_enqueue_each_tick_once(db, redis_client, redis_url, start_workers):
    from workers.scheduler import LOCK_PREFIX, PeriodicJob, fire

    broker = raw_broker(redis_url)
    expire = PeriodicJob(QueueingActor(broker, "expire_credits"), timedelta(minutes=60))
    lapse = PeriodicJob(QueueingActor(broker, "lapse_holds"), timedelta(minutes=15))
    tick_start = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)

    # Same tick, two schedulers (seconds and minutes apart): only the first enqueues.
    assert fire(expire, redis_client, "scheduler-a", tick_start + timedelta(seconds=1)) is True
    assert fire(expire, redis_client, "scheduler-b", tick_start + timedelta(minutes=59)) is False
    assert redis_client.llen(f"dramatiq:{SWEEPS_QUEUE}") == 1
    lock = f"{LOCK_PREFIX}:expire_credits:{int(tick_start.timestamp()) // 3600}"
    assert redis_client.get(lock) == b"scheduler-a"
    assert 0 < redis_client.ttl(lock) <= 2 * 3600

    # The next tick, claimed by two schedulers racing in threads: exactly one enqueues.
    barrier = threading.Barrier(8)
    fired: list[bool] = []

    def race(owner: str) -> None:
        barrier.wait()
        fired.append(fire(expire, redis_client, owner, tick_start + timedelta(hours=1, seconds=3)))

    threads = [threading.Thread(target=race, args=(f"scheduler-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(fired) == [False] * 7 + [True]
    assert redis_client.llen(f"dramatiq:{SWEEPS_QUEUE}") == 2

    # Another job's tick is its own: it fires, once.
    assert fire(lapse, redis_client, "scheduler-a", tick_start + timedelta(minutes=1)) is True
    assert fire(lapse, redis_client, "scheduler-b", tick_start + timedelta(minutes=14)) is False
    assert queued_actors(redis_client) == ["expire_credits", "expire_credits", "lapse_holds"]

    # And what was enqueued is what the workers run: three sweeps as of now, over an empty ledger.
    workers = start_workers(processes=1, threads=2)
    wait_until(
        lambda: sum(r.get("event") == "sweep_done" for r in log_records(workers)) == 3,
        timeout=30,
        message="the three scheduled sweeps done",
    )
    done = [r for r in log_records(workers) if r.get("event") == "sweep_done"]
    assert sorted(r["sweep"] for r in done) == ["expire_credits", "expire_credits", "lapse_holds"]
    assert redis_client.llen(f"dramatiq:{SWEEPS_QUEUE}") == 0
    assert dead_lettered(redis_client, SWEEPS_QUEUE) == {}
    broker.close()


def _scheduler_lines(output: str) -> list[dict]:
    lines = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") in ("periodic_enqueued", "periodic_skipped"):
            lines.append(record)
    return lines


@pytest.mark.slow
def test_two_scheduler_processes_enqueue_each_tick_once(redis_client, service_env, tmp_path):
    """Two real `credits scheduler` processes (a deploy overlap) both fire at start: one enqueue per job and tick."""
    from workers.scheduler import LOCK_PREFIX

    logs = [tmp_path / f"scheduler-{n}.log" for n in range(2)]
    processes = []
    for log in logs:
        with log.open("wb") as output:
            processes.append(
                subprocess.Popen(
                    [str(CREDITS_CLI), "scheduler"], cwd=ROOT, env=service_env, stdout=output, stderr=subprocess.STDOUT
                )
            )
    try:
        # Each scheduler fires its eight jobs once at start: sixteen decisions in all.
        wait_until(
            lambda: sum(len(_scheduler_lines(log.read_text())) for log in logs) == 16,
            timeout=60,
            message="both schedulers to fire every job",
        )
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    decisions = [record for log in logs for record in _scheduler_lines(log.read_text())]
    jobs = [
        "archive_dead_letters",
        "collect_payments",
        "expire_credits",
        "lapse_holds",
        "notice_retention_crossings",
        "pay_referrals",
        "send_notifications",
        "warn_expiring_credits",
    ]
    assert sorted(r["job"] for r in decisions) == sorted(jobs * 2)
    by_tick: dict[tuple[str, int], list[str]] = {}
    for record in decisions:
        by_tick.setdefault((record["job"], record["tick"]), []).append(record["event"])
    # Per job and tick, exactly one scheduler enqueued and any other skipped (the two schedulers
    # share a tick unless they started on either side of a tick boundary).
    for (job_name, tick), events in by_tick.items():
        assert sorted(events) == ["periodic_enqueued"] + ["periodic_skipped"] * (len(events) - 1), (
            job_name,
            tick,
            events,
        )
        assert redis_client.exists(f"{LOCK_PREFIX}:{job_name}:{tick}")
    assert sorted(queued_actors(redis_client, (SWEEPS_QUEUE, "credit_payments", "credit_notifications"))) == sorted(
        job_name for job_name, _ in by_tick
    )


@pytest.mark.slow
def test_the_scheduler_enqueues_on_rabbitmq_when_broker_url_says_so(rabbitmq_url, redis_client, service_env, tmp_path):
    """BROKER_URL=amqp://…: the scheduler's messages go to RabbitMQ (ticks still claimed in REDIS_URL, emptied by redis_client)."""
    from tests.conftest import BROKER_QUEUES
    from tests.support import BrokerUnderTest, rabbitmq_reset

    rabbitmq_reset(rabbitmq_url, BROKER_QUEUES)
    log = tmp_path / "scheduler.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(CREDITS_CLI), "scheduler"],
            cwd=ROOT,
            env={**service_env, "BROKER_URL": rabbitmq_url},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(
            lambda: len(_scheduler_lines(log.read_text())) == 8, timeout=60, message="the scheduler to fire every job"
        )
    finally:
        process.terminate()
        process.wait(15)
    assert {r["event"] for r in _scheduler_lines(log.read_text())} == {"periodic_enqueued"}
    rabbit = BrokerUnderTest("rabbitmq", rabbitmq_url)
    assert sum(rabbit.waiting(queue) for queue in (SWEEPS_QUEUE, "credit_payments", "credit_notifications")) == 8
