"""The message-size bound holds on RabbitMQ too: it lives in the encoder, where every consumer decodes.

Dramatiq's own RabbitMQ consumer, on the shared RabbitMQ server (a queue of this test's own):
an oversized body is nacked to the dead-letter queue unread, and the log line about it does
not quote it. Skipped where the RabbitMQ client (pika) is not installed.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import dramatiq
import pytest
from dramatiq.common import dq_name, xq_name

from infra.wire_encoder import BoundedJSONEncoder

pika = pytest.importorskip("pika")

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


@pytest.fixture
def bounded_encoder():
    previous = dramatiq.get_encoder()
    dramatiq.set_encoder(BoundedJSONEncoder(65_536))
    yield
    dramatiq.set_encoder(previous)


@pytest.fixture
def rabbitmq_queue():
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=RABBITMQ_URL, middleware=[])
    queue = f"logsafety_{uuid.uuid4().hex[:12]}"
    broker.declare_queue(queue, ensure=True)  # declared on the server now, with its dead-letter queue
    yield broker, queue
    for name in (queue, dq_name(queue), xq_name(queue)):
        broker.channel.queue_delete(name)
    broker.close()


def test_an_oversized_message_is_dead_lettered_unread_by_dramatiqs_rabbitmq_consumer(
    bounded_encoder, rabbitmq_queue, caplog
):
    broker, queue = rabbitmq_queue
    secret = "bob.pii@example.com " * 50_000  # 1 MB
    body = json.dumps(
        {
            "queue_name": queue,
            "actor_name": "apply_event",
            "args": [],
            "kwargs": {"event": secret},
            "options": {},
            "message_id": str(uuid.uuid4()),
            "message_timestamp": int(time.time() * 1000),
        }
    ).encode()
    broker.channel.basic_publish(
        exchange="", routing_key=queue, body=body, properties=pika.BasicProperties(delivery_mode=2)
    )

    consumer = broker.consume(queue, prefetch=1, timeout=1000)
    with caplog.at_level(logging.INFO):
        deadline = time.monotonic() + 10
        while (
            not any("Failed to decode message" in r.getMessage() for r in caplog.records)
            and time.monotonic() < deadline
        ):
            assert next(consumer) is None  # never handed on as a message
    consumer.close()

    def dead_letters() -> int:
        return broker.channel.queue_declare(xq_name(queue), durable=True, passive=True).method.message_count

    deadline = time.monotonic() + 10
    while dead_letters() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert dead_letters() == 1
    assert broker.channel.queue_declare(queue, durable=True, passive=True).method.message_count == 0
    logged = "\n".join(logging.Formatter().format(record) for record in caplog.records)
    assert "MAX_MESSAGE_BYTES (65536)" in logged
    assert "bob.pii" not in logged and len(logged) < 10_000
