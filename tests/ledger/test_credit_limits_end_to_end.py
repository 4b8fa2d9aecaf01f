"""Credits in 64 bits, bounded by the domain (domain/limits.py), over HTTP and through the workers.

The old failure: 2,148 adjustments of +1,000,000 took a balance past int32; the next was an
HTTP 500 and, as an event, an unhandled error retried 20 times. Here a balance is seeded just
below 2^31 (one seeded lot stands for those thousands of adjustments) and two more go through;
then the bound itself: a balance at MAX_BALANCE takes no more (409 over HTTP, a dead letter
after one attempt through a worker), and an adjustment landing exactly on it is applied.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import insert, select

from domain import MAX_BALANCE, MAX_CREDITS_PER_EVENT
from infra.db.tables import credit_lots, customers, ledger_entries, lot_movements
from messages import CreditsAdjusted, JobCompleted, Publisher
from tests.support import reconciliation
from tests.support.console import ADMIN_TOKEN, NOW, serving
from tests.support.delivery import (
    T0,
    dead_lettered,
    outcomes_of,
    retry_lines,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)

BEARER = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JUST_BELOW_INT32 = 2**31 - 1 - 483_647  # 2,147,000,000: the next +1,000,000 passes int32


async def seed(db, customer_id: str, balance: int, at: datetime) -> None:
    """A customer holding ``balance`` credits in one lot, with the entry that issued it."""
    async with db.begin() as connection:
        await connection.execute(insert(customers).values(customer_id=customer_id, balance=balance))
        lot_id = (
            await connection.execute(
                insert(credit_lots)
                .values(
                    customer_id=customer_id,
                    source="adjustment",
                    event_id=f"seed-{customer_id}",
                    amount=balance,
                    remaining=balance,
                    issued_at=at - timedelta(days=1),
                    expires_at=at + timedelta(days=300),
                )
                .returning(credit_lots.c.id)
            )
        ).scalar_one()
        entry_id = (
            await connection.execute(
                insert(ledger_entries)
                .values(
                    customer_id=customer_id,
                    kind="adjusted",
                    credits=balance,
                    balance_after=balance,
                    occurred_at=at - timedelta(days=1),
                    event_id=f"seed-{customer_id}",
                    lot_id=lot_id,
                    note="seeded",
                )
                .returning(ledger_entries.c.id)
            )
        ).scalar_one()
        await connection.execute(insert(lot_movements).values(entry_id=entry_id, lot_id=lot_id, credits=balance))


async def balance_of(db, customer_id: str) -> int:
    async with db.connect() as connection:
        return (
            await connection.execute(select(customers.c.balance).where(customers.c.customer_id == customer_id))
        ).scalar_one()


def adjustment(credits: int, key: str) -> dict:
    return {"credits": credits, "reason": "goodwill", "admin": "ops", "idempotency_key": key}


# ---------------------------------------------------------------- over HTTP


async def test_adjustments_past_int32_are_applied_over_http(db, pg_url):
    await seed(db, "cust-int32", JUST_BELOW_INT32, NOW)
    async with serving(db, pg_url) as page:
        for key in ("past-int32-0001", "past-int32-0002"):
            response = await page.http.post(
                "/api/admin/customers/cust-int32/adjustments", json=adjustment(1_000_000, key), headers=BEARER
            )
            assert response.status_code == 201, response.text
    assert await balance_of(db, "cust-int32") == JUST_BELOW_INT32 + 2_000_000 > 2**31
    assert await reconciliation(db) == []


async def test_an_adjustment_past_the_largest_balance_is_409_over_http_and_the_exact_one_is_applied(db, pg_url):
    await seed(db, "cust-max", MAX_BALANCE - MAX_CREDITS_PER_EVENT, NOW)
    url = "/api/admin/customers/cust-max/adjustments"
    async with serving(db, pg_url) as page:
        exact = await page.http.post(url, json=adjustment(MAX_CREDITS_PER_EVENT, "to-the-max-0001"), headers=BEARER)
        assert exact.status_code == 201, exact.text
        assert await balance_of(db, "cust-max") == MAX_BALANCE

        refused = await page.http.post(url, json=adjustment(1, "past-the-max-0001"), headers=BEARER)
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "credit_limit"
        assert "largest balance" in refused.json()["detail"]

        # The admin page's own route says the same, signed in by its session.
        await page.sign_in()
        from_page = await page.http.post(
            "/admin/data/customers/cust-max/adjustments",
            json={"credits": 1, "reason": "goodwill", "idempotency_key": "page-past-max-01"},
        )
        assert from_page.status_code == 409, from_page.text

        # Taking credits off still works, and then there is room again.
        assert (await page.http.post(url, json=adjustment(-5, "down-from-max-01"), headers=BEARER)).status_code == 201
        assert (await page.http.post(url, json=adjustment(5, "back-to-max-0001"), headers=BEARER)).status_code == 201
    assert await balance_of(db, "cust-max") == MAX_BALANCE
    assert await reconciliation(db) == []


# ---------------------------------------------------------------- through the workers


async def test_events_past_int32_apply_and_past_the_bound_are_dead_lettered_at_once(
    db, redis_client, redis_url, start_workers
):
    await seed(db, "cust-int32", JUST_BELOW_INT32, T0)
    await seed(db, "cust-max", MAX_BALANCE - MAX_CREDITS_PER_EVENT, T0)
    workers = start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)

    def adjusted(event_id: str, customer_id: str, credits: int) -> str:
        event = CreditsAdjusted(
            event_id=event_id, customer_id=customer_id, occurred_at=T0, credits=credits, reason="goodwill", actor="ops"
        )
        return publisher.publish(event)

    past_int32 = [adjusted(f"int32-{n}", "cust-int32", 1_000_000) for n in range(2)]
    exact = adjusted("to-the-max", "cust-max", MAX_CREDITS_PER_EVENT)
    assert wait_for_outcomes(workers, [*past_int32, exact]) == {m: "event_applied" for m in [*past_int32, exact]}

    past_max = adjusted("past-the-max", "cust-max", 1)
    # The customer is not stuck: their next event is applied.
    job = publisher.publish(
        JobCompleted(
            event_id="job-after", customer_id="cust-max", occurred_at=T0 + timedelta(hours=1), job_id="job-1", credits=3
        )
    )
    outcomes = wait_for_outcomes(workers, [past_max, job])
    assert outcomes == {past_max: "event_rejected", job: "event_applied"}

    [line] = outcomes_of(workers)[past_max]
    assert line["reason"] == "CreditLimitExceeded" and "largest balance" in line["detail"]
    assert retry_lines(workers, past_max) == []  # never retried
    assert set(dead_lettered(redis_client)) == {past_max}
    rows = await wait_for_dead_letter_rows(db, [past_max])
    assert rows[past_max]["error"].startswith("Rejected: customer 'cust-max' holds")

    assert await balance_of(db, "cust-int32") == JUST_BELOW_INT32 + 2_000_000
    assert await balance_of(db, "cust-max") == MAX_BALANCE - 3
    assert await reconciliation(db) == []
