"""Bad input is refused at once, never retried, and never blocks or poisons the good events.

Every malformed message is enqueued raw (as a buggy producer would) onto the real Redis queue
a real worker process consumes, between good events. Each must end in Dramatiq's Redis
dead-letter queue and in the `dead_letters` table after exactly one attempt, with a log line
saying what was wrong; the good events around it must all be applied.
"""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import func, select

from infra.db.tables import processed_events
from messages import Publisher
from tests.support import reconciliation
from tests.support.delivery import (
    T0,
    customer_row,
    dead_letter_rows,
    dead_lettered,
    entries_of,
    job,
    log_records,
    outcomes_of,
    payment,
    publish_raw,
    raw_broker,
    retry_lines,
    scalar,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)

CUSTOMER = "cust-bad-input"


def event_json(**fields) -> str:
    """A job.completed event as JSON text, with fields overridden (None removes one)."""
    event = {
        "type": "job.completed",
        "event_id": "evt",
        "occurred_at": "2026-03-02T10:00:00Z",
        "customer_id": CUSTOMER,
        "job_id": "job",
        "credits": 1,
    }
    event.update(fields)
    return json.dumps({k: v for k, v in event.items() if v is not None})


PAYMENT_FIELDS = {"type": "payment.succeeded", "payment_id": "in_bad", "job_id": None, "credits": 5}

#: name → (raw message args, kwargs, what the refusal must say: pydantic error type or "malformed message")
BAD_MESSAGES: dict[str, tuple[tuple, dict, str]] = {
    "invalid JSON": ((), {"event": '{"type": "job.completed", "event_id": "bad-json"'}, "json_invalid"),
    "not a JSON object": ((), {"event": "[1, 2, 3]"}, "invalid event"),
    "missing field": ((), {"event": event_json(event_id="bad-missing", job_id=None)}, "missing"),
    "extra field": (
        (),
        {"event": event_json(event_id="bad-extra", **PAYMENT_FIELDS, coupon="SPRING")},
        "extra_forbidden",
    ),
    "zero credits": ((), {"event": event_json(event_id="bad-zero", credits=0)}, "greater_than"),
    "negative payment": (
        (),
        {"event": event_json(event_id="bad-negative", **{**PAYMENT_FIELDS, "credits": -5})},
        "greater_than",
    ),
    "zero adjustment": (
        (),
        {
            "event": event_json(
                event_id="bad-adjust", type="credits.adjusted", job_id=None, credits=0, reason="oops", actor="ops"
            )
        },
        "value_error",
    ),
    "credits as a string": ((), {"event": event_json(event_id="bad-str", credits="1")}, "int_type"),
    # The producer's first try of this event; the corrected one follows with the same event_id.
    "naive datetime": (
        (),
        {"event": event_json(event_id="fixed-later", job_id="job-fixed", occurred_at="2026-03-02T10:00:00")},
        "timezone_aware",
    ),
    "unknown type": ((), {"event": event_json(event_id="bad-type", type="job.exploded")}, "union_tag_invalid"),
    "no type": ((), {"event": event_json(event_id="bad-no-type", type=None)}, "union_tag_not_found"),
    "positional argument": ((event_json(event_id="bad-args"),), {}, "malformed message"),
    "wrong keyword": ((), {"evt": event_json(event_id="bad-kwarg")}, "malformed message"),
    "extra keyword": ((), {"event": event_json(event_id="bad-extra-kwarg"), "priority": 1}, "malformed message"),
    "event as an object": ((), {"event": json.loads(event_json(event_id="bad-object"))}, "malformed message"),
    "no arguments": ((), {}, "malformed message"),
}


async def test_bad_messages_are_dead_lettered_once_and_the_good_ones_applied(db, message_broker, start_workers):
    workers = start_workers(processes=1, threads=2, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    raw = raw_broker(message_broker)

    # Good and bad interleaved on the same queue, the way a buggy producer would send them.
    good = [publisher.publish(payment("good-pay", CUSTOMER, 10))]
    bad: dict[str, str] = {}
    for number, (name, (args, kwargs, _)) in enumerate(BAD_MESSAGES.items()):
        bad[name] = publish_raw(raw, args=args, kwargs=kwargs)
        if number % 4 == 0:
            good.append(publisher.publish(job(f"good-job-{number}", CUSTOMER, f"job-{number}")))
    # The corrected version of the event refused for its naive datetime: same event_id, now valid.
    good.append(publisher.publish(job("fixed-later", CUSTOMER, "job-fixed")))
    outcomes = wait_for_outcomes(workers, [*good, *bad.values()])

    assert {outcomes[m] for m in good} == {"event_applied"}
    assert {name: outcomes[m] for name, m in bad.items()} == {name: "event_rejected" for name in bad}

    # Each bad message was attempted exactly once, never retried, and the log says what was wrong.
    records = log_records(workers)
    for name, message_id in bad.items():
        expected = BAD_MESSAGES[name][2]
        [line] = outcomes_of(workers)[message_id]
        assert line["level"] == "error", name
        if expected == "malformed message":
            assert line["reason"] == "malformed message", name
            assert "expected kwargs {'event': <JSON string>}" in line["detail"], name
        else:
            assert line["reason"] == "invalid event", name
            # By location and type only: pydantic's message may quote the input.
            assert line["errors"] and all(set(error) == {"type", "loc"} for error in line["errors"]), name
            if expected != "invalid event":
                assert expected in {error["type"] for error in line["errors"]}, (name, line["errors"])
        assert retry_lines(workers, message_id) == [], f"{name} was retried"
        assert sum(r.get("event") == f"Aborting message '{message_id}'." for r in records) == 1, name
    missing = next(
        r for r in records if r.get("message_id") == bad["missing field"] and r.get("event") == "event_rejected"
    )
    assert {"type": "missing", "loc": ["job.completed", "job_id"]} in missing["errors"]

    # The broker's dead-letter queue: exactly the bad messages, with their original content.
    xq = dead_lettered(message_broker)
    assert set(xq) == set(bad.values())
    assert xq[bad["wrong keyword"]]["kwargs"] == BAD_MESSAGES["wrong keyword"][1]
    assert xq[bad["positional argument"]]["args"] == list(BAD_MESSAGES["positional argument"][0])
    # PostgreSQL dead_letters: the same set, each with its error and the whole message.
    rows = await wait_for_dead_letter_rows(db, bad.values())
    assert set(rows) == set(bad.values())
    for name, message_id in bad.items():
        row = rows[message_id]
        kind = "malformed message" if BAD_MESSAGES[name][2] == "malformed message" else "invalid event"
        assert row["error"].startswith(f"Rejected: {kind}"), (name, row["error"])
        assert json.loads(row["message"])["message_id"] == message_id
        assert (row["queue_name"], row["actor_name"]) == ("credit_events", "apply_event")
    assert "timezone_aware" in rows[bad["naive datetime"]]["error"]

    # Nothing bad reached the ledger; every good event did, the corrected one included.
    async with db.connect() as connection:
        recorded = set((await connection.execute(select(processed_events.c.event_id))).scalars())
    assert recorded == {"good-pay", "good-job-0", "good-job-4", "good-job-8", "good-job-12", "fixed-later"}
    entries = await entries_of(db, CUSTOMER)
    assert sorted(e["event_id"] for e in entries) == sorted(recorded)
    fixed = next(e for e in entries if e["event_id"] == "fixed-later")
    assert (fixed["kind"], fixed["job_id"], fixed["occurred_at"]) == ("debited", "job-fixed", T0 + timedelta(hours=1))
    row = await customer_row(db, CUSTOMER)
    assert (row["balance"], row["overdraft"]) == (10 - 5, 0)
    assert await reconciliation(db) == []

    # The worker is still consuming: a good event published after all of that is applied.
    last = publisher.publish(job("good-last", CUSTOMER, "job-last"))
    assert wait_for_outcomes(workers, [last]) == {last: "event_applied"}
    assert (await customer_row(db, CUSTOMER))["balance"] == 4
    assert await scalar(db, select(func.count()).select_from(processed_events)) == len(recorded) + 1
    assert len(await dead_letter_rows(db)) == len(bad)
    assert workers.process.poll() is None
    publisher.close()
    raw.close()


async def test_an_envelope_that_is_not_a_dramatiq_message_is_dead_lettered_and_the_rest_go_through(
    db, redis_client, redis_url, start_workers
):
    """A producer in another language writes garbage into the queue itself, not just the event."""
    workers = start_workers(processes=1, threads=2)
    good = Publisher.from_url(redis_url)
    first = good.publish(payment("pay-envelope", "cust-envelope", 3))
    # A raw write exactly as docs/WIRE_CONTRACT.md describes, but with a broken envelope.
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset("dramatiq:credit_events.msgs", "garbage-1", b"{not json at all")
        pipe.rpush("dramatiq:credit_events", "garbage-1")
        pipe.execute()
    after = [good.publish(job(f"job-envelope-{n}", "cust-envelope", f"j-{n}")) for n in range(2)]
    assert set(wait_for_outcomes(workers, [first, *after]).values()) == {"event_applied"}
    assert (await customer_row(db, "cust-envelope"))["balance"] == 1

    assert redis_client.zscore("dramatiq:credit_events.XQ", "garbage-1") is not None
    assert redis_client.hget("dramatiq:credit_events.XQ.msgs", "garbage-1") == b"{not json at all"
    [line] = [r for r in log_records(workers) if r.get("event") == "message_undecodable"]
    assert line["level"] == "error" and line["redis_message_id"] == "garbage-1"
    assert "Consumer encountered an unexpected error" not in workers.log()
    good.close()


async def test_an_envelope_that_is_not_a_dramatiq_message_is_dead_lettered_on_rabbitmq_too(
    db, rabbitmq_url, start_workers
):
    """The same garbage written straight to RabbitMQ: Dramatiq's RabbitMQ consumer rejects it to
    `credit_events.XQ`, and the events around it are applied."""
    import pika

    from tests.conftest import BROKER_QUEUES
    from tests.support import BrokerUnderTest, rabbitmq_reset

    rabbitmq_reset(rabbitmq_url, BROKER_QUEUES)
    broker = BrokerUnderTest("rabbitmq", rabbitmq_url)
    workers = start_workers(processes=1, threads=2, env=broker.env)
    good = Publisher.from_url(rabbitmq_url)
    first = good.publish(payment("pay-envelope", "cust-envelope", 3))
    connection = pika.BlockingConnection(pika.URLParameters(rabbitmq_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish(
        exchange="",
        routing_key="credit_events",
        body=b"{not json at all",
        properties=pika.BasicProperties(delivery_mode=2),
        mandatory=True,
    )
    connection.close()
    after = [good.publish(job(f"job-envelope-{n}", "cust-envelope", f"j-{n}")) for n in range(2)]
    assert set(wait_for_outcomes(workers, [first, *after]).values()) == {"event_applied"}
    assert (await customer_row(db, "cust-envelope"))["balance"] == 1

    from infra.broker import dead_letter_bodies

    raw = broker.raw_broker()
    try:
        assert dead_letter_bodies(raw, "credit_events") == [b"{not json at all"]
    finally:
        raw.close()
    assert "Consumer encountered an unexpected error" not in workers.log()
    assert workers.process.poll() is None
    good.close()
