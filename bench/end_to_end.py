"""End-to-end event throughput and latency against two ceilings, measured in one process.

    .venv/bin/python -m bench.end_to_end --events 5000

A scratch PostgreSQL database (created, migrated, dropped) and a private Redis db (flushed
before and after). Five disjoint groups of customers are seeded with credits through the
service layer (PaymentSucceeded); each measurement below works on its own group, so all
start from the same state. Every event is a JobCompleted debiting one credit.

* end to end, full load: ``Publisher.from_url`` publishes ``--events`` events as fast as it
  can to real ``dramatiq workers.actors`` processes (``--processes`` x ``--threads``);
  throughput is events / (first publish -> all events seen in ``processed_events``).
* end to end, half load: the same, publishing paced at half the measured full-load rate.
* both twice, with fresh worker processes: one event per transaction (``EVENT_BATCH_SIZE=1``)
  and group commit (``EVENT_BATCH_SIZE=--batch-size``). ``ev/tx`` is events per transaction
  (events of one transaction share its ``processed_at``).
* worker memory: the resident set (VmRSS) of each worker process right after boot and after
  both runs of its mode.
* ceiling (a), the debit's own SQL without the queue: ``handlers.apply_event`` called
  directly with ``SqlUnitOfWork``, ``processes x threads`` tasks at once (asyncio.gather over
  a semaphore), same number of events.
* ceiling (b), Dramatiq without the work: an in-process ``dramatiq.Worker`` over a
  RedisBroker with ``processes x threads`` worker threads draining as many messages for a
  no-op actor (one Python process, so it is a lower bound on what Dramatiq can drain).

Latency (publish -> applied) per event is ``processed_events.processed_at`` minus the
publish time taken with ``time.time()`` here. ``processed_at`` is PostgreSQL's ``now()``, the
start of the event's transaction, so the figure leaves out the transaction body and commit;
the offset between PostgreSQL's clock and ours is measured once and removed.

Prints a table and end-to-end / the lower ceiling; writes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import asyncpg
import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from domain import CreditPolicy
from bench.scratch import scratch_database
from infra.db import Database
from messages import JobCompleted, PaymentSucceeded
from messages.publisher import Publisher
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import start_worker_processes

REDIS_SERVER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
POLICY = CreditPolicy()
GROUPS = ("ceil", "full", "half", "batchfull", "batchhalf")


def _job(group: str, i: int, customers: int) -> JobCompleted:
    return JobCompleted(
        event_id=f"{group}-job-{i}", occurred_at=datetime.now(timezone.utc), customer_id=f"{group}-c{i % customers}", job_id=f"{group}-j{i}", credits=1
    )


async def _apply_all(db: Database, events: list, concurrency: int) -> float:
    """Apply events through the service layer, ``concurrency`` at a time; returns seconds."""
    gate = asyncio.Semaphore(concurrency)

    async def one(event) -> None:
        async with gate:
            await handlers.apply_event(event, SqlUnitOfWork(db), POLICY)

    started = time.perf_counter()
    await asyncio.gather(*(one(e) for e in events))
    return time.perf_counter() - started


async def _seed(db: Database, customers: int, credits: int, concurrency: int) -> None:
    now = datetime.now(timezone.utc)
    events = [
        PaymentSucceeded(event_id=f"{g}-pay-{c}", occurred_at=now, customer_id=f"{g}-c{c}", payment_id=f"{g}-p{c}", credits=credits)
        for g in GROUPS
        for c in range(customers)
    ]
    await _apply_all(db, events, concurrency)


def _noop_ceiling(redis_url: str, messages: int, threads: int) -> float:
    """Seconds for an in-process Dramatiq worker to drain ``messages`` no-op messages."""
    broker = RedisBroker(url=redis_url)
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    def noop() -> None:
        with lock:
            count[0] += 1
            if count[0] == messages:
                done.set()

    actor = dramatiq.actor(noop, actor_name="bench_noop", queue_name="bench_noop", broker=broker, max_retries=0)
    for _ in range(messages):
        actor.send()  # enqueued before the clock starts
    worker = dramatiq.Worker(broker, worker_threads=threads)
    started = time.perf_counter()
    worker.start()
    if not done.wait(300):
        raise RuntimeError(f"no-op drain stalled at {count[0]}/{messages}")
    elapsed = time.perf_counter() - started
    worker.stop()
    broker.close()
    return elapsed


async def _clock_offset(pg: asyncpg.Connection) -> float:
    """PostgreSQL's clock minus time.time(), in seconds (best of a few round trips)."""
    best = None
    for _ in range(5):
        before = time.time()
        pg_now = await pg.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        after = time.time()
        if best is None or after - before < best[0]:
            best = (after - before, float(pg_now) - (before + after) / 2)
    return best[1]


async def _end_to_end(pg: asyncpg.Connection, publisher: Publisher, group: str, events: int, customers: int, rate: float | None, offset: float) -> dict:
    """Publish ``events`` (paced at ``rate``/s, or as fast as possible) and wait for all of them."""
    batch = [_job(group, i, customers) for i in range(events)]
    published: dict[str, float] = {}

    def publish() -> None:
        start = time.perf_counter()
        for i, event in enumerate(batch):
            if rate is not None:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            published[event.event_id] = time.time()
            publisher.publish(event)

    first = time.perf_counter()
    publishing = asyncio.create_task(asyncio.to_thread(publish))
    query = "SELECT count(*) FROM processed_events WHERE event_id LIKE $1"
    deadline = first + 600
    while True:
        await asyncio.sleep(0.02)
        if publishing.done() and await pg.fetchval(query, f"{group}-job-%") >= events:
            break
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{group}: only {await pg.fetchval(query, f'{group}-job-%')}/{events} events applied after 600 s")
    elapsed = time.perf_counter() - first
    await publishing
    publish_seconds = max(published.values()) - min(published.values())
    rows = await pg.fetch("SELECT event_id, extract(epoch FROM processed_at)::float8 AS at FROM processed_events WHERE event_id LIKE $1", f"{group}-job-%")
    latencies = sorted((row["at"] - offset - published[row["event_id"]]) * 1000 for row in rows)
    return {
        "rate": events / elapsed,
        "publish_rate": events / publish_seconds if publish_seconds else float("inf"),
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "max": latencies[-1],
    }


#: The worker set-ups measured end to end: one transaction per event, and group commit.
MODES = {"one event per transaction": 1, "group commit": None}


def _rss_mib(workers) -> list[float]:
    """Resident memory of each worker process (the children of the dramatiq main process)."""
    pid = workers.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    sizes = []
    for child in children:
        for line in Path(f"/proc/{child}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes.append(int(line.split()[1]) / 1024)
    return sizes


async def _transactions(pg: asyncpg.Connection, group: str) -> int:
    """Transactions that applied the group's events (events of one transaction share its now())."""
    return await pg.fetchval("SELECT count(DISTINCT processed_at) FROM processed_events WHERE event_id LIKE $1", f"{group}-job-%")


async def run(events: int, customers: int, processes: int, threads: int, redis_db: int, batch_size: int) -> None:
    concurrency = processes * threads
    credits = events // customers + 10
    redis_url = f"{REDIS_SERVER}/{redis_db}"
    # Claim the Redis db the way the test suite does (tests/conftest.py), so a test run cannot share it.
    admin_redis = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    owner = uuid.uuid4().hex
    if not admin_redis.set(f"credits-tests:db:{redis_db}", owner, nx=True, ex=3600):
        raise SystemExit(f"Redis db {redis_db} is claimed by a test run; pass --redis-db")
    redis.Redis.from_url(redis_url).flushdb()
    workers = None
    results: dict[str, dict] = {}
    try:
        async with scratch_database() as scratch:
            url = scratch.url
            db = Database(url, pool_size=concurrency)
            await _seed(db, customers, credits, concurrency)

            # Ceiling (a): the handler's SQL, no queue.
            ceiling_sql = events / await _apply_all(db, [_job("ceil", i, customers) for i in range(events)], concurrency)
            await db.dispose()

            # Ceiling (b): Dramatiq draining no-op messages.
            ceiling_queue = events / await asyncio.to_thread(_noop_ceiling, redis_url, events, concurrency)
            redis.Redis.from_url(redis_url).flushdb()

            # End to end, through real worker processes, once per mode.
            pg = await asyncpg.connect(scratch.dsn)
            publisher = Publisher.from_url(redis_url)
            offset = await _clock_offset(pg)
            for index, (mode, mode_batch) in enumerate(MODES.items()):
                env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "EVENT_BATCH_SIZE")}
                env.update(DATABASE_URL=url, REDIS_URL=redis_url, PYTHONUNBUFFERED="1", EVENT_BATCH_SIZE=str(mode_batch or batch_size))
                with tempfile.TemporaryDirectory() as tmp:
                    workers = await asyncio.to_thread(start_worker_processes, env, Path(tmp) / "workers.log", processes, threads)
                    rss_at_boot = _rss_mib(workers)
                    full_group, half_group = GROUPS[1 + 2 * index], GROUPS[2 + 2 * index]
                    full = await _end_to_end(pg, publisher, full_group, events, customers, None, offset)
                    full["transactions"] = await _transactions(pg, full_group)
                    half = await _end_to_end(pg, publisher, half_group, events, customers, full["rate"] / 2, offset)
                    half["transactions"] = await _transactions(pg, half_group)
                    results[mode] = {"full": full, "half": half, "rss_at_boot": rss_at_boot, "rss_after": _rss_mib(workers)}
                    workers.stop()
                    workers = None
            failed = await pg.fetchval("SELECT count(*) FROM dead_letters")
            publisher.close()
            await pg.close()
    finally:
        if workers is not None:
            workers.stop()
        redis.Redis.from_url(redis_url).flushdb()
        if admin_redis.get(f"credits-tests:db:{redis_db}") == owner.encode():
            admin_redis.delete(f"credits-tests:db:{redis_db}")

    lower = min(ceiling_sql, ceiling_queue)
    print(f"events {events}, customers {customers} per group, workers {processes} processes x {threads} threads, {os.cpu_count()} CPUs")
    print(f"  {'':52} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'ev/tx':>6}")
    print(f"  {'ceiling (a) apply_event, no queue':52} {ceiling_sql:>9,.0f}")
    print(f"  {'ceiling (b) Dramatiq no-op drain':52} {ceiling_queue:>9,.0f}")
    for mode, result in results.items():
        full, half = result["full"], result["half"]
        for label, row in ((f"{mode}, full load", full), (f"{mode}, half load (paced {full['rate'] / 2:,.0f}/s)", half)):
            per_tx = events / row["transactions"]
            print(f"  {label:52} {row['rate']:>9,.0f} {row['p50']:>8,.1f} {row['p99']:>8,.1f} {row['max']:>8,.1f} {per_tx:>6.1f}")
    print(f"  dead letters {failed}")
    for mode, result in results.items():
        boot, after = result["rss_at_boot"], result["rss_after"]
        print(
            f"  {mode}: worker RSS MiB at boot {', '.join(f'{m:.0f}' for m in boot)}; after {2 * events:,} events "
            f"{', '.join(f'{m:.0f}' for m in after)} (x{max(after) / max(boot):.2f})"
        )
    for mode, result in results.items():
        print(f"  {mode}: end to end (full) / lower ceiling {result['full']['rate'] / lower:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--customers", type=int, default=500, help="customers per group (events spread round robin)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--redis-db", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=32, help="EVENT_BATCH_SIZE of the group-commit workers")
    args = parser.parse_args()
    asyncio.run(run(args.events, args.customers, args.processes, args.threads, args.redis_db, args.batch_size))


if __name__ == "__main__":
    main()
