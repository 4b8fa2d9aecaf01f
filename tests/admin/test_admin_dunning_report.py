"""The admin's view of dunning: GET /api/admin/dunning-report lists every unpaid invoice (whatever
the customer's credits), and the credits report's membership status is past due when any unpaid
invoice of the customer is past due.

The app runs in process (httpx's ASGI transport) on the test database; the cases are made through
the service layer — failures, the end of the schedule, the end action against the fake Stripe —
exactly as the workers make them.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from api.app import create_app
from domain import CreditPolicy
from domain.dunning import DunningRules
from infra.settings import load_settings
from infra.stripe.client import StripeProvider
from messages import InvoiceVoided, JobCompleted, PaymentFailed, PaymentSucceeded
from service_layer import handlers, payments
from service_layer.handlers import Outcome
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support.fake_stripe import FakeStripe, invoice
from tests.support.web import ADMIN, ADMIN_TOKEN, FRONT, FRONTEND_TOKEN

UTC = UTC
POLICY = CreditPolicy()
RULES = DunningRules()
REPORT = "/api/admin/dunning-report"


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe() as server:
        yield server


@pytest.fixture
async def client(db):
    settings = load_settings(admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None)
    app = create_app(settings, db=db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
        yield http


async def apply(db, event) -> Outcome:
    return await handlers.apply_event(event, SqlUnitOfWork(db), POLICY, RULES)


async def failed(
    db,
    fake: FakeStripe,
    customer: str,
    invoice_id: str,
    at: datetime,
    decline_code: str,
    subscription: str | None = None,
) -> None:
    fake.add_invoice(invoice(invoice_id, f"cus_{customer}", subscription=subscription))
    event = PaymentFailed(
        event_id=f"evt_failed_{invoice_id}",
        occurred_at=at,
        customer_id=customer,
        invoice_id=invoice_id,
        decline_code=decline_code,
        subscription_id=subscription,
    )
    assert await apply(db, event) is Outcome.APPLIED


async def bought_and_spent(db, customer: str, credits: int, spent: int, at: datetime) -> None:
    await apply(
        db,
        PaymentSucceeded(
            event_id=f"evt_paid_{customer}",
            occurred_at=at,
            customer_id=customer,
            payment_id=f"in_paid_{customer}",
            credits=credits,
        ),
    )
    if spent:
        await apply(
            db,
            JobCompleted(
                event_id=f"evt_job_{customer}",
                occurred_at=at + timedelta(days=1),
                customer_id=customer,
                job_id=f"job_{customer}",
                credits=spent,
            ),
        )


async def report(client: httpx.AsyncClient, **params) -> dict:
    response = await client.get(REPORT, params=params, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


async def test_the_dunning_report_lists_every_unpaid_invoice_and_the_membership(db, client, fake):
    now = datetime.now(UTC)
    provider = StripeProvider(
        load_settings(stripe_api_key="sk_test_report", stripe_api_base=fake.url, stripe_timeout_seconds=2)
    )
    new_uow = lambda: SqlUnitOfWork(db)  # noqa: E731

    # A customer whose card was lost 20 days ago: past due when the schedule ended, then the end action cancelled the subscription.
    await bought_and_spent(db, "cx-cancelled", 5, 5, now - timedelta(days=40))
    await failed(
        db, fake, "cx-cancelled", "in_cancelled", now - timedelta(days=20), "lost_card", subscription="sub_cancelled"
    )
    assert await payments.schedule_due_retries(new_uow, now) == 0
    assert await payments.cancel_past_due_subscriptions(new_uow, provider, lambda: now) == 1
    assert fake.subscriptions["sub_cancelled"]["status"] == "canceled"

    # Past due, yet 50 credits left: not in the credits report, but it owes.
    await bought_and_spent(db, "cx-rich", 50, 0, now - timedelta(days=30))
    await failed(db, fake, "cx-rich", "in_rich", now - timedelta(days=16), "stolen_card")
    # Out of credits; an older invoice past due, a newer one still retrying.
    await bought_and_spent(db, "cx-mixed", 10, 10, now - timedelta(days=40))
    await failed(db, fake, "cx-mixed", "in_mixed_old", now - timedelta(days=15), "expired_card")
    await failed(db, fake, "cx-mixed", "in_mixed_new", now - timedelta(hours=1), "insufficient_funds")
    # Retrying only.
    await failed(db, fake, "cx-retrying", "in_retrying", now - timedelta(hours=2), "insufficient_funds")
    # Settled: paid, and voided.
    await failed(db, fake, "cx-paid", "in_paid_later", now - timedelta(days=3), "insufficient_funds")
    await apply(
        db,
        PaymentSucceeded(
            event_id="evt_paid_later",
            occurred_at=now - timedelta(days=2),
            customer_id="cx-paid",
            payment_id="in_paid_later",
            credits=7,
        ),
    )
    await failed(db, fake, "cx-void", "in_void", now - timedelta(days=4), "insufficient_funds")
    await apply(
        db,
        InvoiceVoided(
            event_id="evt_void", occurred_at=now - timedelta(days=3), customer_id="cx-void", invoice_id="in_void"
        ),
    )
    assert await payments.schedule_due_retries(new_uow, now) == 0  # in_rich and in_mixed_old: past due

    # Admin only.
    assert (await client.get(REPORT)).status_code == 401
    assert (await client.get(REPORT, headers=FRONT)).status_code == 401
    assert (await client.get(REPORT, params={"status": "bogus"}, headers=ADMIN)).status_code == 422

    everything = await report(client)
    assert (everything["total"], everything["limit"], everything["offset"], everything["next_offset"]) == (
        5,
        100,
        0,
        None,
    )
    rows = {row["invoice_id"]: row for row in everything["invoices"]}
    assert list(rows) == [
        "in_cancelled",
        "in_rich",
        "in_mixed_old",
        "in_retrying",
        "in_mixed_new",
    ]  # oldest failure first
    seen = {
        invoice_id: (
            row["customer_id"],
            row["dunning_status"],
            row["membership_status"],
            row["balance"],
            row["last_decline_code"],
        )
        for invoice_id, row in rows.items()
    }
    assert seen == {
        "in_cancelled": ("cx-cancelled", "past_due", "cancelled", 0, "lost_card"),
        "in_rich": ("cx-rich", "past_due", "past_due", 50, "stolen_card"),
        "in_mixed_old": ("cx-mixed", "past_due", "past_due", 0, "expired_card"),
        "in_retrying": ("cx-retrying", "retrying", "active", 0, "insufficient_funds"),
        "in_mixed_new": ("cx-mixed", "retrying", "past_due", 0, "insufficient_funds"),
    }
    assert datetime.fromisoformat(rows["in_rich"]["first_failed_at"]) == now - timedelta(days=16)
    assert rows["in_rich"]["next_retry_at"] is None and rows["in_rich"]["attempts_made"] == 0
    assert datetime.fromisoformat(rows["in_retrying"]["next_retry_at"]) == now - timedelta(hours=2) + timedelta(days=1)

    past_due = await report(client, status="past_due")
    assert past_due["total"] == 3
    assert [row["invoice_id"] for row in past_due["invoices"]] == ["in_cancelled", "in_rich", "in_mixed_old"]
    assert [row["invoice_id"] for row in (await report(client, status="recovered"))["invoices"]] == ["in_paid_later"]
    assert [row["invoice_id"] for row in (await report(client, status="closed"))["invoices"]] == ["in_void"]
    assert (await report(client, status="action_required"))["invoices"] == []

    # Paging walks the same list.
    pages, offset = [], 0
    while offset is not None:
        page = await report(client, limit=2, offset=offset)
        assert page["total"] == 5 and len(page["invoices"]) <= 2
        pages.append([row["invoice_id"] for row in page["invoices"]])
        offset = page["next_offset"]
    assert pages == [["in_cancelled", "in_rich"], ["in_mixed_old", "in_retrying"], ["in_mixed_new"]]
    assert (await report(client, status="past_due", limit=2, offset=2))["invoices"][0]["invoice_id"] == "in_mixed_old"

    # The credits report: only customers out of credits; membership from ANY unpaid invoice.
    credits = await client.get("/api/admin/credits-report", params={"days": 0}, headers=ADMIN)
    assert credits.status_code == 200, credits.text
    listed = {c["customer_id"]: c for c in credits.json()["customers"]}
    assert set(listed) == {"cx-cancelled", "cx-mixed"}  # cx-rich owes but has credits: only in the dunning report
    assert (listed["cx-mixed"]["dunning_status"], listed["cx-mixed"]["membership_status"]) == ("retrying", "past_due")
    assert (listed["cx-cancelled"]["dunning_status"], listed["cx-cancelled"]["membership_status"]) == (
        "past_due",
        "cancelled",
    )
