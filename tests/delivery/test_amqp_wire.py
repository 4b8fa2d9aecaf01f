"""docs/WIRE_CONTRACT.md's raw AMQP publish, run as written, reaches the ledger through RabbitMQ."""

from __future__ import annotations

import re

from tests.support import ROOT, wait_until
from tests.support.delivery import customer_row, wait_for_outcomes


def documented_amqp_example() -> str:
    text = (ROOT / "docs" / "WIRE_CONTRACT.md").read_text()
    section = text.split("## The raw message on RabbitMQ", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1]


async def test_the_documented_raw_amqp_publish_is_applied(db, rabbitmq_url, service_env, start_workers):
    from tests.conftest import BROKER_QUEUES
    from tests.support import rabbitmq_reset

    rabbitmq_reset(rabbitmq_url, BROKER_QUEUES)
    workers = start_workers(processes=1, threads=2, env={"BROKER_URL": rabbitmq_url})
    exec(compile(documented_amqp_example(), "WIRE_CONTRACT.md", "exec"), {"url": rabbitmq_url})

    def applied() -> bool:
        return any(r.get("event") == "event_applied" and r.get("event_id") == "evt-amqp-123" for r in workers.records())

    wait_until(applied, timeout=30, message="the raw AMQP event to be applied")
    [message_id] = {r["message_id"] for r in workers.records() if r.get("event_id") == "evt-amqp-123"}
    assert wait_for_outcomes(workers, [message_id]) == {message_id: "event_applied"}
    row = await customer_row(db, "cus_42")
    assert (row["balance"], row["overdraft"]) == (-1, 1)  # a job with no credits: overdraft


def test_publish_to_rabbitmq_that_is_not_there_raises_publish_failed():
    from messages import JobCompleted, Publisher, PublishFailed
    from tests.support import free_port
    from tests.support.delivery import T0

    publisher = Publisher.from_url(f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    try:
        try:
            publisher.publish(JobCompleted(event_id="amqp-nowhere", customer_id="c", occurred_at=T0, job_id="j"))
        except PublishFailed as error:
            assert "amqp-nowhere" in str(error) and error.__cause__ is not None
        else:
            raise AssertionError("publish to an unreachable RabbitMQ returned")
    finally:
        publisher.close()


def test_publisher_to_rabbitmq_confirms_every_publish(rabbitmq_url):
    from messages import Publisher

    publisher = Publisher.from_url(rabbitmq_url)
    assert publisher.broker.confirm_delivery is True
    publisher.close()
