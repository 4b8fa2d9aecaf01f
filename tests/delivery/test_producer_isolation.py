"""The producer API needs only pydantic, dramatiq and redis — and writes the documented wire format.

A front end installs the schemas and `Publisher`, not the back end. A subprocess blocks every
back-end dependency and every other package of the project at import time, then imports
`messages` and publishes to the real Redis; the test reads the raw message back out of Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime

import pytest

from messages import EVENTS_QUEUE, PaymentSucceeded, Publisher, parse_event
from tests.support import ROOT

BLOCKED = (
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "fastapi",
    "starlette",
    "uvicorn",
    "structlog",
    "alembic",
    "fakeredis",
    "stripe",
    "domain",
    "infra",
    "workers",
    "service_layer",
    "api",
)

PRODUCER = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime, timezone

    BLOCKED = set(sys.argv[2].split(","))

    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"the producer must not import {name}")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in ("sqlalchemy", "infra.settings"):  # the blocker works
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} was importable")

    from messages import CreditsAdjusted, JobCancelled, JobCompleted, PaymentSucceeded, Publisher

    at = datetime(2026, 5, 1, 9, 30, tzinfo=timezone.utc)
    events = [
        PaymentSucceeded(event_id="p-1", customer_id="c-1", occurred_at=at, payment_id="in_1", credits=4, amount_cents=10000, currency="USD"),
        JobCompleted(event_id="j-1", customer_id="c-1", occurred_at=at, job_id="job-1"),
        JobCancelled(event_id="x-1", customer_id="c-1", occurred_at=at, job_id="job-2"),
        CreditsAdjusted(event_id="a-1", customer_id="c-1", occurred_at=at, credits=-1, reason="refund", actor="ops"),
    ]
    publisher = Publisher.from_url(sys.argv[1])
    ids = [publisher.publish(event) for event in events]
    publisher.close()
    loaded = sorted({name.split(".")[0] for name in sys.modules})
    print(json.dumps({"ids": ids, "events": [e.model_dump_json() for e in events], "loaded": loaded}))
    """
)


def test_producer_publishes_with_only_pydantic_dramatiq_and_redis(redis_client, redis_url):
    result = subprocess.run(
        [sys.executable, "-c", PRODUCER, redis_url, ",".join(BLOCKED)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not set(report["loaded"]) & set(BLOCKED)
    assert {"pydantic", "dramatiq", "redis", "messages"} <= set(report["loaded"])

    # The raw message, as a worker (or a producer in another language) sees it: the hash holds
    # each envelope under its Redis id, the list queues those ids in publish order.
    stored = {
        key.decode(): json.loads(raw) for key, raw in redis_client.hgetall(f"dramatiq:{EVENTS_QUEUE}.msgs").items()
    }
    queue = [raw.decode() for raw in redis_client.lrange(f"dramatiq:{EVENTS_QUEUE}", 0, -1)]
    assert len(stored) == 4 and sorted(queue) == sorted(stored)
    by_message_id = {message["message_id"]: message for message in stored.values()}
    assert sorted(by_message_id) == sorted(report["ids"])  # publish() returned the Dramatiq message ids
    assert [stored[key]["message_id"] for key in queue] == report["ids"]  # in publish order
    for redis_id, message in stored.items():
        assert message["options"] == {"redis_message_id": redis_id}
        assert message["queue_name"] == "credit_events"
        assert message["actor_name"] == "apply_event"
        assert message["args"] == []
        assert set(message["kwargs"]) == {"event"}
        assert isinstance(message["kwargs"]["event"], str)  # the event is a JSON *string*
        assert isinstance(message["message_timestamp"], int)
    for message_id, event_json in zip(report["ids"], report["events"], strict=True):
        carried = by_message_id[message_id]["kwargs"]["event"]
        assert carried == event_json
        assert parse_event(carried) == parse_event(event_json)

    first = parse_event(by_message_id[report["ids"][0]]["kwargs"]["event"])
    assert first == PaymentSucceeded(
        event_id="p-1",
        customer_id="c-1",
        occurred_at=datetime(2026, 5, 1, 9, 30, tzinfo=UTC),
        payment_id="in_1",
        credits=4,
        amount_cents=10000,
        currency="USD",
    )


@pytest.mark.parametrize("thing", [{"type": "payment.succeeded", "credits": 1}, '{"type": "job.completed"}', None])
def test_publish_refuses_anything_but_an_event(redis_client, redis_url, thing):
    publisher = Publisher.from_url(redis_url)
    try:
        with pytest.raises(TypeError, match="publish\\(\\) takes an event model"):
            publisher.publish(thing)
    finally:
        publisher.close()
    assert redis_client.keys("dramatiq:*") == []  # nothing was enqueued
