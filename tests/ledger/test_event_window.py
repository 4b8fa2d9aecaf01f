"""A mistyped event date never reaches the ledger: refused by a real worker, dead-lettered, balances intact."""

from datetime import UTC, datetime, timedelta

from messages import Publisher
from tests.support.delivery import (
    customer_row,
    job,
    ledger_snapshot,
    outcomes_of,
    payment,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)


async def test_events_dated_years_ahead_or_ancient_are_refused_and_the_balance_survives(
    db, redis_client, redis_url, start_workers
):
    # The production window: 5 minutes ahead, 400 days back.
    workers = start_workers(env={"EVENT_MAX_AGE_DAYS": "400", "EVENT_MAX_FUTURE_SECONDS": "300"})
    publisher = Publisher.from_url(redis_url)
    now = datetime.now(UTC)
    paid = publisher.publish(payment("pay-window", "cust-window", 10, at=now - timedelta(days=1)))
    assert wait_for_outcomes(workers, [paid]) == {paid: "event_applied"}
    before = await ledger_snapshot(db)

    typo_year = publisher.publish(job("job-2036", "cust-window", "j-typo", at=now.replace(year=now.year + 10)))
    ancient = publisher.publish(payment("pay-1970", "cust-window", 3, at=datetime(1970, 1, 1, tzinfo=UTC)))
    outcomes = wait_for_outcomes(workers, [typo_year, ancient])
    assert outcomes == {typo_year: "event_rejected", ancient: "event_rejected"}
    reasons = {m: outcomes_of(workers)[m][-1] for m in (typo_year, ancient)}
    assert reasons[typo_year]["reason"] == "EventOutsideWindow" and "in the future" in reasons[typo_year]["detail"]
    assert "400 days old" in reasons[ancient]["detail"]
    rows = await wait_for_dead_letter_rows(db, [typo_year, ancient])
    assert set(rows) == {typo_year, ancient}

    # Nothing expired, nothing charged: the 10 credits are still there.
    assert await ledger_snapshot(db) == before
    assert (await customer_row(db, "cust-window"))["balance"] == 10
    publisher.close()
