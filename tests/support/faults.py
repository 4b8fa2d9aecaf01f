"""Fault-test helpers: workloads with their expected ledger, what a run lost or doubled, the broker's leftovers."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path

import asyncpg
import redis
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from sqlalchemy.engine import make_url

from messages import (
    EVENTS_QUEUE,
    Event,
    JobCompleted,
    PaymentSucceeded,
    Publisher,
    PublishFailed,
)
from tests.support import WorkerProcesses, free_port, wait_until
from tests.support.delivery import T0

CREDITS_CLI = str(Path(sys.executable).with_name("credits"))
SWEEPS_QUEUE = "credit_sweeps"
EVENT_QUEUES = (EVENTS_QUEUE, f"{EVENTS_QUEUE}.DQ")
#: Fast, bounded retries for the unexpected; a database outage still uses its own (long) budget.
FAST_RETRIES = {"EVENT_MAX_RETRIES": "2", "EVENT_MIN_BACKOFF_MS": "100", "EVENT_MAX_BACKOFF_MS": "500"}


# --------------------------------------------------------------------------- figures


def report(tmp_path: Path, test: str, **figures) -> None:
    """Print the test's figures on one line (docs quote it) and keep them as JSON beside the test's files."""
    line = json.dumps({"test": test, **figures}, sort_keys=False, default=str)
    (tmp_path / "figures.json").write_text(line + "\n")
    print(f"FIGURES {line}")


# --------------------------------------------------------------------------- workload and expectation


def workload(count: int, customers: int, seed: int, prefix: str) -> list[Event]:
    """Payments (30 %) and completed jobs for ``customers`` customers, within one month: nothing expires,
    so the final ledger does not depend on the order the events are applied in."""
    rng = random.Random(seed)
    events: list[Event] = []
    for n in range(count):
        customer = f"{prefix}-c{rng.randrange(customers):03d}"
        at = T0 + timedelta(minutes=rng.randrange(30 * 24 * 60))
        if rng.random() < 0.3:
            events.append(
                PaymentSucceeded(
                    event_id=f"{prefix}-pay-{n}",
                    customer_id=customer,
                    occurred_at=at,
                    payment_id=f"{prefix}-in-{n}",
                    credits=rng.randint(1, 20),
                )
            )
        else:
            events.append(
                JobCompleted(
                    event_id=f"{prefix}-done-{n}",
                    customer_id=customer,
                    occurred_at=at,
                    job_id=f"{prefix}-job-{n}",
                    credits=rng.randint(1, 5),
                )
            )
    return events


def expected_ledger(events: Iterable[Event]) -> dict[str, tuple[int, int, int, int]]:
    """customer → (balance, overdraft, issued entries, debited entries), as a fault-free run leaves it.

    Payments issue a lot (repaying overdraft first), jobs spend oldest-first and run into
    overdraft: whatever the order, the balance is paid − used, overdraft what is unpaid."""
    paid: Counter[str] = Counter()
    used: Counter[str] = Counter()
    issued: Counter[str] = Counter()
    debited: Counter[str] = Counter()
    for event in events:
        if isinstance(event, PaymentSucceeded):
            paid[event.customer_id] += event.credits
            issued[event.customer_id] += 1
        else:
            used[event.customer_id] += event.credits
            debited[event.customer_id] += 1
    return {c: (paid[c] - used[c], max(0, used[c] - paid[c]), issued[c], debited[c]) for c in set(paid) | set(used)}


def plain_dsn(pg_url: str) -> str:
    return pg_url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def actual_ledger(connection: asyncpg.Connection, prefix: str) -> dict[str, tuple[int, int, int, int]]:
    rows = await connection.fetch(
        """
        SELECT c.customer_id, c.balance, c.overdraft,
               count(e.id) FILTER (WHERE e.kind = 'issued') AS issued,
               count(e.id) FILTER (WHERE e.kind = 'debited') AS debited
        FROM customers c LEFT JOIN ledger_entries e ON e.customer_id = c.customer_id
        WHERE c.customer_id LIKE $1
        GROUP BY c.customer_id, c.balance, c.overdraft
        """,
        f"{prefix}-%",
    )
    return {r["customer_id"]: (r["balance"], r["overdraft"], r["issued"], r["debited"]) for r in rows}


async def lost_and_doubled(connection: asyncpg.Connection, events: list[Event]) -> tuple[list[str], list[str]]:
    """Events with no ledger entry (lost) and events with more than one (doubled)."""
    rows = await connection.fetch(
        "SELECT event_id, count(*) AS n FROM ledger_entries WHERE kind IN ('issued', 'debited') AND event_id = ANY($1::text[]) GROUP BY event_id",
        [e.event_id for e in events],
    )
    entries = {r["event_id"]: r["n"] for r in rows}
    lost = [e.event_id for e in events if e.event_id not in entries]
    doubled = [event_id for event_id, n in entries.items() if n > 1]
    return lost, doubled


async def processed_count(connection: asyncpg.Connection, prefix: str) -> int:
    return await connection.fetchval("SELECT count(*) FROM processed_events WHERE event_id LIKE $1", f"{prefix}-%")


async def assert_ledger_as_expected(
    connection: asyncpg.Connection, events: list[Event], prefix: str
) -> tuple[int, int]:
    lost, doubled = await lost_and_doubled(connection, events)
    actual = await actual_ledger(connection, prefix)
    expected = expected_ledger(events)
    differ = {
        c: (actual.get(c), expected.get(c)) for c in set(actual) | set(expected) if actual.get(c) != expected.get(c)
    }
    assert not lost and not doubled and not differ, (
        f"lost {lost[:10]} ({len(lost)}), doubled {doubled[:10]} ({len(doubled)}), customers differing (actual, expected): {dict(list(differ.items())[:10])}"
    )
    return len(lost), len(doubled)


# --------------------------------------------------------------------------- processes and Redis


def worker_children(main_pid: int) -> list[int]:
    """The dramatiq worker processes forked by a `dramatiq` main process."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == main_pid and "dramatiq" in cmdline and "resource_tracker" not in cmdline:
            children.append(int(entry.name))
    return sorted(children)


class Janitor:
    """Dramatiq's own Redis maintenance (dispatch.lua), run on purpose: a worker silent for longer
    than ``heartbeat_timeout_ms`` is dead, and its fetched-but-unacknowledged messages go back to
    their queue. The workers run the same script by chance with a 60 s timeout."""

    def __init__(self, redis_url: str, queues: Iterable[str], heartbeat_timeout_ms: int = 10_000) -> None:
        self.broker = RedisBroker(
            url=redis_url, middleware=[], heartbeat_timeout=heartbeat_timeout_ms, maintenance_chance=MAINTENANCE_SCALE
        )
        self.queues = tuple(queues)
        self.runs = 0

    def sweep(self) -> None:
        for queue in self.queues:
            self.broker.do_qsize(queue)  # any non-ack command runs maintenance for its queue
        self.runs += 1

    def close(self) -> None:
        self.broker.close()


def leftovers(client: redis.Redis, queues: Iterable[str]) -> dict[str, int]:
    """Messages still in Redis for these queues: queued, delayed, or fetched and never acknowledged."""
    found = {}
    for queue in queues:
        for key in (f"dramatiq:{queue}", f"dramatiq:{queue}.msgs", f"dramatiq:{queue}.DQ", f"dramatiq:{queue}.DQ.msgs"):
            size = client.llen(key) if client.type(key) == b"list" else client.hlen(key)
            if size:
                found[key] = size
        for key in client.scan_iter(match="dramatiq:__acks__.*"):
            name = key.decode()
            if name.endswith((f".{queue}", f".{queue}.DQ")) and (size := client.scard(key)):
                found[name] = size
    return found


def ack_set_sizes(client: redis.Redis, queues: Iterable[str]) -> list[int]:
    """Sizes of every worker's fetched-but-unacknowledged set for these queues (and their delay queues)."""
    names = tuple(f".{q}" for q in queues)
    return [client.scard(key) for key in client.scan_iter(match="dramatiq:__acks__.*") if key.decode().endswith(names)]


def drained(message_broker, redis_client: redis.Redis | None) -> bool:
    """Nothing left for the events queue: on Redis not even in an ack set; on RabbitMQ nothing ready."""
    if redis_client is not None:
        return not leftovers(redis_client, EVENT_QUEUES)
    return message_broker.waiting(EVENTS_QUEUE) == 0


def dead_letter_bodies(client: redis.Redis, queue: str) -> dict[str, dict]:
    bodies = client.hgetall(f"dramatiq:{queue}.XQ.msgs")
    return {json.loads(body)["message_id"]: json.loads(body) for body in bodies.values()}


def outcome_counts(all_workers: Iterable[WorkerProcesses]) -> Counter:
    counts: Counter[str] = Counter()
    for workers in all_workers:
        for record in workers.records():
            event = str(record.get("event", ""))
            if event in ("event_applied", "event_duplicate", "event_ignored", "event_rejected"):
                counts[event] += 1
            elif event.startswith("Retrying message"):
                counts["retries"] += 1
    return counts


def deliveries_per_event(all_workers: Iterable[WorkerProcesses], prefix: str) -> dict[int, int]:
    """How many times events were handled (applied or recognised as duplicates): times → number of events."""
    seen: Counter[str] = Counter()
    for workers in all_workers:
        for record in workers.records():
            if record.get("event") in ("event_applied", "event_duplicate") and str(
                record.get("event_id", "")
            ).startswith(f"{prefix}-"):
                seen[record["event_id"]] += 1
    return dict(sorted(Counter(seen.values()).items()))


def publish_all(publisher: Publisher, events: Iterable[Event]) -> list[str]:
    """Publish, as the producer contract says: if a publish raises, publish the same event again."""
    ids = []
    for event in events:
        for _ in range(50):
            try:
                ids.append(publisher.publish(event))
                break
            except PublishFailed:
                time.sleep(0.1)
        else:
            raise AssertionError(f"could not publish {event.event_id}")
    return ids


# --------------------------------------------------------------------------- 1. worker crashes


#: 10,000 events take about 80 s on two cores with the five kills and restarts; the variable
#: makes a quicker run possible while working on the test.


class PrivateRedis:
    """A redis-server of this test's own, without persistence: killed, it comes back empty."""

    def __init__(self, directory: Path, persistence: tuple[str, ...] = ("--save", "", "--appendonly", "no")) -> None:
        self.port = free_port()
        self.directory = directory
        self.persistence = persistence
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.directory / "redis-server.log").open("ab")
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.persistence,
                "--dir",
                str(self.directory),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        client = redis.Redis.from_url(self.url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, timeout=10, message="redis-server to start")
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL; ``stop()`` makes the database unreachable."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.connections = 0

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))  # the same port again after a stop
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            sockets, self._sockets = set(self._sockets), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(5)
        self._threads = [t for t in self._threads if t.is_alive()]

    def url(self, database_url: str) -> str:
        return make_url(database_url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
                self.connections += 1
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


RETRY_DELAY = re.compile(r"^Retrying message '(?P<id>[^']+)' in (?P<ms>\d+) milliseconds\.$")
