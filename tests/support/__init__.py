"""Helpers shared by the tests: waiting, real worker processes, ledger reconciliation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select

from infra.db import Database
from infra.db.tables import credit_lots, customers, ledger_entries

ROOT = Path(__file__).resolve().parents[2]
HOLD_KINDS = ("held", "released", "lapsed")

#: Every table a test may write, emptied before each test that takes the ``db`` fixture.
LEDGER_TABLES = (
    "customers, credit_lots, ledger_entries, lot_movements, holds, processed_events, dead_letters, "
    "stripe_customers, stripe_events, stripe_payments, dunning_cases, payment_attempts, "
    "customer_profiles, referrers, referral_codes, referrals, referral_history, referral_clawbacks, payouts, payout_items, "
    "notifications, customer_notes, retention_crossings, admin_sessions, admin_sign_in_attempts"
)


def t(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A moment in UTC, briefly (the tests' clock)."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def wait_until(
    predicate: Callable[[], bool], timeout: float = 30.0, interval: float = 0.05, message: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


async def eventually(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.05, message: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def wait_until_serving(process: subprocess.Popen, base_url: str, log: Callable[[], str], timeout: float = 30.0) -> None:
    """Wait until an HTTP server process answers GET /healthz with 200; fail at once if it exits."""
    import httpx

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"server process exited with {process.returncode}:\n{log()}")
        try:
            return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout=timeout, interval=0.1, message=f"{base_url}/healthz to answer")


@dataclass
class WorkerProcesses:
    """A real `dramatiq workers.actors` command, with its own process group."""

    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict]:
        """The workers' JSON log lines, parsed (non-JSON lines are skipped)."""
        records = []
        for line in self.log().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        if self.process.poll() is not None:
            return
        # Signal the dramatiq main process only; it shuts its worker processes down itself.
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_worker_processes(
    env: dict[str, str],
    log_path: Path,
    processes: int = 1,
    threads: int = 2,
    ready_timeout: float = 60.0,
    supervised: bool = False,
) -> WorkerProcesses:
    """``dramatiq workers.actors``; ``supervised``: the operator's ``credits worker`` (which restarts the group)."""
    # A metrics port and directory of their own: test runs share this host (the default is 9191).
    env = {"METRICS_PORT": str(free_port()), "METRICS_DIR": str(log_path.with_suffix(".metrics")), **env}
    log_file = log_path.open("wb")
    command = (
        [str(Path(sys.executable).with_name("credits")), "worker"]
        if supervised
        else [sys.executable, "-m", "dramatiq", "workers.actors"]
    )
    process = subprocess.Popen(
        [*command, "--processes", str(processes), "--threads", str(threads)],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    workers = WorkerProcesses(process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"worker exited with {process.returncode}:\n{workers.log()}")
        return workers.log().count("Worker process is ready for action") >= processes

    wait_until(ready, timeout=ready_timeout, message="dramatiq workers to boot")
    return workers


async def reconciliation(db: Database, snapshot: bool = False) -> list[str]:
    """Every customer whose entries do not sum to (credit in lots − overdraft). Empty means it reconciles.

    ``snapshot``: read everything in one REPEATABLE READ snapshot (while writers are running).
    """
    async with db.connect() as connection:
        if snapshot:
            await connection.execution_options(isolation_level="REPEATABLE READ")
        entries = dict(
            (
                await connection.execute(
                    select(ledger_entries.c.customer_id, func.sum(ledger_entries.c.credits))
                    .where(ledger_entries.c.kind.not_in(HOLD_KINDS))
                    .group_by(ledger_entries.c.customer_id)
                )
            ).all()
        )
        lots = dict(
            (
                await connection.execute(
                    select(credit_lots.c.customer_id, func.sum(credit_lots.c.remaining)).group_by(
                        credit_lots.c.customer_id
                    )
                )
            ).all()
        )
        rows = (
            await connection.execute(select(customers.c.customer_id, customers.c.balance, customers.c.overdraft))
        ).all()
    problems = []
    for customer_id, balance, overdraft in rows:
        book = (lots.get(customer_id) or 0) - overdraft
        summed = entries.get(customer_id) or 0
        if not (summed == book == balance):
            problems.append(f"{customer_id}: entries {summed}, lots-overdraft {book}, stored balance {balance}")
    return problems


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InProcessServer:
    """uvicorn serving an app over TCP from a thread of this process, so its clock is the test's."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> InProcessServer:
        self.thread.start()

        async def started() -> bool:
            return self.server.started

        await eventually(started, timeout=20, message="uvicorn to start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 15)


async def entries_by_customer(db: Database) -> dict[str, list]:
    """Every ledger entry, in id order, by customer."""
    async with db.connect() as connection:
        rows = (await connection.execute(select(ledger_entries).order_by(ledger_entries.c.id))).mappings().all()
    grouped: dict[str, list] = {}
    for row in rows:
        grouped.setdefault(row["customer_id"], []).append(row)
    return grouped


def assert_serial_chain(customer_id: str, entries: list) -> None:
    """Each entry's balance_after is the previous one plus its credits (hold entries move no
    balance): no two writers saw the same state."""
    balance = 0
    for entry in entries:
        balance += entry["credits"] if entry["kind"] not in HOLD_KINDS else 0
        assert entry["balance_after"] == balance, f"{customer_id}: entry {entry['id']} lost an update"


def stop_process(
    process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0, group: bool = False
) -> None:
    """Signal a process started with its own session (or its whole group), then kill the group if it lingers."""
    if process.poll() is None:
        (os.killpg if group else os.kill)(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@dataclass
class BrokerUnderTest:
    """The broker a delivery test runs on: Redis (this run's logical db) or RabbitMQ (this
    run's own vhost). Processes get it as BROKER_URL; the test inspects it here."""

    kind: str
    url: str

    @property
    def env(self) -> dict[str, str]:
        return {"BROKER_URL": self.url}

    def raw_broker(self):
        """A bare producer broker, to enqueue messages the Publisher would never write."""
        from dramatiq.brokers.redis import RedisBroker

        from infra.broker import rabbitmq_broker

        return (
            rabbitmq_broker(self.url, middleware=[])
            if self.kind == "rabbitmq"
            else RedisBroker(url=self.url, middleware=[])
        )

    def dead_lettered(self, queue: str) -> dict[str, dict]:
        """The broker's dead-letter queue for ``queue``: message id → decoded message."""
        from infra.broker import dead_letter_bodies

        broker = self.raw_broker()
        try:
            bodies = [json.loads(body) for body in dead_letter_bodies(broker, queue)]
        finally:
            broker.close()
        return {body["message_id"]: body for body in bodies}

    def waiting(self, queue: str) -> int:
        """Messages queued (not yet fetched) on ``queue`` and its delay queue."""
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                return sum(
                    client.llen(f"dramatiq:{name}") + client.hlen(f"dramatiq:{name}.msgs")
                    for name in (queue, f"{queue}.DQ")
                )
            finally:
                client.close()
        return sum(count for count, _consumers in self._rabbitmq_queues(queue, f"{queue}.DQ"))

    def consumers(self, queue: str) -> int:
        """RabbitMQ: the consumers attached to ``queue``."""
        [(_count, consumers)] = self._rabbitmq_queues(queue)
        return consumers

    def _rabbitmq_queues(self, *names: str) -> list[tuple[int, int]]:
        import pika

        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            found = []
            for name in names:
                channel = connection.channel()
                try:
                    method = channel.queue_declare(name, passive=True).method
                    found.append((method.message_count, method.consumer_count))
                    channel.close()
                except pika.exceptions.ChannelClosedByBroker:
                    found.append((0, 0))  # not declared yet
            return found
        finally:
            connection.close()


def rabbitmq_vhost(action: str, vhost: str) -> None:
    """Create (and open to guest) or delete a vhost of the local RabbitMQ; a test run's own."""
    commands = [
        ["rabbitmqctl", "add_vhost", vhost],
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
    ]
    for command in commands if action == "add" else [["rabbitmqctl", "delete_vhost", vhost]]:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stdout}{done.stderr}"


def rabbitmq_reset(url: str, queues: tuple[str, ...]) -> None:
    """Delete these queues (with their delay and dead-letter queues) in the test run's vhost."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for queue in queues:
            for name in (queue, f"{queue}.DQ", f"{queue}.XQ"):
                channel.queue_delete(name)
    finally:
        connection.close()
