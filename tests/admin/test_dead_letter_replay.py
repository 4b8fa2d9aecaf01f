"""Operators re-enqueue archived dead letters with `credits dead-letters replay`: nothing is stuck for good."""

import dramatiq
from sqlalchemy import func, select

from infra.db.tables import customers, processed_events
from messages import PaymentSucceeded
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE
from tests.support import eventually
from tests.support.delivery import (
    T0,
    archive,
    credits_cli,
)


async def test_a_message_that_ran_out_of_retries_is_replayed_once_and_applied_once(
    db, message_broker, service_env, start_workers
):
    service_env = {**service_env, **message_broker.env}
    event = PaymentSucceeded(
        event_id="pay-outage", customer_id="cust-replay", occurred_at=T0, payment_id="in_9", credits=5
    )
    message = dramatiq.Message(
        queue_name=f"{EVENTS_QUEUE}.DQ",
        actor_name=APPLY_EVENT_ACTOR,
        args=(),
        kwargs={EVENT_KWARG: event.model_dump_json()},
        options={"retries": 20, "eta": 1, "redis_message_id": "old", "traceback": "ConnectionRefusedError"},
    )
    dead_letter_id = await archive(db, message, "ConnectionRefusedError: [Errno 111] Connect call failed")

    listed = credits_cli(["dead-letters", "list"], service_env)
    assert listed.returncode == 0, listed.stderr
    assert f"{dead_letter_id:>6}" in listed.stdout and "ConnectionRefusedError" in listed.stdout

    replayed = credits_cli(["dead-letters", "replay", str(dead_letter_id)], service_env)
    assert replayed.returncode == 0, replayed.stderr
    assert f"{dead_letter_id}: re-enqueued message {message.message_id} to {EVENTS_QUEUE}" in replayed.stdout

    start_workers(env=message_broker.env)

    async def applied() -> bool:
        async with db.connect() as connection:
            return (
                await connection.execute(select(customers.c.balance).where(customers.c.customer_id == "cust-replay"))
            ).scalar() == 5

    await eventually(applied, message="the replayed payment to be applied")

    again = credits_cli(["dead-letters", "replay", str(dead_letter_id)], service_env)
    assert "already replayed" in again.stdout
    assert credits_cli(["dead-letters", "list"], service_env).stdout.strip() == ""

    forced = credits_cli(["dead-letters", "replay", "--force", str(dead_letter_id)], service_env)
    assert "re-enqueued" in forced.stdout

    async def drained() -> bool:
        return message_broker.waiting(EVENTS_QUEUE) == 0

    await eventually(drained, message="the forced replay to be consumed")
    async with db.connect() as connection:
        balance = (
            await connection.execute(select(customers.c.balance).where(customers.c.customer_id == "cust-replay"))
        ).scalar_one()
        applied_count = (await connection.execute(select(func.count()).select_from(processed_events))).scalar_one()
    assert (balance, applied_count) == (5, 1)  # a second replay is a harmless duplicate


async def test_replaying_an_unknown_id_says_so(db, service_env):
    result = credits_cli(["dead-letters", "replay", "424242"], service_env)
    assert result.returncode == 0
    assert "424242: no such dead letter" in result.stdout
