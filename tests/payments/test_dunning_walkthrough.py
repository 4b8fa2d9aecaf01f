"""A failed subscription payment, end to end, walked through its whole retry schedule.

Everything is real: Stripe-signed webhooks into the HTTP app (uvicorn, in this process so
its clock can be moved), the relay publishing to Redis, `dramatiq` worker processes applying
events and charging through the Stripe SDK against a local fake Stripe server, PostgreSQL.

The movable clock: the story starts fifteen days ago. The app's clock is moved step by
step; the periodic collector is run as an operator would, `credits run collect_payments
--as-of <moment>`, at each scheduled retry of the 1-3-7-14-day schedule.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from api.app import create_app
from domain import CreditPolicy
from infra.clock import FixedClock
from infra.db.tables import customers, dunning_cases, payment_attempts
from infra.settings import load_settings
from messages import JobCompleted, PaymentSucceeded
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import ROOT, InProcessServer, eventually, reconciliation
from tests.support.fake_stripe import event, invoice, signed

pytestmark = pytest.mark.slow

SECRET = "whsec_" + uuid.uuid4().hex
FRONT_TOKEN = "front-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
FRONT = {"Authorization": f"Bearer {FRONT_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
PLAN = {"price_basic": 10}
CREDITS_CLI = str(Path(sys.executable).with_name("credits"))


async def _true(value: bool) -> bool:
    return value


@pytest.fixture
def payment_env(stripe_env) -> dict[str, str]:
    return {
        **stripe_env,
        "STRIPE_PLAN_CREDITS": json.dumps(PLAN),
        "DUNNING_END_ACTION": "cancel_subscription",
    }


def collect_payments_as_of(env: dict[str, str], moment: datetime) -> None:
    """What an operator (or the scheduler, at that moment) does: enqueue the periodic collector."""
    subprocess.run(
        [CREDITS_CLI, "run", "collect_payments", "--as-of", moment.isoformat()],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )


async def deliver(http: httpx.AsyncClient, body: dict) -> dict:
    payload, headers = signed(body, SECRET)
    response = await http.post("/webhooks/stripe", content=payload, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def case_row(db, invoice_id: str):
    async with db.connect() as connection:
        return (
            await connection.execute(select(dunning_cases).where(dunning_cases.c.invoice_id == invoice_id))
        ).one_or_none()


async def finished_attempts(db, invoice_id: str) -> list:
    async with db.connect() as connection:
        rows = await connection.execute(
            select(payment_attempts)
            .join(dunning_cases, dunning_cases.c.id == payment_attempts.c.case_id)
            .where(dunning_cases.c.invoice_id == invoice_id, payment_attempts.c.finished_at.is_not(None))
            .order_by(payment_attempts.c.id)
        )
        return list(rows)


async def customer_row(db, customer_id: str):
    async with db.connect() as connection:
        return (await connection.execute(select(customers).where(customers.c.customer_id == customer_id))).one()


async def test_a_failed_payment_walks_the_whole_schedule_then_a_new_card_pays_it_once(
    db, pg_url, redis_url, payment_env, fake_stripe, start_workers
):
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=15)
    clock = FixedClock(start)
    customer, stripe_customer, invoice_id = "cust-walk", "cus_walk", "in_walk"

    # Before the story: a customer who bought 10 credits long ago and has used them all.
    policy = CreditPolicy()
    await handlers.apply_event(
        PaymentSucceeded(
            event_id="walk-first",
            occurred_at=start - timedelta(days=60),
            customer_id=customer,
            payment_id="in_first",
            credits=10,
        ),
        SqlUnitOfWork(db),
        policy,
    )
    await handlers.apply_event(
        JobCompleted(
            event_id="walk-job",
            occurred_at=start - timedelta(days=20),
            customer_id=customer,
            job_id="job-1",
            credits=10,
        ),
        SqlUnitOfWork(db),
        policy,
    )
    depleted_at = (await customer_row(db, customer)).credits_depleted_at
    assert depleted_at == start - timedelta(days=20)

    # Stripe's own first charge of this month's invoice failed; our four retries will be declined too.
    fake_stripe.add_invoice(
        invoice(invoice_id, stripe_customer, subscription="sub_walk", created=int(start.timestamp()))
    )
    fake_stripe.script(invoice_id, "soft_decline", "soft_decline", "soft_decline", "soft_decline")

    settings = load_settings(
        database_url=pg_url,
        redis_url=redis_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONT_TOKEN,
        stripe_webhook_secrets=SECRET,
        stripe_plan_credits=PLAN,
        event_max_age_days=36500,
    )
    start_workers(processes=1, threads=2, env=payment_env)
    async with (
        InProcessServer(create_app(settings, clock=clock)) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as http,
    ):
        linked = await deliver(
            http,
            event(
                "customer.created",
                {"id": stripe_customer, "object": "customer", "metadata": {"customer_id": customer}},
                created=int(start.timestamp()),
            ),
        )
        assert linked["outcome"] == "relayed"

        failed = invoice(invoice_id, stripe_customer, subscription="sub_walk", created=int(start.timestamp()))
        await deliver(http, event("invoice.payment_failed", failed, created=int(start.timestamp())))
        await eventually(lambda: _exists(case_row(db, invoice_id)), message="the dunning case to open")

        clock.move_to(start + timedelta(hours=2))
        notice = (await http.get(f"/api/customers/{customer}/notice", headers=FRONT)).json()
        assert notice["kind"] == "payment_failed"
        assert notice["attempts_left"] == 4
        assert datetime.fromisoformat(notice["next_retry_at"]) == start + timedelta(days=1)
        assert {a["type"] for a in notice["actions"]} == {"update_payment_method", "retry_payment"}
        assert (
            next(a["url"] for a in notice["actions"] if a["type"] == "update_payment_method")
            == failed["hosted_invoice_url"]
        )

        # Nothing is due before the first retry day.
        collect_payments_as_of(payment_env, start + timedelta(hours=23))
        await asyncio.sleep(1.0)
        assert fake_stripe.pay_requests(invoice_id) == []

        for number, day in enumerate((1, 3, 7, 14), start=1):
            moment = start + timedelta(days=day, minutes=1)
            collect_payments_as_of(payment_env, moment)
            await eventually(
                lambda number=number: _count(finished_attempts(db, invoice_id), number),
                timeout=30,
                message=f"scheduled attempt {number}",
            )
            case = await case_row(db, invoice_id)
            assert case.attempts_made == number
            assert case.last_decline_code == "insufficient_funds"
            clock.move_to(moment + timedelta(minutes=5))
            notice = (await http.get(f"/api/customers/{customer}/notice", headers=FRONT)).json()
            assert notice["kind"] == "payment_failed"
            assert notice["failure_reason"] == "Your card has insufficient funds."
            if number < 4:
                assert case.status == "retrying"
                assert case.next_retry_at == start + timedelta(days=(1, 3, 7, 14)[number])
                assert notice["attempts_left"] == 4 - number
            else:
                assert case.status == "past_due"
                assert case.next_retry_at is None
                assert notice["attempts_left"] == 0

        # Every scheduled attempt was one charge with a key of its own, derived from the invoice and attempt.
        keys = [request.idempotency_key for request in fake_stripe.pay_requests(invoice_id)]
        assert keys == [f"dunning:{invoice_id}:{n}" for n in (1, 2, 3, 4)]
        # The end action: the subscription is cancelled at Stripe, once.
        await eventually(lambda: _cancelled(case_row(db, invoice_id)), message="the subscription to be cancelled")
        assert fake_stripe.subscriptions["sub_walk"]["status"] == "canceled"
        assert len([r for r in fake_stripe.requests if r.method == "DELETE"]) == 1

        report = (await http.get("/api/admin/credits-report", headers=ADMIN, params={"days": 14})).json()
        [row] = [c for c in report["customers"] if c["customer_id"] == customer]
        assert (row["dunning_status"], row["attempts_made"], row["next_retry_at"], row["membership_status"]) == (
            "past_due",
            4,
            None,
            "cancelled",
        )

        # No more automatic retries, however late it gets.
        collect_payments_as_of(payment_env, datetime.now(UTC))
        await asyncio.sleep(1.0)
        assert len(fake_stripe.pay_requests(invoice_id)) == 4

        # The customer adds a new card as their default: charged at once, without a scheduled attempt.
        clock.move_to(start + timedelta(days=14, hours=3))
        fake_stripe.script(invoice_id, "succeed")
        updated = {
            "id": stripe_customer,
            "object": "customer",
            "metadata": {"customer_id": customer},
            "invoice_settings": {"default_payment_method": "pm_new"},
        }
        await deliver(
            http,
            event(
                "customer.updated",
                updated,
                previous_attributes={"invoice_settings": {"default_payment_method": "pm_old"}},
                created=int(clock.now().timestamp()),
            ),
        )
        await eventually(
            lambda: _status(case_row(db, invoice_id), "recovered"),
            timeout=30,
            message="the new card to pay the invoice",
        )

        account = await customer_row(db, customer)
        assert account.balance == 10
        assert account.credits_depleted_at is None
        attempts = await finished_attempts(db, invoice_id)
        assert [(a.kind, a.outcome) for a in attempts] == [("scheduled", "declined")] * 4 + [
            ("payment_method", "succeeded")
        ]
        assert (await case_row(db, invoice_id)).attempts_made == 4

        # Stripe then sends invoice.paid for the same invoice: the credits are not issued twice.
        await deliver(
            http, event("invoice.paid", fake_stripe.invoices[invoice_id], created=int(clock.now().timestamp()))
        )
        await asyncio.sleep(1.5)
        assert (await customer_row(db, customer)).balance == 10

        clock.move_to(start + timedelta(days=14, hours=4))
        notice = (await http.get(f"/api/customers/{customer}/notice", headers=FRONT)).json()
        assert notice["kind"] == "none"
        retry = await http.post(f"/api/customers/{customer}/payment-retry", headers=FRONT)
        assert retry.status_code == 409

    assert await reconciliation(db) == []


async def test_retry_now_charges_at_once_without_using_a_scheduled_attempt_and_is_rate_limited(
    db, pg_url, redis_url, payment_env, fake_stripe, start_workers
):
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    clock = FixedClock(start)
    customer, stripe_customer, invoice_id = "cust-retry", "cus_retry", "in_retry"
    fake_stripe.add_invoice(invoice(invoice_id, stripe_customer, created=int(start.timestamp())))
    fake_stripe.script(invoice_id, "soft_decline", "soft_decline", "soft_decline", "succeed")
    settings = load_settings(
        database_url=pg_url,
        redis_url=redis_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONT_TOKEN,
        stripe_webhook_secrets=SECRET,
        stripe_plan_credits=PLAN,
        event_max_age_days=36500,
    )
    start_workers(processes=1, threads=2, env=payment_env)
    async with (
        InProcessServer(create_app(settings, clock=clock)) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as http,
    ):
        assert (await http.post(f"/api/customers/{customer}/payment-retry", headers=FRONT)).status_code == 404
        await deliver(
            http,
            event(
                "customer.created",
                {"id": stripe_customer, "object": "customer", "metadata": {"customer_id": customer}},
                created=int(start.timestamp()),
            ),
        )

        await deliver(
            http,
            event(
                "invoice.payment_failed",
                invoice(invoice_id, stripe_customer, created=int(start.timestamp())),
                created=int(start.timestamp()),
            ),
        )
        await eventually(lambda: _exists(case_row(db, invoice_id)), message="the dunning case to open")

        for n in range(1, 4):
            clock.move_to(start + timedelta(minutes=10 * n))
            accepted = await http.post(f"/api/customers/{customer}/payment-retry", headers=FRONT)
            assert accepted.status_code == 202, accepted.text
            assert accepted.json() == {"attempts": 1}
            await eventually(
                lambda n=n: _count(finished_attempts(db, invoice_id), n),
                timeout=30,
                message=f"retry-now {n} to be charged",
            )

        case = await case_row(db, invoice_id)
        assert (case.status, case.attempts_made, case.next_retry_at) == ("retrying", 0, start + timedelta(days=1))

        clock.move_to(start + timedelta(minutes=40))
        limited = await http.post(f"/api/customers/{customer}/payment-retry", headers=FRONT)
        assert limited.status_code == 429
        # The first of the three left the one-hour window at start + 70 min: 30 minutes from now.
        assert int(limited.headers["Retry-After"]) == 30 * 60 + 1

        clock.move_to(start + timedelta(minutes=71))
        assert (await http.post(f"/api/customers/{customer}/payment-retry", headers=FRONT)).status_code == 202
        await eventually(
            lambda: _status(case_row(db, invoice_id), "recovered"), timeout=30, message="the fourth retry to pay"
        )
        assert (await customer_row(db, customer)).balance == 10
        assert len(fake_stripe.pay_requests(invoice_id)) == 4
        # Paid: nothing is owed any more.
        assert (await http.post(f"/api/customers/{customer}/payment-retry", headers=FRONT)).status_code == 409


async def _exists(row_coroutine) -> bool:
    return (await row_coroutine) is not None


async def _count(rows_coroutine, expected: int) -> bool:
    return len(await rows_coroutine) >= expected


async def _cancelled(row_coroutine) -> bool:
    return (await row_coroutine).subscription_cancelled_at is not None


async def _status(row_coroutine, expected: str) -> bool:
    row = await row_coroutine
    return row is not None and row.status == expected
