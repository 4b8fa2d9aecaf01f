"""Delivery guarantees end to end: Publisher → real Redis or RabbitMQ → real `dramatiq workers.actors` → PostgreSQL.

At-least-once in, exactly-once effects: the same event published several times changes the
ledger once; the same event_id with a different payload is refused loudly (the broker's dead-letter
queue, an `event_rejected` error log line, a `dead_letters` row) and never applied; events
arriving out of order are applied at their own time.

The helpers are in tests/support/delivery.py.
"""

from __future__ import annotations

import json
from datetime import timedelta

from sqlalchemy import func, select

from infra.db.tables import credit_lots, processed_events
from messages import APPLY_EVENT_ACTOR, EVENTS_QUEUE, Publisher
from tests.support import reconciliation, wait_until
from tests.support.delivery import (
    T0,
    customer_row,
    dead_letter_rows,
    dead_lettered,
    entries_of,
    job,
    ledger_snapshot,
    outcomes_of,
    payment,
    publish_raw,
    raw_broker,
    retry_lines,
    scalar,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)

# --------------------------------------------------------------------------- tests


async def test_an_event_published_many_times_changes_the_ledger_once(db, message_broker, start_workers):
    workers = start_workers(processes=1, threads=4, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    pay = payment("pay-1", "cust-dup", 10)
    completed = job("job-1-done", "cust-dup", "job-1", credits=3)

    # Wait for the payment first so the job's outcome does not depend on processing order.
    first = publisher.publish(pay)
    assert wait_for_outcomes(workers, [first]) == {first: "event_applied"}
    copies = [publisher.publish(completed) for _ in range(5)] + [publisher.publish(pay) for _ in range(3)]
    outcomes = wait_for_outcomes(workers, copies)

    # Exactly one of the job's copies did the work; every other copy was a recognised duplicate.
    assert sorted(outcomes[m] for m in copies[:5]) == ["event_applied"] + ["event_duplicate"] * 4
    assert [outcomes[m] for m in copies[5:]] == ["event_duplicate"] * 3
    assert all(len(lines) == 1 for m, lines in outcomes_of(workers).items()), "a copy was attempted more than once"

    entries = await entries_of(db, "cust-dup")
    assert [(e["kind"], e["credits"], e["event_id"], e["job_id"]) for e in entries] == [
        ("issued", 10, "pay-1", None),
        ("debited", -3, "job-1-done", "job-1"),
    ]
    row = await customer_row(db, "cust-dup")
    assert (row["balance"], row["overdraft"]) == (7, 0)
    assert await scalar(db, select(func.count()).select_from(processed_events)) == 2
    assert await scalar(db, select(func.count()).select_from(credit_lots)) == 1
    assert await reconciliation(db) == []

    # Once everything has settled, a late redelivery changes nothing at all.
    before = await ledger_snapshot(db)
    late = [publisher.publish(completed), publisher.publish(pay)]
    assert wait_for_outcomes(workers, late) == {late[0]: "event_duplicate", late[1]: "event_duplicate"}
    # So does the same event as another producer might spell it: other key order, another
    # UTC offset for the same instant, optional fields left out. Same event, same fingerprint.
    raw = raw_broker(message_broker)
    respelled = json.dumps(
        {
            "credits": 10,
            "payment_id": "in_pay-1",
            "type": "payment.succeeded",
            "customer_id": "cust-dup",
            "occurred_at": "2026-03-02T10:00:00+01:00",
            "event_id": "pay-1",
        }
    )
    other = publish_raw(raw, kwargs={"event": respelled})
    assert wait_for_outcomes(workers, [other]) == {other: "event_duplicate"}
    raw.close()
    assert await ledger_snapshot(db) == before
    assert dead_lettered(message_broker) == {}
    assert await dead_letter_rows(db) == {}
    publisher.close()


async def test_same_event_id_with_a_different_payload_is_refused_loudly(db, message_broker, start_workers):
    workers = start_workers(processes=1, threads=2, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    original = payment("pay-conflict", "cust-conflict", 10)
    applied = publisher.publish(original)
    assert wait_for_outcomes(workers, [applied]) == {applied: "event_applied"}
    before = await ledger_snapshot(db)

    # Same event_id, different amount: a producer bug that must never reach the ledger.
    forged = payment("pay-conflict", "cust-conflict", 99)
    refused = publisher.publish(forged)
    assert wait_for_outcomes(workers, [refused]) == {refused: "event_rejected"}

    # 1. The broker's dead-letter queue, holding the refused payload.
    wait_until(lambda: refused in dead_lettered(message_broker), message="the conflict in the dead-letter queue")
    xq = dead_lettered(message_broker)
    assert set(xq) == {refused}
    assert json.loads(xq[refused]["kwargs"]["event"])["credits"] == 99
    # 2. An error log line saying why, tied to the message.
    [line] = outcomes_of(workers)[refused]
    assert line["level"] == "error" and line["reason"] == "EventConflict"
    assert "pay-conflict" in line["detail"] and "different payload" in line["detail"]
    assert retry_lines(workers, refused) == [], "a conflict must not be retried"
    # 3. A row in PostgreSQL's dead_letters with the error and the whole message.
    rows = await wait_for_dead_letter_rows(db, [refused])
    assert set(rows) == {refused}
    assert rows[refused]["queue_name"] == EVENTS_QUEUE and rows[refused]["actor_name"] == APPLY_EVENT_ACTOR
    assert rows[refused]["error"].startswith("Rejected: ") and "different payload" in rows[refused]["error"]
    assert json.loads(json.loads(rows[refused]["message"])["kwargs"]["event"])["credits"] == 99

    # Never applied: the ledger is exactly as before, the original fingerprint stands.
    assert await ledger_snapshot(db) == before
    assert (await customer_row(db, "cust-conflict"))["balance"] == 10

    # And the worker goes on: the next event is applied.
    after = publisher.publish(job("job-after-conflict", "cust-conflict", "j-1"))
    assert wait_for_outcomes(workers, [after]) == {after: "event_applied"}
    assert (await customer_row(db, "cust-conflict"))["balance"] == 9
    assert await reconciliation(db) == []
    publisher.close()


async def test_a_job_is_charged_once_even_under_a_second_event_id(db, message_broker, start_workers):
    workers = start_workers(processes=1, threads=2, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    ids = [publisher.publish(payment("pay-2", "cust-twice", 5))]
    assert wait_for_outcomes(workers, ids)[ids[0]] == "event_applied"
    charged = publisher.publish(job("done-a", "cust-twice", "job-x", credits=2))
    assert wait_for_outcomes(workers, [charged]) == {charged: "event_applied"}

    again = publisher.publish(job("done-b", "cust-twice", "job-x", credits=2))
    assert wait_for_outcomes(workers, [again]) == {again: "event_rejected"}
    assert outcomes_of(workers)[again][0]["reason"] == "JobAlreadyCharged"
    await wait_for_dead_letter_rows(db, [again])
    assert set(dead_lettered(message_broker)) == {again}

    charges = [e for e in await entries_of(db, "cust-twice") if e["job_id"] == "job-x"]
    assert [(e["kind"], e["credits"], e["event_id"]) for e in charges] == [("debited", -2, "done-a")]
    assert (await customer_row(db, "cust-twice"))["balance"] == 3
    assert (
        await scalar(
            db, select(func.count()).select_from(processed_events).where(processed_events.c.event_id == "done-b")
        )
        == 0
    )
    publisher.close()


async def test_late_events_are_applied_at_their_own_time(db, message_broker, start_workers):
    workers = start_workers(processes=1, threads=2, env=message_broker.env)
    publisher = Publisher.from_url(message_broker.url)
    paid_at = T0 + timedelta(days=10)
    job_at = T0 + timedelta(days=3)  # before the payment, but published after it

    first = publisher.publish(payment("pay-late", "cust-late", 2, at=paid_at))
    assert wait_for_outcomes(workers, [first]) == {first: "event_applied"}
    assert (await customer_row(db, "cust-late"))["credits_depleted_at"] is None
    late = publisher.publish(job("job-late-done", "cust-late", "job-late", at=job_at, credits=2))
    assert wait_for_outcomes(workers, [late]) == {late: "event_applied"}

    row = await customer_row(db, "cust-late")
    assert (row["balance"], row["overdraft"]) == (0, 0)
    # Depletion is dated by the event that depleted the credits, not by when it was processed.
    assert row["credits_depleted_at"] == job_at
    debit = (await entries_of(db, "cust-late"))[-1]
    assert (debit["kind"], debit["credits"], debit["occurred_at"], debit["balance_after"]) == ("debited", -2, job_at, 0)

    # A job reported before any payment arrives runs into overdraft; the late payment repays it.
    early = publisher.publish(job("job-early-done", "cust-early", "job-early", at=T0 + timedelta(days=5), credits=3))
    assert wait_for_outcomes(workers, [early]) == {early: "event_applied"}
    row = await customer_row(db, "cust-early")
    assert (row["balance"], row["overdraft"], row["credits_depleted_at"]) == (-3, 3, None)
    repay = publisher.publish(payment("pay-early", "cust-early", 5, at=T0 + timedelta(days=1)))
    assert wait_for_outcomes(workers, [repay]) == {repay: "event_applied"}
    row = await customer_row(db, "cust-early")
    assert (row["balance"], row["overdraft"]) == (2, 0)
    async with db.connect() as connection:
        remaining = (
            (await connection.execute(select(credit_lots.c.remaining).where(credit_lots.c.customer_id == "cust-early")))
            .scalars()
            .all()
        )
    assert remaining == [2]
    assert await reconciliation(db) == []
    assert dead_lettered(message_broker) == {}
    publisher.close()
