"""End to end through real workers against two ceilings of this machine, in one run.

    .venv/bin/python -m bench.end_to_end --events 5000

A scratch PostgreSQL database (created, migrated, dropped) and a private Redis db (flushed
before and after). Disjoint groups of customers are seeded through real worker processes
(``PaymentSucceeded`` events published like any producer's), so each measurement starts from
the same state; every measured event is a ``JobCompleted`` debiting one credit.

* (a) the machine's ceiling: pgbench running the fewest statements of one FIFO debit
  (``bench/fifo_debit.sql``) on our tables in the same database, one transaction per debit,
  at 1, 4 and 16 clients; (a) is the 16-client figure (``bench/ceilings.py``).
* (b) the queue's ceiling: ``--processes`` x ``--threads`` worker processes (our broker and
  middleware) draining no-op messages (``bench/noop_actors.py``).
* (c) end to end, one event per transaction (``EVENT_BATCH_SIZE=1``), and (d) batched
  (``--batch-size``, the setting's default unless given), each with fresh
  ``dramatiq workers.actors`` processes: ``Publisher.from_url`` publishes ``--events`` events
  as fast as it can (full load: events / first publish -> all in ``processed_events``), then
  as many paced at half that rate (half load). ``ev/tx`` is events per transaction (the
  events of one transaction share its ``processed_at``).

Half-load latency is publish -> commit: a deferred constraint trigger, installed in the
scratch database for the half-load runs only, stamps ``clock_timestamp()`` for each event as
its transaction commits (after every statement; only the commit's WAL flush is left out).
The offset between PostgreSQL's clock and ours is measured and removed.

Worker memory is the resident set (VmRSS) of each worker process at boot and after its mode's
two runs. Prints the table and (d) / min(a, b); writes nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import redis

from bench.ceilings import PGBENCH_GROUP, noop_drain_rate, pgbench_tps
from bench.scratch import scratch_database
from infra.settings import Settings
from messages import JobCompleted, PaymentSucceeded
from messages.publisher import Publisher
from tests.support import start_worker_processes
from workers.cli import WORKER_PROCESSES, WORKER_THREADS

REDIS_SERVER = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379")
#: The end-to-end modes: label -> EVENT_BATCH_SIZE (None: --batch-size).
MODES = {"(c) one event per transaction": 1, "(d) batched": None}
GROUPS = ("c-full", "c-half", "d-full", "d-half")
PGBENCH_CLIENTS = (1, 4, 16)
#: Credits for each pgbench customer: more than pgbench can take in a run.
PGBENCH_CREDITS = 1_000_000

#: Publish -> commit stamps: a deferred trigger fires as its transaction commits.
COMMIT_STAMPS = """
CREATE TABLE bench_commits (event_id text PRIMARY KEY, at timestamptz NOT NULL);
CREATE FUNCTION bench_stamp_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_commits VALUES (NEW.event_id, clock_timestamp());
    RETURN NULL;
END $$;
"""
STAMPS_ON = """CREATE CONSTRAINT TRIGGER bench_stamp_commit AFTER INSERT ON processed_events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bench_stamp_commit()"""
STAMPS_OFF = "DROP TRIGGER bench_stamp_commit ON processed_events"


def _job(group: str, i: int, customers: int) -> JobCompleted:
    return JobCompleted(
        event_id=f"{group}-job-{i}",
        occurred_at=datetime.now(UTC),
        customer_id=f"{group}-c{i % customers}",
        job_id=f"{group}-j{i}",
        credits=1,
    )


async def _wait_for(pg: asyncpg.Connection, pattern: str, count: int, what: str, timeout: float = 600) -> None:
    query = "SELECT count(*) FROM processed_events WHERE event_id LIKE $1"
    deadline = time.perf_counter() + timeout
    while (done := await pg.fetchval(query, pattern)) < count:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{what}: only {done}/{count} events applied after {timeout:.0f} s")
        await asyncio.sleep(0.02)


async def _seed(pg: asyncpg.Connection, publisher: Publisher, customers: int, credits: int) -> None:
    """One payment per customer of every group, applied by the workers running meanwhile."""
    now = datetime.now(UTC)
    amounts = {**{group: credits for group in GROUPS}, PGBENCH_GROUP: PGBENCH_CREDITS}
    for group, amount in amounts.items():
        for c in range(customers):
            publisher.publish(
                PaymentSucceeded(
                    event_id=f"{group}-pay-{c}",
                    occurred_at=now,
                    customer_id=f"{group}-c{c}",
                    payment_id=f"{group}-p{c}",
                    credits=amount,
                )
            )
    await _wait_for(pg, "%-pay-%", customers * len(amounts), "seeding")


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


def _publish_all(publisher: Publisher, batch: list[JobCompleted], rate: float | None) -> dict[str, float]:
    """Publish (paced at ``rate``/s, or as fast as possible); the time.time() of each publish."""
    published: dict[str, float] = {}
    start = time.perf_counter()
    for i, event in enumerate(batch):
        if rate is not None and (delay := start + i / rate - time.perf_counter()) > 0:
            time.sleep(delay)
        published[event.event_id] = time.time()
        publisher.publish(event)
    return published


async def _end_to_end(
    pg: asyncpg.Connection, publisher: Publisher, group: str, events: int, customers: int, rate: float | None
) -> dict:
    """Publish ``events`` and wait for all of them: events/s and events per transaction."""
    batch = [_job(group, i, customers) for i in range(events)]
    first = time.perf_counter()
    publishing = asyncio.create_task(asyncio.to_thread(_publish_all, publisher, batch, rate))
    await _wait_for(pg, f"{group}-job-%", events, group)
    elapsed = time.perf_counter() - first
    transactions = await pg.fetchval(
        "SELECT count(DISTINCT processed_at) FROM processed_events WHERE event_id LIKE $1", f"{group}-job-%"
    )
    return {"rate": events / elapsed, "per_tx": events / transactions, "published": await publishing}


async def _half_load(
    pg: asyncpg.Connection, publisher: Publisher, group: str, events: int, customers: int, rate: float
) -> dict:
    """The run paced at ``rate``, with publish -> commit latencies (ms)."""
    await pg.execute(STAMPS_ON)
    try:
        offset = await _clock_offset(pg)
        result = await _end_to_end(pg, publisher, group, events, customers, rate)
    finally:
        await pg.execute(STAMPS_OFF)
    rows = await pg.fetch(
        "SELECT event_id, extract(epoch FROM at)::float8 AS at FROM bench_commits WHERE event_id LIKE $1",
        f"{group}-job-%",
    )
    latencies = sorted((row["at"] - offset - result["published"][row["event_id"]]) * 1000 for row in rows)
    result.update(
        p50=statistics.median(latencies),
        p99=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        max=latencies[-1],
    )
    return result


def _rss_mib(workers, processes: int) -> list[float]:
    """VmRSS of each worker process: the children of the dramatiq main process with the most
    threads (the Prometheus exposition fork is a child too, with few threads)."""
    pid = workers.process.pid
    children = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{child}/status").read_text().splitlines() if ":" in line
        )
        children.append((int(status["Threads"]), int(status["VmRSS"].split()[0]) / 1024))
    return [rss for _, rss in sorted(children, reverse=True)[:processes]]


def _worker_env(url: str, redis_url: str, args: argparse.Namespace) -> dict[str, str]:
    """The workers' environment: this database and Redis db, and the set-up measured."""
    mine = (
        "DATABASE_URL",
        "REDIS_URL",
        "BROKER_URL",
        "EVENT_BATCH_SIZE",
        "EVENT_BATCH_IN_FLIGHT",
        "dramatiq_queue_prefetch",
    )
    env = {k: v for k, v in os.environ.items() if k not in mine}
    env.update(DATABASE_URL=url, REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
    if args.in_flight is not None:
        env["EVENT_BATCH_IN_FLIGHT"] = str(args.in_flight)
    if args.prefetch is not None:
        env["dramatiq_queue_prefetch"] = str(args.prefetch)  # read by dramatiq.worker at import
    return env


async def _mode(
    pg: asyncpg.Connection,
    publisher: Publisher,
    env: dict[str, str],
    groups: tuple[str, str],
    args: argparse.Namespace,
    log_path: Path,
) -> dict:
    """Fresh worker processes: full load, then half load, and their memory."""
    workers = await asyncio.to_thread(start_worker_processes, env, log_path, args.processes, args.threads)
    try:
        boot = _rss_mib(workers, args.processes)
        full = await _end_to_end(pg, publisher, groups[0], args.events, args.customers, None)
        half = await _half_load(pg, publisher, groups[1], args.events, args.customers, args.pace or full["rate"] / 2)
        return {"full": full, "half": half, "rss_at_boot": boot, "rss_after": _rss_mib(workers, args.processes)}
    finally:
        workers.stop()


async def _measure(scratch, redis_url: str, args: argparse.Namespace) -> dict:
    env = _worker_env(scratch.url, redis_url, args)
    pg = await asyncpg.connect(scratch.dsn)
    publisher = Publisher.from_url(redis_url)
    results: dict = {"load_before": os.getloadavg()}
    try:
        await pg.execute(COMMIT_STAMPS)
        with tempfile.TemporaryDirectory() as tmp:
            seeders = await asyncio.to_thread(
                start_worker_processes, env, Path(tmp) / "seed.log", args.processes, args.threads
            )
            try:
                await _seed(pg, publisher, args.customers, args.events // args.customers + 10)
            finally:
                seeders.stop()
            results["pgbench"] = {
                n: await asyncio.to_thread(pgbench_tps, scratch.dsn, args.customers, n, args.pgbench_seconds)
                for n in PGBENCH_CLIENTS
            }
            results["noop"] = await asyncio.to_thread(
                noop_drain_rate, env, redis_url, 2 * args.events, args.processes, args.threads, Path(tmp) / "noop.log"
            )
            for index, (mode, size) in enumerate(MODES.items()):
                if size == 1 and args.only_batched:
                    continue
                mode_env = {**env, "EVENT_BATCH_SIZE": str(size or args.batch_size)}
                results[mode] = await _mode(
                    pg, publisher, mode_env, GROUPS[2 * index : 2 * index + 2], args, Path(tmp) / f"mode{index}.log"
                )
        results["dead_letters"] = await pg.fetchval("SELECT count(*) FROM dead_letters")
    finally:
        publisher.close()
        await pg.close()
    results["load_after"] = os.getloadavg()
    return results


async def run(args: argparse.Namespace) -> dict:
    redis_url = f"{REDIS_SERVER}/{args.redis_db}"
    # Claim the Redis db the way the test suite does (tests/conftest.py), so a test run cannot share it.
    admin_redis = redis.Redis.from_url(f"{REDIS_SERVER}/0")
    owner = uuid.uuid4().hex
    if not admin_redis.set(f"credits-tests:db:{args.redis_db}", owner, nx=True, ex=3600):
        raise SystemExit(f"Redis db {args.redis_db} is claimed by a test run; pass --redis-db")
    redis.Redis.from_url(redis_url).flushdb()
    try:
        async with scratch_database() as scratch:
            return await _measure(scratch, redis_url, args)
    finally:
        redis.Redis.from_url(redis_url).flushdb()
        if admin_redis.get(f"credits-tests:db:{args.redis_db}") == owner.encode():
            admin_redis.delete(f"credits-tests:db:{args.redis_db}")


def report(results: dict, args: argparse.Namespace) -> None:
    ceiling_a, ceiling_b = results["pgbench"][PGBENCH_CLIENTS[-1]], results["noop"]
    lower = min(ceiling_a, ceiling_b)
    load = lambda figures: " ".join(f"{f:.2f}" for f in figures)  # noqa: E731
    prefetch = args.prefetch if args.prefetch is not None else f"{2 * args.threads} (Dramatiq's default)"
    print(
        f"events {args.events}, customers {args.customers} per group, {os.cpu_count()} CPUs; load average {load(results['load_before'])} before, {load(results['load_after'])} after"
    )
    print(
        f"workers {args.processes} processes x {args.threads} threads, prefetch {prefetch}, EVENT_BATCH_SIZE {args.batch_size}, EVENT_BATCH_IN_FLIGHT {args.in_flight or IN_FLIGHT}"
    )
    print(
        f"  pgbench FIFO debit, {' / '.join(map(str, PGBENCH_CLIENTS))} clients: {' / '.join(f'{tps:,.0f}' for tps in results['pgbench'].values())} tx/s"
    )
    print(f"  {'':52} {'events/s':>9} {'ev/tx':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    print(f"  {f'(a) pgbench, {PGBENCH_CLIENTS[-1]} clients':52} {ceiling_a:>9,.0f}")
    print(f"  {f'(b) Dramatiq no-op drain, {args.processes} x {args.threads}':52} {ceiling_b:>9,.0f}")
    for mode in MODES:
        if mode not in results:
            continue
        full, half = results[mode]["full"], results[mode]["half"]
        paced = f"{mode}, {'paced' if args.pace else 'half load, paced'} {args.pace or full['rate'] / 2:,.0f}/s"
        print(f"  {f'{mode}, full load':52} {full['rate']:>9,.0f} {full['per_tx']:>6.1f}")
        print(
            f"  {paced:52} {half['rate']:>9,.0f} {half['per_tx']:>6.1f} {half['p50']:>8.1f} {half['p99']:>8.1f} {half['max']:>8.1f}"
        )
    print(f"  dead letters {results['dead_letters']}  (latency: publish -> commit, of the paced run only)")
    for mode in MODES:
        if mode in results:
            boot, after = results[mode]["rss_at_boot"], results[mode]["rss_after"]
            print(
                f"  {mode}: worker RSS MiB at boot {', '.join(f'{m:.0f}' for m in boot)}; after {2 * args.events:,} events {', '.join(f'{m:.0f}' for m in after)}"
            )
    for mode in MODES:
        if mode in results:
            print(f"  {mode} (full) / min(a, b) = {results[mode]['full']['rate'] / lower:.2f}")


BATCH_SIZE = Settings.model_fields["event_batch_size"].default
IN_FLIGHT = Settings.model_fields["event_batch_in_flight"].default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--customers", type=int, default=500, help="customers per group (events spread round robin)")
    parser.add_argument(
        "--processes",
        type=int,
        default=WORKER_PROCESSES,
        help="worker processes (default: credits worker's, %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=WORKER_THREADS,
        help="threads per worker process (default: credits worker's, %(default)s)",
    )
    parser.add_argument(
        "--prefetch", type=int, help="dramatiq_queue_prefetch of the workers (default: Dramatiq's, 2 x threads)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        help="EVENT_BATCH_SIZE of the batched workers (default: the setting's, %(default)s)",
    )
    parser.add_argument("--in-flight", type=int, help=f"EVENT_BATCH_IN_FLIGHT (default: the setting's, {IN_FLIGHT})")
    parser.add_argument(
        "--pace",
        type=float,
        help="publish the second run at this rate (events/s) instead of half the full-load rate, to compare set-ups at one rate",
    )
    parser.add_argument(
        "--pgbench-seconds", type=int, default=10, help="length of each pgbench run (default: %(default)s)"
    )
    parser.add_argument("--only-batched", action="store_true", help="skip (c), one event per transaction")
    parser.add_argument("--redis-db", type=int, default=14)
    args = parser.parse_args()
    report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
