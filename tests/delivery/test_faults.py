"""Fault injection against the real pipeline: Publisher → Redis → `dramatiq workers.actors` → PostgreSQL.

Each test breaks one piece of the machinery while real worker processes are busy, lets the
system recover by its own means (retries, redelivery, re-publishing as the producer contract
says, re-running a periodic job), then compares the final ledger with a fault-free expectation
worked out from the events alone. Each prints one line, ``FIGURES {...}``: events, faults
injected, events lost, events doubled (also written as JSON to the test's tmp_path).

1. worker processes killed with SIGKILL mid-stream (plus a poison message that must end in
   the dead letters after a bounded number of attempts), on Redis and on RabbitMQ;
2. PostgreSQL connections terminated (pg_terminate_backend) mid-stream;
3. Redis killed and restarted empty (no persistence): what was only in Redis is lost, the
   producer re-publishes everything, only the missing events are applied; scheduled work
   (dunning retries, referral payouts) lives in PostgreSQL and survives;
4. the expiry sweep's worker killed mid-sweep, then the sweep run again: each lot expires once;
5. a message refused while the database is unreachable: its copy in the `dead_letters` table
   (FAILS today: ArchiveDeadLetters tries the insert once and only logs the failure).

Redelivery after a worker crash: Dramatiq's Redis broker hands a dead worker's unacknowledged
messages back only when *maintenance* runs (randomly, 1 in 1,000 broker commands) and the
worker has missed heartbeats for ``heartbeat_timeout`` (60 s by default). The tests run that
same maintenance (Dramatiq's own Lua script) every second with a 10 s timeout, via ``Janitor``,
so a crash is recovered within the test's time budget; production recovers the same way, within
35 s (tests/delivery/test_redelivery.py measures it with the shipped settings). RabbitMQ
hands a dead consumer's unacknowledged messages back when its connection closes: at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest
import redis

from messages import (
    EVENTS_QUEUE,
    CustomerSignedUp,
    PaymentFailed,
    PaymentReversed,
    PaymentSucceeded,
    Publisher,
)
from tests.support import ROOT, reconciliation, wait_until
from tests.support.faults import (
    CREDITS_CLI,
    EVENT_QUEUES,
    FAST_RETRIES,
    SWEEPS_QUEUE,
    T0,
    Janitor,
    PrivateRedis,
    ack_set_sizes,
    assert_ledger_as_expected,
    dead_letter_bodies,
    deliveries_per_event,
    drained,
    expected_ledger,
    leftovers,
    outcome_counts,
    plain_dsn,
    processed_count,
    publish_all,
    report,
    worker_children,
    workload,
)

pytestmark = pytest.mark.slow

WORKER_CRASH_EVENTS = int(os.environ.get("FAULTS_WORKER_CRASH_EVENTS", "10000"))
WORKER_CRASH_KILLS = 5


async def test_workers_killed_mid_stream_lose_nothing_and_double_nothing(
    db, pg_url, message_broker, start_workers, tmp_path
):
    on_redis = message_broker.kind == "redis"
    redis_client = redis.Redis.from_url(message_broker.url) if on_redis else None
    started = time.monotonic()
    prefix = "wk"
    events = workload(WORKER_CRASH_EVENTS, customers=200, seed=1101, prefix=prefix)
    rng = random.Random(2202)
    # A reversal of a payment that never arrives: not a rule violation (it may be a few
    # messages behind) but never succeeds: retried EVENT_MAX_RETRIES times, then dead-lettered.
    poison = PaymentReversed(
        event_id=f"{prefix}-poison",
        customer_id=f"{prefix}-poison-customer",
        occurred_at=T0,
        payment_id="never-paid",
        reason="refund",
        total_credits_reversed=1,
    )

    publisher = Publisher.from_url(message_broker.url)
    poison_id = publisher.publish(poison)
    publish_all(publisher, events)
    published_at = time.monotonic()

    # No metrics exposition process (METRICS_PORT=0): the group is exactly its worker processes, the ones to kill.
    env = {**FAST_RETRIES, **message_broker.env, "METRICS_PORT": "0"}
    runs = [start_workers(processes=2, threads=4, env=env)]
    # Redis: Dramatiq's maintenance run every second (RabbitMQ redelivers on a closed connection by itself).
    janitor = Janitor(message_broker.url, EVENT_QUEUES) if on_redis else None
    # Kill at seeded moments, measured in events processed so far (not in seconds: the machine's speed varies).
    kill_at = sorted(rng.sample(range(len(events) // 20, len(events) * 8 // 10), WORKER_CRASH_KILLS))
    kills: list[dict] = []
    connection = await asyncpg.connect(plain_dsn(pg_url))
    try:
        deadline = time.monotonic() + 150
        while True:
            assert time.monotonic() < deadline, (
                f"not done: {await processed_count(connection, prefix)} of {len(events)} processed, {message_broker.waiting(EVENTS_QUEUE)} waiting"
            )
            processed = await processed_count(connection, prefix)
            if janitor:
                janitor.sweep()
            if len(kills) < len(kill_at) and processed >= kill_at[len(kills)]:
                workers = runs[-1]
                children = worker_children(workers.process.pid)
                assert len(children) == 2, children
                victim = rng.choice(children)
                os.kill(victim, signal.SIGKILL)
                kills.append({"after_processed": processed, "pid": victim})
                # The dramatiq main process notices, stops the other worker process (gracefully) and exits:
                # a supervisor restarts it. Here, the test does.
                await asyncio.to_thread(workers.process.wait, 60)
                # The survivor requeued what it had fetched; what is left in ack sets is the dead one's.
                kills[-1]["stranded"] = (
                    sum(ack_set_sizes(redis_client, EVENT_QUEUES)) if on_redis else "not visible on RabbitMQ"
                )
                runs.append(await asyncio.to_thread(start_workers, 2, 4, env))
                continue
            if (
                processed == len(events)
                and set(message_broker.dead_lettered(EVENTS_QUEUE)) == {poison_id}
                and drained(message_broker, redis_client)
            ):
                break
            await asyncio.sleep(0.25)
        drained_at = time.monotonic()

        lost, doubled = await assert_ledger_as_expected(connection, events, prefix)
        assert await reconciliation(db) == []
        # The poison: dead-lettered after its bounded attempts, in Redis and in PostgreSQL, never applied.
        [body] = message_broker.dead_lettered(EVENTS_QUEUE).values()
        assert body["message_id"] == poison_id
        assert body["options"]["retries"] == 2  # EVENT_MAX_RETRIES: three attempts, then the dead letters
        rows = await connection.fetch("SELECT message_id, error FROM dead_letters")
        assert [(r["message_id"], r["error"].split(":")[0]) for r in rows] == [(poison_id, "PaymentNotApplied")]
        assert (
            await connection.fetchval("SELECT count(*) FROM processed_events WHERE event_id = $1", poison.event_id) == 0
        )
        assert (
            await connection.fetchval("SELECT count(*) FROM customers WHERE customer_id = $1", poison.customer_id) == 0
        )
    finally:
        await connection.close()
        if janitor:
            janitor.close()
        publisher.close()

    outcomes = outcome_counts(runs)
    report(
        tmp_path,
        f"worker_crash_{message_broker.kind}",
        events=len(events),
        poison_messages=1,
        customers=len(expected_ledger(events)),
        faults_injected=len(kills),
        fault="SIGKILL of a dramatiq worker process (2 processes x 4 threads), then restart",
        kills_after_processed=[k["after_processed"] for k in kills],
        messages_stranded_by_each_kill=[k["stranded"] for k in kills],
        worker_restarts=len(runs) - 1,
        lost=lost,
        doubled=doubled,
        redelivered_duplicates=outcomes["event_duplicate"],
        deliveries_per_event=deliveries_per_event(runs, prefix),
        retries=outcomes["retries"],
        poison_attempts=body["options"]["retries"] + 1,
        publish_seconds=round(published_at - started, 1),
        drain_seconds=round(drained_at - published_at, 1),
    )


# --------------------------------------------------------------------------- 2. PostgreSQL connections killed


PG_KILL_EVENTS = 1_000


async def test_postgres_connections_killed_mid_stream_lose_nothing_and_half_apply_nothing(
    db, pg_url, redis_client, redis_url, start_workers, tmp_path
):
    from tests.conftest import POSTGRES_ADMIN_DSN

    started = time.monotonic()
    prefix = "pk"
    events = workload(PG_KILL_EVENTS, customers=50, seed=3303, prefix=prefix)
    rng = random.Random(4404)
    # EVENT_MAX_RETRIES=2: a dropped connection must be retried on the outage budget, not on the
    # small one, or events would be dead-lettered (lost) by a mere reconnect.
    runs = [start_workers(processes=2, threads=4, env=FAST_RETRIES)]
    publisher = Publisher.from_url(redis_url)
    publish_all(publisher, events)
    database = pg_url.rsplit("/", 1)[1]
    watcher = await asyncpg.connect(plain_dsn(pg_url))
    killer = await asyncpg.connect(POSTGRES_ADMIN_DSN)  # another database: never a target itself
    watcher_pid = watcher.get_server_pid()
    rounds = terminated = 0
    try:
        # Terminate every backend of the test database (the workers', and this process's own pool)
        # every 0.1-0.4 s for as long as events are being applied.
        while await processed_count(watcher, prefix) < len(events) and rounds < 80:
            await asyncio.sleep(rng.uniform(0.1, 0.4))
            terminated += await killer.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> $2",
                database,
                watcher_pid,
            )
            rounds += 1
        killed_until = await processed_count(watcher, prefix)
        deadline = time.monotonic() + 60
        while (
            await processed_count(watcher, prefix) < len(events) or leftovers(redis_client, EVENT_QUEUES)
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert await processed_count(watcher, prefix) == len(events), (
            f"{len(events) - await processed_count(watcher, prefix)} event(s) never applied; dead letters: {await watcher.fetch('SELECT error FROM dead_letters LIMIT 5')}"
        )
        assert not leftovers(redis_client, EVENT_QUEUES)

        lost, doubled = await assert_ledger_as_expected(watcher, events, prefix)
        assert await reconciliation(db) == []
        # Nothing half-applied: every processed event has its entry, every entry its processed event.
        by_type = dict(
            await watcher.fetch(
                "SELECT event_type, count(*) FROM processed_events WHERE event_id LIKE $1 GROUP BY event_type",
                f"{prefix}-%",
            )
        )
        by_kind = dict(
            await watcher.fetch(
                "SELECT kind, count(*) FROM ledger_entries WHERE event_id LIKE $1 GROUP BY kind", f"{prefix}-%"
            )
        )
        assert by_kind == {"issued": by_type["payment.succeeded"], "debited": by_type["job.completed"]}
        orphans = await watcher.fetchval(
            "SELECT count(*) FROM ledger_entries e WHERE e.event_id LIKE $1 AND NOT EXISTS (SELECT 1 FROM processed_events p WHERE p.event_id = e.event_id)",
            f"{prefix}-%",
        )
        assert orphans == 0
        assert await watcher.fetchval("SELECT count(*) FROM dead_letters") == 0
        assert dead_letter_bodies(redis_client, EVENTS_QUEUE) == {}
    finally:
        await watcher.close()
        await killer.close()
        publisher.close()

    outcomes = outcome_counts(runs)
    report(
        tmp_path,
        "postgres_connections_killed",
        events=len(events),
        customers=len(expected_ledger(events)),
        faults_injected=terminated,
        fault="pg_terminate_backend of every backend of the test database",
        kill_rounds=rounds,
        applied_while_killing=killed_until,
        lost=lost,
        doubled=doubled,
        half_applied=0,
        retries=outcomes["retries"],
        redelivered_duplicates=outcomes["event_duplicate"],
        deliveries_per_event=deliveries_per_event(runs, prefix),
        seconds=round(time.monotonic() - started, 1),
    )


# --------------------------------------------------------------------------- 3. Redis restarted empty


@pytest.fixture
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


REDIS_CRASH_EVENTS = 3_000


async def test_redis_restarted_empty_loses_only_unapplied_messages_and_republishing_restores_them(
    db, pg_url, private_redis, stripe_env, fake_stripe, start_workers, tmp_path
):
    from tests.support.fake_stripe import invoice

    started = time.monotonic()
    env = {**stripe_env, "REDIS_URL": private_redis.url, "STRIPE_PLAN_CREDITS": json.dumps({"price_basic": 10})}
    runs = [start_workers(processes=1, threads=4, env=env)]
    publisher = Publisher.from_url(private_redis.url)
    connection = await asyncpg.connect(plain_dsn(pg_url))
    try:
        # ---- scheduled work that lives in PostgreSQL: a dunning case's next retry, a held referral reward
        now = datetime.now(UTC).replace(microsecond=0)
        failed_at, signed_at, paid_at = now - timedelta(days=3), now - timedelta(days=31), now - timedelta(days=30)
        fake_stripe.add_invoice(invoice("in_rs", "cus_rs", subscription="sub_rs"))
        fake_stripe.script("in_rs", "succeed")
        publish_all(
            publisher,
            [
                PaymentFailed(
                    event_id="rs-failed",
                    customer_id="rs-dunning",
                    occurred_at=failed_at,
                    invoice_id="in_rs",
                    decline_code="insufficient_funds",
                ),
                CustomerSignedUp(
                    event_id="rs-signup-referrer",
                    customer_id="rs-referrer",
                    occurred_at=signed_at,
                    email="erin@referrer.example.com",
                ),
            ],
        )
        await _eventually(
            lambda: _scalar(connection, "SELECT count(*) FROM referral_codes WHERE referrer_id = 'rs-referrer'"), 1
        )
        code = await connection.fetchval("SELECT code FROM referral_codes WHERE referrer_id = 'rs-referrer'")
        publish_all(
            publisher,
            [
                CustomerSignedUp(
                    event_id="rs-signup-referred",
                    customer_id="rs-referred",
                    occurred_at=signed_at + timedelta(hours=1),
                    email="sam@referred.example.org",
                    referral_code=code,
                ),
                PaymentSucceeded(
                    event_id="rs-paid",
                    customer_id="rs-referred",
                    occurred_at=paid_at,
                    payment_id="in_rs_paid",
                    credits=10,
                    amount_cents=4900,
                    currency="USD",
                ),
            ],
        )
        await _eventually(
            lambda: _scalar(
                connection,
                "SELECT count(*) FROM referrals WHERE referred_customer_id = 'rs-referred' AND status = 'pending'",
            ),
            1,
        )
        await _eventually(
            lambda: _scalar(
                connection, "SELECT count(*) FROM dunning_cases WHERE invoice_id = 'in_rs' AND status = 'retrying'"
            ),
            1,
        )

        # ---- the stream; Redis dies (kill -9, no persistence) while it is being consumed
        prefix = "rb"
        events = workload(REDIS_CRASH_EVENTS, customers=100, seed=5505, prefix=prefix)
        publish_all(publisher, events)
        await _eventually(lambda: _at_least(processed_count(connection, prefix), len(events) // 4), True, timeout=60)
        private_redis.kill()
        at_kill = await processed_count(connection, prefix)
        private_redis.start()  # same port, empty
        # Let what the worker had in hand finish: it commits to PostgreSQL, only its acks fail (a
        # thread whose ack failed sleeps 5 s before trying again, so wait for 6 s without change).
        settled = await _settled(lambda: processed_count(connection, prefix), quiet=6.0)
        lost_in_redis = len(events) - settled
        assert 0 < lost_in_redis < len(events), (at_kill, settled)
        client = redis.Redis.from_url(private_redis.url)
        assert (
            client.llen(f"dramatiq:{EVENTS_QUEUE}") == 0 and client.hlen(f"dramatiq:{EVENTS_QUEUE}.msgs") == 0
        )  # nothing comes back by itself
        await asyncio.sleep(1.0)
        assert await processed_count(connection, prefix) == settled

        # ---- recovery: the producer publishes everything again; only what was missing is applied
        republished_at = time.monotonic()
        republished = set(publish_all(publisher, events))
        await _eventually(lambda: processed_count(connection, prefix), len(events), timeout=90)
        await _eventually(lambda: _async(not leftovers(client, EVENT_QUEUES)), True, timeout=30)
        recovered_at = time.monotonic()
        lost, doubled = await assert_ledger_as_expected(connection, events, prefix)
        assert await reconciliation(db) == []
        outcomes = outcome_counts(runs)
        # What was lost is exactly what the re-published copies applied; every other copy was a duplicate.
        records = [r for w in runs for r in w.records() if r.get("message_id") in republished]
        applied_by_republished = sum(r.get("event") == "event_applied" for r in records)
        assert applied_by_republished == lost_in_redis
        assert sum(r.get("event") == "event_duplicate" for r in records) == len(events) - lost_in_redis
        assert await connection.fetchval("SELECT count(*) FROM dead_letters") == 0

        # ---- scheduled work survived the restart: it is in PostgreSQL, and a periodic run on the new Redis finds it
        case = await connection.fetchrow("SELECT status, next_retry_at FROM dunning_cases WHERE invoice_id = 'in_rs'")
        assert (case["status"], case["next_retry_at"]) == ("retrying", failed_at + timedelta(days=1))
        referral = await connection.fetchrow(
            "SELECT status, approve_after FROM referrals WHERE referred_customer_id = 'rs-referred'"
        )
        assert (referral["status"], referral["approve_after"]) == ("pending", paid_at + timedelta(days=14))
        friday = _first_friday_after(referral["approve_after"] + timedelta(hours=1))
        assert friday < now
        for job_name, as_of in (
            ("collect_payments", failed_at + timedelta(days=1, minutes=1)),
            ("pay_referrals", friday),
        ):
            await asyncio.to_thread(_credits_run, env, job_name, as_of.isoformat())
        await _eventually(
            lambda: _scalar(
                connection, "SELECT count(*) FROM dunning_cases WHERE invoice_id = 'in_rs' AND status = 'recovered'"
            ),
            1,
        )
        await _eventually(lambda: _scalar(connection, "SELECT count(*) FROM payouts WHERE payee_id = 'rs-referrer'"), 1)
        assert [r.idempotency_key for r in fake_stripe.pay_requests("in_rs")] == ["dunning:in_rs:1"]
        assert await connection.fetchval("SELECT balance FROM customers WHERE customer_id = 'rs-dunning'") == 10
        assert await connection.fetchval("SELECT status FROM referrals WHERE referred_customer_id = 'rs-referred'") in (
            "in_payout",
            "paid",
        )
        client.close()
    finally:
        await connection.close()
        publisher.close()

    report(
        tmp_path,
        "redis_restarted_empty",
        events=len(events),
        customers=len(expected_ledger(events)),
        faults_injected=1,
        fault="SIGKILL of redis-server (no RDB, no AOF), restarted empty on the same port",
        applied_at_kill=at_kill,
        applied_after_kill_from_worker_memory=settled - at_kill,
        lost_in_redis=lost_in_redis,
        republished=len(events),
        applied_by_republished_copies=applied_by_republished,
        recognised_duplicates=outcomes["event_duplicate"],
        deliveries_per_event=deliveries_per_event(runs, prefix),
        lost=lost,
        doubled=doubled,
        scheduled_work_survived={
            "dunning_retry": "charged on the new Redis",
            "referral_payout": "made on the new Redis",
        },
        recovery_seconds=round(recovered_at - republished_at, 1),
        seconds=round(time.monotonic() - started, 1),
    )


# --------------------------------------------------------------------------- 4. a sweep's worker killed mid-sweep


SWEEP_CUSTOMERS = 600


async def test_expiry_sweep_killed_mid_batch_then_rerun_expires_each_lot_once(
    db, pg_url, redis_client, redis_url, service_env, start_workers, tmp_path
):
    from domain import CreditPolicy
    from service_layer import handlers
    from service_layer.unit_of_work import SqlUnitOfWork

    started = time.monotonic()
    policy = CreditPolicy()
    issued = datetime(2024, 3, 1, tzinfo=UTC)
    as_of = "2025-12-01T00:00:00+00:00"

    async def pay(n: int, at: datetime, suffix: str = "") -> None:
        event = PaymentSucceeded(
            event_id=f"sw-pay-{n}{suffix}",
            customer_id=f"sw-c{n:04d}",
            occurred_at=at,
            payment_id=f"sw-in-{n}{suffix}",
            credits=1 + n % 7,
        )
        await handlers.apply_event(event, SqlUnitOfWork(db), policy)

    # Every customer has one lot due (expired in 2025); every tenth also one that is not (expires 2026-06).
    for start in range(0, SWEEP_CUSTOMERS, 5):
        await asyncio.gather(
            *(pay(n, issued + timedelta(hours=n)) for n in range(start, min(start + 5, SWEEP_CUSTOMERS)))
        )
    await asyncio.gather(*(pay(n, datetime(2025, 6, 1, tzinfo=UTC), "-fresh") for n in range(0, SWEEP_CUSTOMERS, 10)))
    due = SWEEP_CUSTOMERS

    # Batches of 2 customers: 300 transactions, more than one message's 200 (the sweep re-enqueues itself).
    env = {"SWEEP_BATCH_SIZE": "2", "METRICS_PORT": "0"}  # no metrics process: the one child is the worker
    runs = [start_workers(processes=1, threads=2, env=env)]
    janitor = Janitor(redis_url, (SWEEPS_QUEUE, f"{SWEEPS_QUEUE}.DQ"))
    connection = await asyncpg.connect(plain_dsn(pg_url))

    async def expired() -> int:
        return await connection.fetchval(
            "SELECT count(*) FROM ledger_entries WHERE kind = 'expired' AND customer_id LIKE 'sw-%'"
        )

    try:
        first = await asyncio.to_thread(_credits_run, service_env, "expire_credits", as_of)
        await _eventually(lambda: _at_least(expired(), due // 4), True, timeout=60, interval=0.02)
        [child] = worker_children(runs[0].process.pid)
        os.kill(child, signal.SIGKILL)
        await asyncio.to_thread(runs[0].process.wait, 60)
        await asyncio.sleep(0.5)  # a COMMIT already on its way may still land; nothing after it
        at_kill = await expired()
        assert at_kill < due, "the sweep finished before the kill: make it longer"
        await asyncio.sleep(0.5)
        assert await expired() == at_kill  # the batch in flight was rolled back; nobody sweeps until the restart

        # Restart; the operator runs the sweep again at once; the killed message comes back too (janitor).
        runs.append(await asyncio.to_thread(start_workers, 1, 2, env))
        second = await asyncio.to_thread(_credits_run, service_env, "expire_credits", as_of)

        def sweeps_done() -> list[dict]:
            return [r for r in runs[-1].records() if r.get("event") == "sweep_done"]

        deadline = time.monotonic() + 60
        while True:
            janitor.sweep()
            done = sweeps_done()
            redelivered = any(r.get("message_id") == first for r in done)
            if (
                redelivered
                and any(r.get("message_id") == second for r in done)
                and not leftovers(redis_client, (SWEEPS_QUEUE,))
                and not any(r["more"] for r in done[-1:])
            ):
                break
            assert time.monotonic() < deadline, (
                f"sweeps not done: {done}, Redis {leftovers(redis_client, (SWEEPS_QUEUE,))}"
            )
            await asyncio.sleep(0.5)

        lots = await connection.fetch(
            """
            SELECT l.id, l.event_id, l.amount, l.remaining, l.expired, count(e.id) AS expiries
            FROM credit_lots l
            LEFT JOIN lot_movements m ON m.lot_id = l.id
            LEFT JOIN ledger_entries e ON e.id = m.entry_id AND e.kind = 'expired'
            WHERE l.customer_id LIKE 'sw-%'
            GROUP BY l.id
            """
        )
        due_lots = [lot for lot in lots if not lot["event_id"].endswith("-fresh")]
        fresh_lots = [lot for lot in lots if lot["event_id"].endswith("-fresh")]
        assert len(due_lots) == due and len(fresh_lots) == due // 10
        lost = [lot["id"] for lot in due_lots if lot["expiries"] == 0]
        doubled = [lot["id"] for lot in due_lots if lot["expiries"] > 1]
        assert not lost and not doubled, (lost[:10], doubled[:10])
        assert all((lot["remaining"], lot["expired"]) == (0, lot["amount"]) for lot in due_lots)
        assert all((lot["remaining"], lot["expired"], lot["expiries"]) == (lot["amount"], 0, 0) for lot in fresh_lots)
        assert await expired() == due
        assert await reconciliation(db) == []
        assert dead_letter_bodies(redis_client, SWEEPS_QUEUE) == {}
        assert await connection.fetchval("SELECT count(*) FROM dead_letters") == 0
    finally:
        await connection.close()
        janitor.close()

    done = sweeps_done()
    report(
        tmp_path,
        "expiry_sweep_crash",
        due_lots=due,
        lots_not_due=due // 10,
        batch_size=2,
        faults_injected=1,
        fault="SIGKILL of the worker process mid-sweep, then restart and run again",
        expired_before_kill=at_kill,
        sweep_messages_after_restart=len(done),
        entries_written_after_restart=sum(r["entries"] for r in done),
        lost=len(lost),
        doubled=len(doubled),
        seconds=round(time.monotonic() - started, 1),
    )


# --------------------------------------------------------------------------- 5. a refusal during a database outage


async def test_a_message_refused_during_a_database_outage_is_still_archived_in_postgres(
    db, pg_url, redis_client, redis_url, start_workers, tmp_path
):
    """Refused messages are kept in Redis's dead-letter queue *and* in the `dead_letters` table
    (docs/WIRE_CONTRACT.md, "What happens to a message"); Redis loses its copy on a restart.
    A message refused on its content is refused before the database is touched, so it is
    refused — and dead-lettered — during a database outage too. Its copy in PostgreSQL must
    not depend on the database being up at that very moment."""
    from tests.support.delivery import publish_raw, raw_broker
    from tests.support.faults import TcpProxy

    proxy = TcpProxy()
    proxy.start()
    broker = raw_broker(redis_url)
    publisher = Publisher.from_url(redis_url)
    try:
        workers = start_workers(processes=1, threads=2, env={"DATABASE_URL": proxy.url(pg_url)})
        proxy.stop()  # PostgreSQL is unreachable from the workers
        invalid = json.dumps(
            {
                "type": "payment.succeeded",
                "event_id": "db-down-bad",
                "customer_id": "c",
                "occurred_at": T0.isoformat(),
                "payment_id": "p",
                "credits": -5,
            }
        )
        refused = publish_raw(broker, kwargs={"event": invalid})
        wait_until(
            lambda: refused in dead_letter_bodies(redis_client, EVENTS_QUEUE),
            timeout=30,
            message="the invalid event in the Redis dead-letter queue",
        )
        wait_until(
            lambda: any(r.get("event") == "dead_letter_archive_failed" for r in workers.records()),
            timeout=30,
            message="the archive attempt",
        )
        proxy.start()  # the database is back
        after = publisher.publish(
            PaymentSucceeded(
                event_id="db-back-pay", customer_id="db-back", occurred_at=T0, payment_id="db-back-in", credits=1
            )
        )
        wait_until(
            lambda: any(r.get("event") == "event_applied" and r.get("message_id") == after for r in workers.records()),
            timeout=60,
            message="an event applied after the outage",
        )
        await asyncio.sleep(2.0)
        # The periodic catch-up (`archive_dead_letters`) copies what only Redis holds.
        from workers.dead_letters import archive_from_redis

        assert await archive_from_redis(db, broker, [EVENTS_QUEUE]) == 1
        assert await archive_from_redis(db, broker, [EVENTS_QUEUE]) == 0  # once
        async with db.connect() as connection:
            archived = (await connection.exec_driver_sql("SELECT message_id FROM dead_letters")).scalars().all()
        report(
            tmp_path,
            "refused_during_database_outage",
            events=2,
            faults_injected=1,
            fault="database unreachable (TCP proxy stopped) while an invalid event is refused",
            in_redis_dead_letters=int(refused in dead_letter_bodies(redis_client, EVENTS_QUEUE)),
            in_postgres_dead_letters=archived.count(refused),
            lost=0 if refused in archived else "the PostgreSQL copy (Redis's own copy is lost on a restart)",
            doubled=0,
        )
        assert archived == [refused], "the refused message is only in Redis: its dead_letters row was never written"
    finally:
        proxy.stop()
        broker.close()
        publisher.close()


# --------------------------------------------------------------------------- small helpers


async def _scalar(connection: asyncpg.Connection, sql: str):
    return await connection.fetchval(sql)


async def _at_least(value, minimum: int) -> bool:
    return (await value) >= minimum


async def _async(value):
    return value


async def _eventually(make, expected, timeout: float = 30.0, interval: float = 0.1):
    """Wait until ``await make()`` equals ``expected``; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await make()
        if value == expected:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s: got {value!r}, waiting for {expected!r}"
        await asyncio.sleep(interval)


async def _settled(make, quiet: float = 2.0, timeout: float = 30.0) -> int:
    """Wait until a count stops changing for ``quiet`` seconds; returns it."""
    deadline = time.monotonic() + timeout
    last, since = await make(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the count never settled"
        await asyncio.sleep(0.2)
        value = await make()
        if value != last:
            last, since = value, time.monotonic()
    return last


def _first_friday_after(moment: datetime) -> datetime:
    """The first Friday (in the payout time zone) after ``moment``, at 10:00 there."""
    zone = ZoneInfo("America/New_York")
    local = moment.astimezone(zone)
    day = local.date() + timedelta(days=(4 - local.weekday()) % 7)
    friday = datetime(day.year, day.month, day.day, 10, tzinfo=zone)
    if friday <= moment:
        friday += timedelta(days=7)
    return friday.astimezone(UTC)


def _credits_run(env: dict[str, str], job_name: str, as_of: str) -> str:
    """`credits run <job> --as-of ...`, the operator's command; returns the message id it enqueued."""
    import re

    done = subprocess.run(
        [CREDITS_CLI, "run", job_name, "--as-of", as_of],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return re.search(r"enqueued \w+ as message (?P<id>[0-9a-f-]{36})", done.stdout + done.stderr)["id"]
