"""The two ceilings ``bench.end_to_end`` compares the pipeline with, measured on this machine.

* (a) the machine: pgbench (PostgreSQL's own client, C, no Python) running the fewest
  statements of one FIFO debit (``bench/fifo_debit.sql``) on our tables, in the run's scratch
  database, one transaction per debit.
* (b) the queue: real ``dramatiq`` worker processes (the workers' broker and middleware, the
  same processes x threads as the real workers) draining messages for a no-op async actor.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker

from tests.support import ROOT, WorkerProcesses, free_port

DEBIT_SCRIPT = Path(__file__).with_name("fifo_debit.sql")
#: The no-op actor of bench/noop_actors.py (declared here too, to send to it without
#: importing the workers' broker into this process).
NOOP_ACTOR = "bench_noop"
NOOP_QUEUE = "bench_noop"
#: The pgbench customers: 'pgbench-c0' .. (the script builds the ids from this prefix).
PGBENCH_GROUP = "pgbench"


def pgbench_path() -> str:
    found = shutil.which("pgbench") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), reverse=True)), None
    )
    if found is None:
        raise SystemExit("pgbench not found: install PostgreSQL's client (Debian: postgresql-client)")
    return found


def pgbench_tps(dsn: str, customers: int, clients: int, seconds: int) -> float:
    """Debits per second (one transaction each) at ``clients`` connections for ``seconds``."""
    command = [
        pgbench_path(), "-n", "-M", "prepared", "-f", str(DEBIT_SCRIPT), "-D", f"customers={customers}",
        "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds), dsn,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    tps = re.search(r"^tps = ([0-9.]+)", result.stdout, re.M)
    if result.returncode != 0 or tps is None or (failed and int(failed[1])):
        raise RuntimeError(f"pgbench failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return float(tps[1])


def noop_drain_rate(
    env: dict[str, str], redis_url: str, messages: int, processes: int, threads: int, log_path: Path
) -> float:
    """Messages/s that ``processes`` x ``threads`` worker processes drain of no-op messages.

    The messages are queued before the processes start; the rate is taken from the moment
    a tenth is gone to the last acknowledgement, so the processes' boot is left out.
    """
    broker = RedisBroker(url=redis_url)
    actor = dramatiq.actor(lambda: None, actor_name=NOOP_ACTOR, queue_name=NOOP_QUEUE, broker=broker, max_retries=0)
    for _ in range(messages):
        actor.send()
    broker.close()
    pending = f"dramatiq:{NOOP_QUEUE}.msgs"  # a message leaves this hash when it is acknowledged
    client = redis.Redis.from_url(redis_url)
    marks: dict[str, float] = {}

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            left = client.hlen(pending)
            if left <= messages * 0.9:
                marks.setdefault("tenth", time.perf_counter())
            if left == 0:
                marks["done"] = time.perf_counter()
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    workers = _noop_workers(env, log_path, processes, threads)
    try:
        watcher.join(310)
    finally:
        workers.stop()
        client.close()
    if "done" not in marks:
        raise RuntimeError(
            f"no-op drain stalled with {redis.Redis.from_url(redis_url).hlen(pending)}/{messages} left:\n{workers.log()[-4000:]}"
        )
    return messages * 0.9 / (marks["done"] - marks["tenth"])


def _noop_workers(env: dict[str, str], log_path: Path, processes: int, threads: int) -> WorkerProcesses:
    """``dramatiq bench.noop_actors``, started without waiting: the drain is what is timed."""
    env = {**env, "METRICS_PORT": str(free_port()), "METRICS_DIR": str(log_path.with_suffix(".metrics"))}
    command = [
        sys.executable,
        "-m",
        "dramatiq",
        "bench.noop_actors",
        "--processes",
        str(processes),
        "--threads",
        str(threads),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return WorkerProcesses(process, log_path)
