"""The shipped compose runs Redis with an append-only file: a Redis restart loses nothing.

A private `redis-server` runs with exactly docker-compose.yml's persistence options (read from
the file, so the test follows it); 10,000 events are published while real workers consume;
Redis is killed (SIGKILL, a crash) and started again on the same files mid-stream. Every event
must be applied exactly once, with no re-publishing beyond what the producer contract asks
(a publish that raised is published again with the same event id).

And a publish during an outage raises ``messages.PublishFailed``; it never drops silently.
"""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import pytest
import yaml

from messages import JobCompleted, Publisher, PublishFailed
from tests.support import ROOT, free_port
from tests.support.faults import (
    EVENT_QUEUES,
    T0,
    PrivateRedis,
    assert_ledger_as_expected,
    deliveries_per_event,
    leftovers,
    plain_dsn,
    processed_count,
    report,
    workload,
)

pytestmark = pytest.mark.slow

EVENTS = 10_000
RESTART_AFTER_PUBLISHED = 4_000


def compose_redis_persistence() -> tuple[str, ...]:
    """The options docker-compose.yml gives redis-server (everything after the program name)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["redis"]["command"]
    assert command[0] == "redis-server"
    options = tuple(command[1:])
    assert "--appendonly" in options and options[options.index("--appendonly") + 1] == "yes", options
    return options


class Producer(threading.Thread):
    """Publishes every event as the wire contract says: a publish that raised is published again."""

    def __init__(self, url: str, events: list) -> None:
        super().__init__(daemon=True)
        self.publisher = Publisher.from_url(url)
        self.events = events
        self.published = 0
        self.failures = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.events:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        self.publisher.publish(event)
                        break
                    except PublishFailed:
                        self.failures += 1
                        assert time.monotonic() < deadline, f"{event.event_id} could not be published for 60 s"
                        time.sleep(0.2)
                self.published += 1
        except BaseException as error:  # reported by the test
            self.error = error
        finally:
            self.publisher.close()


@pytest.mark.timeout(900)
async def test_redis_with_the_compose_persistence_restarted_mid_stream_loses_nothing(
    db, pg_url, start_workers, tmp_path
):
    options = compose_redis_persistence()
    server = PrivateRedis(tmp_path, persistence=options)
    server.start()
    prefix = "ao"
    events = workload(EVENTS, customers=300, seed=1707, prefix=prefix)
    connection = await asyncpg.connect(plain_dsn(pg_url))
    started = time.monotonic()
    try:
        workers = start_workers(processes=2, threads=8, env={"REDIS_URL": server.url})
        producer = Producer(server.url, events)
        producer.start()
        while producer.published < RESTART_AFTER_PUBLISHED:
            assert producer.is_alive(), producer.error
            await asyncio.sleep(0.05)
        applied_at_crash = await processed_count(connection, prefix)
        server.kill()  # a crash: no shutdown save; only the append-only file remains
        await asyncio.sleep(1.0)  # an outage the producer and the workers both meet
        server.start()
        published_at_crash = producer.published
        await asyncio.to_thread(producer.join, 600)
        assert producer.error is None, producer.error
        assert producer.published == EVENTS

        import redis

        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 600
        while await processed_count(connection, prefix) < EVENTS or leftovers(client, EVENT_QUEUES):
            assert time.monotonic() < deadline, (
                f"{await processed_count(connection, prefix)} of {EVENTS} applied; Redis {leftovers(client, EVENT_QUEUES)}"
            )
            await asyncio.sleep(0.5)
        lost, doubled = await assert_ledger_as_expected(connection, events, prefix)
        assert await connection.fetchval("SELECT count(*) FROM dead_letters") == 0
        client.close()
    finally:
        await connection.close()
        server.stop()

    report(
        tmp_path,
        "redis_aof_restart",
        events=EVENTS,
        redis_options=" ".join(options),
        fault="SIGKILL of redis-server mid-stream, restarted on its append-only file",
        published_at_crash=published_at_crash,
        applied_at_crash=applied_at_crash,
        publishes_refused_during_outage=producer.failures,
        lost=lost,
        doubled=doubled,
        deliveries_per_event=deliveries_per_event([workers], prefix),
        seconds=round(time.monotonic() - started, 1),
    )


def test_publish_while_redis_is_down_raises_publish_failed_and_enqueues_nothing(tmp_path):
    server = PrivateRedis(tmp_path)
    server.start()
    publisher = Publisher.from_url(server.url)
    event = JobCompleted(event_id="outage-1", customer_id="c", occurred_at=T0, job_id="j")
    try:
        publisher.publish(event)  # up: taken
        server.kill()
        started = time.monotonic()
        with pytest.raises(PublishFailed, match="publish it again with the same event_id") as raised:
            publisher.publish(JobCompleted(event_id="outage-2", customer_id="c", occurred_at=T0, job_id="j2"))
        assert time.monotonic() - started < 30
        assert raised.value.__cause__ is not None  # the broker's own error, kept
        assert "outage-2" in str(raised.value)
    finally:
        publisher.close()
        server.stop()


def test_publish_to_an_address_where_nothing_listens_raises_publish_failed():
    publisher = Publisher.from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(PublishFailed):
        publisher.publish(JobCompleted(event_id="nowhere", customer_id="c", occurred_at=T0, job_id="j"))
    publisher.close()
