"""Collecting unpaid invoices: the service layer against real PostgreSQL, the real StripeProvider
against the local fake Stripe.

A failed payment opens a dunning case; due retries are requested once per number; a charge is
recorded once (attempt and case) and a payment issues its credits once, whoever reports it;
provider failures postpone the same attempt, which then reads the invoice before charging with
a new key; concurrent collectors and a crash between the provider's answer and our commit make
no second charge; "retry now" is limited; the end of the schedule cancels the subscription
once; the customer's notice says what is the matter.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from domain import CreditPolicy
from domain.dunning import DunningRules
from infra.db.tables import credit_lots, customers, dunning_cases, ledger_entries, payment_attempts, processed_events
from infra.settings import load_settings
from infra.stripe.client import StripeProvider
from messages import JobCompleted, PaymentActionRequired, PaymentFailed, PaymentMethodUpdated, PaymentSucceeded
from service_layer import handlers, payments
from service_layer.apply import Rules
from service_layer.errors import CustomerNotFound, NothingOwed, RetryLimited
from service_layer.handlers import Outcome
from service_layer.payments import ATTEMPT_LEASE, PROVIDER_BACKOFF, charge_key
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import reconciliation
from tests.support.fake_stripe import FakeStripe, invoice, mark_paid

UTC = UTC
PLAN_CREDITS = {"price_basic": 100}
RULES = DunningRules()
POLICY = CreditPolicy()
PORTAL = "https://billing.stripe.com/p/login/test_portal"
#: The first failure of every case; the simulated clock runs forward from it. Never before the
#: real time: a paid invoice's credits are issued at Stripe's (the fake's, real) paid_at.
T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=1)


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def clock(at: datetime):
    return lambda: at


@pytest.fixture
def fake() -> Iterator[FakeStripe]:
    with FakeStripe(timeout_delay=2) as server:
        yield server


@pytest.fixture
def provider(fake: FakeStripe) -> StripeProvider:
    return StripeProvider(
        load_settings(
            stripe_api_key="sk_test_collection",
            stripe_api_base=fake.url,
            stripe_plan_credits=PLAN_CREDITS,
            stripe_timeout_seconds=0.5,
        )
    )


# ---------------------------------------------------------------- helpers


def new_uow(db):
    return lambda: SqlUnitOfWork(db)


async def payment_failed(
    db,
    fake: FakeStripe,
    customer: str,
    invoice_id: str,
    at: datetime = T0,
    *,
    quantity: int = 1,
    subscription: str | None = None,
    hosted: bool = True,
    **failure,
) -> Outcome:
    """Stripe's first charge of a new invoice failed: the fake holds the open invoice, the ledger hears of it."""
    subscription = subscription or f"sub_{invoice_id}"
    body = fake.add_invoice(invoice(invoice_id, f"cus_{customer}", quantity=quantity, subscription=subscription))
    event = PaymentFailed(
        event_id=f"evt_failed_{invoice_id}_{at.timestamp()}",
        occurred_at=at,
        customer_id=customer,
        invoice_id=invoice_id,
        hosted_invoice_url=body["hosted_invoice_url"] if hosted else None,
        subscription_id=subscription,
        **failure,
    )
    return await handlers.apply_event(event, SqlUnitOfWork(db), POLICY, RULES)


async def schedule(db, at: datetime) -> int:
    return await payments.schedule_due_retries(new_uow(db), at)


async def charge(db, provider, at: datetime, attempt_ids: list[int] | None = None) -> payments.CollectionResult:
    return await payments.charge_pending(
        payments.Collector(new_uow(db), provider, clock(at), Rules(POLICY, RULES)), attempt_ids=attempt_ids
    )


async def case_row(db, invoice_id: str):
    async with db.connect() as connection:
        return (await connection.execute(select(dunning_cases).where(dunning_cases.c.invoice_id == invoice_id))).one()


async def attempt_rows(db, invoice_id: str) -> list:
    async with db.connect() as connection:
        query = (
            select(payment_attempts)
            .join(dunning_cases, dunning_cases.c.id == payment_attempts.c.case_id)
            .where(dunning_cases.c.invoice_id == invoice_id)
            .order_by(payment_attempts.c.id)
        )
        return list(await connection.execute(query))


async def lots_of(db, customer: str) -> list:
    async with db.connect() as connection:
        return list(
            await connection.execute(
                select(credit_lots).where(credit_lots.c.customer_id == customer).order_by(credit_lots.c.id)
            )
        )


async def customer_row(db, customer: str):
    async with db.connect() as connection:
        return (await connection.execute(select(customers).where(customers.c.customer_id == customer))).one()


async def issued_entries(db, customer: str) -> list:
    async with db.connect() as connection:
        query = (
            select(ledger_entries)
            .where(ledger_entries.c.customer_id == customer, ledger_entries.c.kind == "issued")
            .order_by(ledger_entries.c.id)
        )
        return list(await connection.execute(query))


async def give_credits(db, customer: str, credits: int, at: datetime, payment_id: str) -> None:
    event = PaymentSucceeded(
        event_id=f"evt_paid_{payment_id}", occurred_at=at, customer_id=customer, payment_id=payment_id, credits=credits
    )
    assert await handlers.apply_event(event, SqlUnitOfWork(db), POLICY, RULES) is Outcome.APPLIED


async def spend(db, customer: str, credits: int, at: datetime, job_id: str) -> None:
    event = JobCompleted(
        event_id=f"evt_job_{job_id}", occurred_at=at, customer_id=customer, job_id=job_id, credits=credits
    )
    assert await handlers.apply_event(event, SqlUnitOfWork(db), POLICY, RULES) is Outcome.APPLIED


async def depleted_customer(db, customer: str) -> None:
    """A customer who bought credits and spent every one."""
    await give_credits(db, customer, 10, T0 - timedelta(days=10), f"in_old_{customer}")
    await spend(db, customer, 10, T0 - timedelta(days=5), f"job_{customer}")
    row = await customer_row(db, customer)
    assert row.balance == 0 and row.credits_depleted_at == T0 - timedelta(days=5)


async def notice(db, customer: str, at: datetime) -> payments.LoginBanner:
    return await payments.login_banner(SqlUnitOfWork(db, read_only=True), customer, at, RULES, PORTAL)


async def claim(db, at: datetime) -> list:
    """What a worker does before calling the provider: lease the pending attempts."""
    async with SqlUnitOfWork(db) as uow:
        attempts = await uow.dunning.claim_attempts(at, ATTEMPT_LEASE, 100)
        await uow.commit()
    return attempts


# ---------------------------------------------------------------- opening a case and scheduling


async def test_a_failed_payment_opens_a_case_retried_one_day_later(db, fake):
    assert (
        await payment_failed(
            db, fake, "alice", "in_a1", decline_code="insufficient_funds", failure_message="Insufficient funds."
        )
        is Outcome.APPLIED
    )

    case = await case_row(db, "in_a1")
    assert case.customer_id == "alice"
    assert case.status == "retrying"
    assert case.first_failed_at == T0
    assert case.next_retry_at == T0 + timedelta(days=1)
    assert case.attempts_made == 0
    assert case.last_decline_code == "insufficient_funds"
    assert case.last_failure_message == "Insufficient funds."
    assert case.hosted_invoice_url == "https://invoice.stripe.com/i/acct_1/in_a1"
    assert case.subscription_id == "sub_in_a1"
    assert await attempt_rows(db, "in_a1") == []
    assert (await customer_row(db, "alice")).balance == 0
    assert fake.requests == []  # opening a case charges nothing


async def test_a_due_retry_is_requested_once_and_not_before_it_is_due(db, fake):
    await payment_failed(db, fake, "bob", "in_b1")

    assert await schedule(db, day(1) - timedelta(seconds=1)) == 0
    assert await attempt_rows(db, "in_b1") == []

    assert await schedule(db, day(1)) == 1
    assert await schedule(db, day(1) + timedelta(minutes=5)) == 0  # the same number: not again
    # Two collectors at once: still one attempt 1.
    assert await asyncio.gather(
        schedule(db, day(1) + timedelta(minutes=6)), schedule(db, day(1) + timedelta(minutes=6))
    ) == [0, 0]

    [attempt] = await attempt_rows(db, "in_b1")
    assert attempt.kind == "scheduled"
    assert attempt.number == 1
    assert attempt.idempotency_key == "dunning:in_b1:1"
    assert attempt.requested_at == day(1)
    assert attempt.finished_at is None and attempt.outcome is None and attempt.leased_until is None
    assert fake.requests == []  # requesting does not charge


# ---------------------------------------------------------------- outcomes of a charge


async def test_a_soft_decline_is_recorded_and_the_next_retry_is_three_days_after_the_first_failure(db, fake, provider):
    await payment_failed(db, fake, "carol", "in_c1")
    fake.script("in_c1", "soft_decline")
    assert await schedule(db, day(1)) == 1
    charged_at = day(1) + timedelta(minutes=1)

    result = await charge(db, provider, charged_at)

    assert result.charged == {"declined": 1} and result.postponed == 0
    [attempt] = await attempt_rows(db, "in_c1")
    assert attempt.outcome == "declined"
    assert attempt.decline_code == "insufficient_funds"
    assert attempt.failure_message == "Your card has insufficient funds."
    assert attempt.finished_at == charged_at
    assert attempt.leased_until is None
    assert attempt.provider_errors == 0
    case = await case_row(db, "in_c1")
    assert case.status == "retrying"
    assert case.attempts_made == 1
    assert case.next_retry_at == T0 + timedelta(days=3)
    assert case.last_decline_code == "insufficient_funds"
    assert case.last_failure_at == charged_at
    [request] = fake.pay_requests("in_c1")
    assert request.idempotency_key == "dunning:in_c1:1"
    assert await lots_of(db, "carol") == []

    # Nothing is due before day 3; then attempt number 2.
    assert await schedule(db, day(3) - timedelta(seconds=1)) == 0
    assert await schedule(db, day(3)) == 1
    assert [(a.number, a.idempotency_key) for a in await attempt_rows(db, "in_c1")] == [
        (1, "dunning:in_c1:1"),
        (2, "dunning:in_c1:2"),
    ]


async def test_a_successful_charge_issues_the_plan_credits_once_and_ends_the_case(db, fake, provider):
    await depleted_customer(db, "dave")
    await payment_failed(db, fake, "dave", "in_d1", quantity=2)
    assert await schedule(db, day(1)) == 1

    result = await charge(db, provider, day(1) + timedelta(minutes=1))

    assert result.charged == {"succeeded": 1}
    [attempt] = await attempt_rows(db, "in_d1")
    assert attempt.outcome == "succeeded" and attempt.finished_at == day(1) + timedelta(minutes=1)
    [lot] = [lot for lot in await lots_of(db, "dave") if lot.payment_id == "in_d1"]
    assert lot.amount == 200 and lot.remaining == 200  # 100 per unit × 2
    assert lot.source == "payment"
    case = await case_row(db, "in_d1")
    assert case.status == "recovered"
    assert case.closed_at is not None
    assert case.next_retry_at is None
    customer = await customer_row(db, "dave")
    assert customer.balance == 200
    assert customer.credits_depleted_at is None

    # Stripe's invoice.paid webhook for the same invoice, relayed as its own event: nothing more.
    webhook = PaymentSucceeded(
        event_id="evt_stripe_invoice_paid_in_d1",
        occurred_at=day(1) + timedelta(minutes=2),
        customer_id="dave",
        payment_id="in_d1",
        credits=200,
        amount_cents=4900,
        currency="USD",
    )
    assert await handlers.apply_event(webhook, SqlUnitOfWork(db), POLICY, RULES) is Outcome.IGNORED

    assert len([lot for lot in await lots_of(db, "dave") if lot.payment_id == "in_d1"]) == 1
    assert [(e.credits, e.event_id) for e in await issued_entries(db, "dave") if e.note == "payment in_d1"] == [
        (200, "charge:dunning:in_d1:1")
    ]
    assert (await customer_row(db, "dave")).balance == 200
    assert (await case_row(db, "in_d1")).status == "recovered"
    async with db.connect() as connection:
        recorded = set(
            (
                await connection.execute(
                    select(processed_events.c.event_id).where(processed_events.c.customer_id == "dave")
                )
            ).scalars()
        )
    assert {"charge:dunning:in_d1:1", "evt_stripe_invoice_paid_in_d1"} <= recorded
    # Nothing is scheduled or charged again.
    assert await schedule(db, day(30)) == 0
    assert (await charge(db, provider, day(30))).charged == {}
    assert len(fake.pay_requests("in_d1")) == 1
    assert await reconciliation(db) == []


async def test_a_hard_decline_needs_a_payment_method_and_stops_the_schedule(db, fake, provider):
    await payment_failed(db, fake, "erin", "in_e1")
    fake.script("in_e1", "hard_decline")
    assert await schedule(db, day(1)) == 1

    assert (await charge(db, provider, day(1))).charged == {"declined": 1}

    case = await case_row(db, "in_e1")
    assert case.status == "needs_payment_method"
    assert case.next_retry_at is None
    assert case.last_decline_code == "lost_card"
    [attempt] = await attempt_rows(db, "in_e1")
    assert attempt.outcome == "declined" and attempt.decline_code == "lost_card"
    assert await schedule(db, day(15)) == 0
    assert await schedule(db, day(400)) == 0
    assert len(await attempt_rows(db, "in_e1")) == 1
    assert len(fake.pay_requests("in_e1")) == 1


async def test_a_server_error_postpones_the_attempt_and_the_retry_reads_the_invoice_with_a_new_key(db, fake, provider):
    await payment_failed(db, fake, "frank", "in_f1")
    fake.script("in_f1", "server_error", "succeed")
    assert await schedule(db, day(1)) == 1
    first_try = day(1) + timedelta(minutes=1)

    result = await charge(db, provider, first_try)

    assert result.postponed == 1 and result.charged == {}
    [attempt] = await attempt_rows(db, "in_f1")
    assert attempt.finished_at is None and attempt.outcome is None
    assert attempt.provider_errors == 1
    assert attempt.leased_until == first_try + PROVIDER_BACKOFF
    assert attempt.leased_until > first_try
    assert "APIError" in attempt.failure_message
    case = await case_row(db, "in_f1")
    assert case.status == "retrying" and case.attempts_made == 0  # a provider error is no decline

    # Before the back-off ends no collector takes it.
    assert await charge(db, provider, first_try + timedelta(seconds=30)) == payments.CollectionResult()
    assert len(fake.pay_requests("in_f1")) == 1

    second_try = first_try + PROVIDER_BACKOFF
    assert (await charge(db, provider, second_try)).charged == {"succeeded": 1}

    invoice_calls = [(r.method, r.path, r.idempotency_key) for r in fake.requests if "/in_f1" in r.path]
    # The first retry reads the invoice first (was Stripe's own charge a hard decline?), and so
    # does the try after a provider error (did the failed call pay it after all?).
    assert [call[:2] for call in invoice_calls] == [
        ("GET", "/v1/invoices/in_f1"),
        ("POST", "/v1/invoices/in_f1/pay"),
    ] * 2
    assert [call[2] for call in invoice_calls if call[0] == "POST"] == ["dunning:in_f1:1", "dunning:in_f1:1:retry-1"]
    [attempt] = await attempt_rows(db, "in_f1")
    assert attempt.outcome == "succeeded" and attempt.finished_at == second_try and attempt.provider_errors == 1
    assert [lot.amount for lot in await lots_of(db, "frank")] == [100]
    assert (await case_row(db, "in_f1")).status == "recovered"


async def test_after_a_timeout_the_retry_finds_the_invoice_paid_and_charges_nothing_more(db, fake, provider):
    await payment_failed(db, fake, "gina", "in_g1")
    fake.script("in_g1", "timeout")
    assert await schedule(db, day(1)) == 1

    assert (await charge(db, provider, day(1))).postponed == 1
    assert fake.invoices["in_g1"]["status"] == "paid"  # the charge went through; its answer was lost
    assert (await case_row(db, "in_g1")).status == "retrying"
    assert await lots_of(db, "gina") == []

    assert (await charge(db, provider, day(1) + PROVIDER_BACKOFF)).charged == {"succeeded": 1}

    assert len(fake.pay_requests("in_g1")) == 1
    assert [lot.amount for lot in await lots_of(db, "gina")] == [100]
    assert (await case_row(db, "in_g1")).status == "recovered"


async def test_an_invoice_paid_on_the_hosted_page_after_a_server_error_is_recorded_without_a_charge(db, fake, provider):
    await payment_failed(db, fake, "hank", "in_h1")
    fake.script("in_h1", "server_error")
    assert await schedule(db, day(1)) == 1
    assert (await charge(db, provider, day(1))).postponed == 1
    mark_paid(fake.invoices["in_h1"])  # the customer paid it themselves meanwhile

    assert (await charge(db, provider, day(1) + timedelta(minutes=2))).charged == {"succeeded": 1}

    assert len(fake.pay_requests("in_h1")) == 1  # only the failed one
    assert [lot.amount for lot in await lots_of(db, "hank")] == [100]
    assert (await case_row(db, "in_h1")).status == "recovered"


# ---------------------------------------------------------------- concurrency and crashes


async def test_concurrent_collectors_charge_a_pending_attempt_once(db, fake, provider):
    await payment_failed(db, fake, "ivan", "in_i1")
    assert await schedule(db, day(1)) == 1

    results = await asyncio.gather(*(charge(db, provider, day(1)) for _ in range(4)))

    assert sum(r.charged.get("succeeded", 0) for r in results) == 1
    assert len(fake.pay_requests("in_i1")) == 1
    [attempt] = await attempt_rows(db, "in_i1")
    assert attempt.outcome == "succeeded"
    assert [lot.amount for lot in await lots_of(db, "ivan")] == [100]
    assert (await customer_row(db, "ivan")).balance == 100
    assert await reconciliation(db) == []


async def test_a_crash_between_the_answer_and_the_record_repeats_the_same_key_and_records_once(db, fake, provider):
    await payment_failed(db, fake, "judy", "in_j1")
    assert await schedule(db, day(1)) == 1
    crashed_at = day(1)

    # A worker leases the attempt, the provider charges it ... and the worker dies before recording.
    [leased] = await claim(db, crashed_at)
    answer = await provider.pay_invoice(leased.invoice_id, leased.customer_id, charge_key(leased))
    assert answer.outcome.value == "succeeded"
    assert (await attempt_rows(db, "in_j1"))[0].finished_at is None
    assert await lots_of(db, "judy") == []

    # While its lease lasts nobody else takes it.
    assert await charge(db, provider, crashed_at + ATTEMPT_LEASE - timedelta(seconds=1)) == payments.CollectionResult()
    assert len(fake.pay_requests("in_j1")) == 1

    # After the lease, another collector takes it again: the first retry reads the invoice
    # before charging, finds it paid, and records that without a second charge.
    assert (await charge(db, provider, crashed_at + ATTEMPT_LEASE + timedelta(seconds=1))).charged == {"succeeded": 1}

    calls = [(r.method, r.idempotency_key) for r in fake.requests if "/in_j1" in r.path]
    assert calls == [("POST", "dunning:in_j1:1"), ("GET", None)]
    [attempt] = await attempt_rows(db, "in_j1")
    assert attempt.outcome == "succeeded" and attempt.provider_errors == 0
    assert [lot.amount for lot in await lots_of(db, "judy")] == [100]

    # The first worker was only slow, not dead, and records its answer late: nothing more.
    await payments.record_charge(new_uow(db), leased, answer, crashed_at + timedelta(minutes=7), Rules(POLICY, RULES))
    assert [lot.amount for lot in await lots_of(db, "judy")] == [100]
    assert len(await issued_entries(db, "judy")) == 1
    assert (await attempt_rows(db, "in_j1"))[0].finished_at == crashed_at + ATTEMPT_LEASE + timedelta(seconds=1)
    assert await reconciliation(db) == []


async def test_a_crash_after_a_decline_records_the_replayed_decline_once(db, fake, provider):
    await payment_failed(db, fake, "kate", "in_k1")
    fake.script("in_k1", "soft_decline", "succeed")
    assert await schedule(db, day(1)) == 1

    [leased] = await claim(db, day(1))
    await provider.pay_invoice(leased.invoice_id, leased.customer_id, charge_key(leased))
    assert (await charge(db, provider, day(1) + ATTEMPT_LEASE)).charged == {"declined": 1}

    # The replayed decline, not a new charge (which the script would have let succeed).
    assert fake.invoices["in_k1"]["status"] == "open"
    assert [r.idempotency_key for r in fake.pay_requests("in_k1")] == ["dunning:in_k1:1", "dunning:in_k1:1"]
    case = await case_row(db, "in_k1")
    assert case.attempts_made == 1 and case.next_retry_at == day(3)
    assert await lots_of(db, "kate") == []


# ---------------------------------------------------------------- "retry now"


async def test_retry_now_with_nothing_owed_or_an_unknown_customer(db, fake):
    with pytest.raises(CustomerNotFound):
        await payments.request_retry_now(new_uow(db), "nobody", T0, RULES)
    await give_credits(db, "liam", 50, T0, "in_liam_paid")
    with pytest.raises(NothingOwed):
        await payments.request_retry_now(new_uow(db), "liam", T0, RULES)
    async with db.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(payment_attempts))).scalar_one() == 0


async def test_retry_now_charges_at_once_without_using_up_a_scheduled_attempt(db, fake, provider):
    await payment_failed(db, fake, "mia", "in_m1")
    fake.script("in_m1", "soft_decline")
    asked = T0 + timedelta(hours=2)

    [attempt_id] = await payments.request_retry_now(new_uow(db), "mia", asked, RULES)
    result = await charge(db, provider, asked, attempt_ids=[attempt_id])

    assert result.charged == {"declined": 1}
    [attempt] = await attempt_rows(db, "in_m1")
    assert attempt.id == attempt_id
    assert attempt.kind == "customer" and attempt.number is None
    assert attempt.idempotency_key == "dunning:in_m1:customer:1"
    assert attempt.outcome == "declined" and attempt.finished_at == asked
    case = await case_row(db, "in_m1")
    assert case.attempts_made == 0  # the schedule is untouched
    assert case.next_retry_at == day(1)
    assert case.status == "retrying"
    assert case.last_decline_code == "insufficient_funds"

    # The scheduled attempt 1 still comes on day 1.
    assert await schedule(db, day(1)) == 1
    assert [(a.kind, a.number) for a in await attempt_rows(db, "in_m1")] == [("customer", None), ("scheduled", 1)]
    assert [r.idempotency_key for r in fake.pay_requests("in_m1")] == ["dunning:in_m1:customer:1"]


async def test_retry_now_is_limited_to_three_an_hour(db, fake):
    await payment_failed(db, fake, "noah", "in_n1")
    first = T0 + timedelta(hours=1)

    for minute in range(3):
        assert len(await payments.request_retry_now(new_uow(db), "noah", first + timedelta(minutes=minute), RULES)) == 1
    with pytest.raises(RetryLimited) as limited:
        await payments.request_retry_now(new_uow(db), "noah", first + timedelta(minutes=10), RULES)

    assert limited.value.retry_after == timedelta(minutes=50)  # when the first of the three leaves the hour
    attempts = await attempt_rows(db, "in_n1")
    assert [a.idempotency_key for a in attempts] == [f"dunning:in_n1:customer:{n}" for n in (1, 2, 3)]
    assert all(a.number is None for a in attempts)
    assert (await case_row(db, "in_n1")).attempts_made == 0

    # Once the first one is an hour old, one more is allowed.
    assert len(await payments.request_retry_now(new_uow(db), "noah", first + timedelta(hours=1, seconds=1), RULES)) == 1


# ---------------------------------------------------------------- the end of the schedule


async def test_the_exhausted_schedule_cancels_the_subscription_once(db, fake, provider):
    await payment_failed(db, fake, "olga", "in_o1", subscription="sub_olga")
    fake.script("in_o1", *["soft_decline"] * 4)

    for number, retry_day in enumerate(RULES.schedule.days, start=1):
        assert await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(day(retry_day))) == 0
        assert await schedule(db, day(retry_day)) == 1
        assert (await charge(db, provider, day(retry_day))).charged == {"declined": 1}
        assert (await case_row(db, "in_o1")).attempts_made == number

    case = await case_row(db, "in_o1")
    assert case.status == "past_due"
    assert case.next_retry_at is None
    assert await schedule(db, day(60)) == 0
    assert fake.subscriptions["sub_olga"]["status"] == "active"

    ended = day(14) + timedelta(minutes=5)
    assert await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(ended)) == 1

    assert fake.subscriptions["sub_olga"]["status"] == "canceled"
    [cancel] = [r for r in fake.requests if r.path == "/v1/subscriptions/sub_olga"]
    assert cancel.method == "DELETE" and cancel.idempotency_key == "dunning-cancel:in_o1"
    case = await case_row(db, "in_o1")
    assert case.subscription_cancelled_at == ended
    assert case.status == "past_due"

    # Once.
    assert await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(ended + timedelta(hours=1))) == 0
    assert len([r for r in fake.requests if r.path.startswith("/v1/subscriptions/")]) == 1
    assert (await case_row(db, "in_o1")).subscription_cancelled_at == ended
    assert len(fake.pay_requests("in_o1")) == 4


async def test_a_cancellation_the_provider_cannot_make_is_tried_again_later(db, fake, provider):
    await payment_failed(db, fake, "otto", "in_ot1", subscription="sub_otto")
    fake.script("in_ot1", *["soft_decline"] * 4)
    for retry_day in RULES.schedule.days:
        await schedule(db, day(retry_day))
        await charge(db, provider, day(retry_day))
    assert (await case_row(db, "in_ot1")).status == "past_due"
    unauthorised = StripeProvider(
        load_settings(stripe_api_key="pk_test_wrong", stripe_api_base=fake.url, stripe_timeout_seconds=0.5)
    )

    assert await payments.cancel_past_due_subscriptions(new_uow(db), unauthorised, clock(day(15))) == 0
    assert (await case_row(db, "in_ot1")).subscription_cancelled_at is None
    assert fake.subscriptions["sub_otto"]["status"] == "active"

    assert await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(day(16))) == 1
    assert (await case_row(db, "in_ot1")).subscription_cancelled_at == day(16)
    assert fake.subscriptions["sub_otto"]["status"] == "canceled"


# ---------------------------------------------------------------- the customer's notice


async def test_notice_after_a_failed_payment(db, fake, provider):
    await payment_failed(db, fake, "pia", "in_p1")
    fake.script("in_p1", "soft_decline")
    assert await schedule(db, day(1)) == 1
    await charge(db, provider, day(1))

    found = await notice(db, "pia", day(1) + timedelta(hours=1))

    assert found.kind == "payment_failed"
    assert found.next_retry_at == day(3)
    assert found.attempts_left == 3
    assert found.failure_reason == "Your card has insufficient funds."
    assert found.decline_code == "insufficient_funds"
    assert found.payment_url == "https://invoice.stripe.com/i/acct_1/in_p1"
    assert found.can_retry is True
    assert day(3).strftime("%B %-d") in found.message


async def test_notice_without_a_hosted_page_points_at_the_billing_portal(db, fake):
    await payment_failed(db, fake, "quinn", "in_q1", hosted=False, decline_code="insufficient_funds")

    found = await notice(db, "quinn", T0)

    assert found.kind == "payment_failed"
    assert found.payment_url == PORTAL
    assert found.attempts_left == 4
    assert found.next_retry_at == day(1)
    assert found.failure_reason == "declined (insufficient_funds)"


async def test_notice_after_an_action_required_decline(db, fake, provider):
    await payment_failed(db, fake, "rosa", "in_r1")
    fake.script("in_r1", "action_required")
    assert await schedule(db, day(1)) == 1
    assert (await charge(db, provider, day(1))).charged == {"action_required": 1}

    case = await case_row(db, "in_r1")
    assert case.status == "action_required" and case.next_retry_at is None
    assert await schedule(db, day(10)) == 0

    found = await notice(db, "rosa", day(1) + timedelta(hours=1))

    assert found.kind == "action_required"
    assert found.payment_url == "https://invoice.stripe.com/i/acct_1/in_r1"
    assert found.decline_code == "authentication_required"
    assert found.failure_reason == "This payment requires authentication."
    assert found.can_retry is False

    # Still unconfirmed when the schedule ends (day 14): past due like an exhausted schedule.
    assert await schedule(db, day(13)) == 0
    assert (await case_row(db, "in_r1")).status == "action_required"
    assert await schedule(db, day(14)) == 0
    assert (await case_row(db, "in_r1")).status == "past_due"


async def test_notice_after_a_hard_decline_asks_for_a_new_payment_method(db, fake, provider):
    await payment_failed(db, fake, "sam", "in_s1")
    fake.script("in_s1", "hard_decline")
    assert await schedule(db, day(1)) == 1
    await charge(db, provider, day(1))

    found = await notice(db, "sam", day(2))

    assert found.kind == "payment_failed"
    assert found.attempts_left == 0
    assert found.next_retry_at is None
    assert found.decline_code == "lost_card"
    assert "payment method" in found.message


async def test_notice_no_credits_none_and_unknown(db, fake, provider):
    await depleted_customer(db, "tara")
    assert (await notice(db, "tara", T0)).kind == "no_credits"
    assert (await notice(db, "tara", T0)).payment_url == PORTAL

    await give_credits(db, "uma", 30, T0 - timedelta(days=1), "in_uma_paid")
    quiet = await notice(db, "uma", T0)
    assert quiet.kind == "none" and quiet.payment_url is None and quiet.next_retry_at is None

    with pytest.raises(CustomerNotFound):
        await notice(db, "nobody-at-all", T0)

    # A depleted customer whose failed invoice is then collected: no notice any more.
    await payment_failed(db, fake, "tara", "in_t1")
    assert (await notice(db, "tara", T0)).kind == "payment_failed"
    assert await schedule(db, day(1)) == 1
    await charge(db, provider, day(1))
    assert (await notice(db, "tara", day(1) + timedelta(minutes=1))).kind == "none"


async def test_an_action_required_event_then_our_charge_succeeding_clears_the_notice(db, fake, provider):
    await payment_failed(db, fake, "vera", "in_v1")
    required = PaymentActionRequired(
        event_id="evt_action_in_v1",
        occurred_at=T0 + timedelta(hours=1),
        customer_id="vera",
        invoice_id="in_v1",
        hosted_invoice_url="https://invoice.stripe.com/i/acct_1/in_v1",
    )
    assert await handlers.apply_event(required, SqlUnitOfWork(db), POLICY, RULES) is Outcome.APPLIED
    assert (await notice(db, "vera", T0 + timedelta(hours=2))).kind == "action_required"
    assert await schedule(db, day(30)) == 0  # no automatic retry while the customer must act

    # The customer confirmed on the hosted page, then pressed "retry now".
    [attempt_id] = await payments.request_retry_now(new_uow(db), "vera", T0 + timedelta(hours=3), RULES)
    assert (await charge(db, provider, T0 + timedelta(hours=3), attempt_ids=[attempt_id])).charged == {"succeeded": 1}

    assert (await case_row(db, "in_v1")).status == "recovered"
    assert (await notice(db, "vera", T0 + timedelta(hours=4))).kind == "none"
    assert [lot.amount for lot in await lots_of(db, "vera")] == [100]


# ---------------------------------------------------------------- invoices settled elsewhere


async def test_a_voided_invoice_closes_the_case(db, fake, provider):
    await payment_failed(db, fake, "walt", "in_w1")
    fake.invoices["in_w1"]["status"] = "void"
    assert await schedule(db, day(1)) == 1

    assert (await charge(db, provider, day(1))).charged == {"closed": 1}

    case = await case_row(db, "in_w1")
    assert case.status == "closed"
    assert case.closed_at == day(1)
    assert case.next_retry_at is None
    assert case.last_failure_message == "invoice is void"
    [attempt] = await attempt_rows(db, "in_w1")
    assert attempt.outcome == "closed"
    assert await lots_of(db, "walt") == []
    assert await schedule(db, day(20)) == 0
    assert await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(day(20))) == 0
    with pytest.raises(NothingOwed):
        await payments.request_retry_now(new_uow(db), "walt", day(2), RULES)


async def test_a_paid_invoice_with_unknown_credits_ends_the_case_and_issues_nothing(db, fake, provider):
    await payment_failed(db, fake, "xena", "in_x1")
    fake.invoices["in_x1"]["lines"]["data"][0]["pricing"]["price_details"]["price"] = "price_not_in_the_plan"
    assert await schedule(db, day(1)) == 1

    assert (await charge(db, provider, day(1))).charged == {"succeeded": 1}

    assert fake.invoices["in_x1"]["status"] == "paid"
    assert (await case_row(db, "in_x1")).status == "recovered"
    assert await lots_of(db, "xena") == []  # left to the parked invoice.paid webhook


async def test_an_attempt_whose_invoice_was_paid_meanwhile_is_closed_without_a_charge(db, fake, provider):
    await payment_failed(db, fake, "yuri", "in_y1")
    assert await schedule(db, day(1)) == 1
    # Stripe's own retry paid it, and its webhook arrived before our collector ran.
    await give_credits(db, "yuri", 100, day(1) - timedelta(minutes=1), "in_y1")
    assert (await case_row(db, "in_y1")).status == "recovered"

    assert (await charge(db, provider, day(1))).charged == {"closed": 1}

    assert fake.pay_requests("in_y1") == []
    [attempt] = await attempt_rows(db, "in_y1")
    assert attempt.outcome == "closed" and attempt.failure_message == "nothing owed any more"
    assert [lot.amount for lot in await lots_of(db, "yuri")] == [100]
    assert (await case_row(db, "in_y1")).status == "recovered"


async def test_the_webhook_issuing_first_and_our_charge_recording_later_issue_once(db, fake, provider):
    await payment_failed(db, fake, "zoe", "in_z1")
    assert await schedule(db, day(1)) == 1
    [leased] = await claim(db, day(1))
    answer = await provider.pay_invoice(leased.invoice_id, leased.customer_id, charge_key(leased))
    # The invoice.paid webhook overtakes our own recording.
    await give_credits(db, "zoe", answer.paid.credits, answer.paid.paid_at, "in_z1")

    await payments.record_charge(new_uow(db), leased, answer, day(1), Rules(POLICY, RULES))

    [attempt] = await attempt_rows(db, "in_z1")
    assert attempt.outcome == "succeeded"
    assert [lot.amount for lot in await lots_of(db, "zoe")] == [100]
    assert (await customer_row(db, "zoe")).balance == 100
    assert (await case_row(db, "in_z1")).status == "recovered"
    assert await reconciliation(db) == []


# ---------------------------------------------------------------- hard declines and attempts that cannot be recorded


async def test_a_postponed_scheduled_attempt_does_not_charge_a_card_hard_declined_meanwhile(db, fake, provider):
    """Automatic retries stop at a hard decline (domain/dunning.py) — also one requested before it.

    Scheduled attempt 1 meets a Stripe 500 and is postponed; meanwhile the customer's "retry
    now" is hard-declined (lost card). When the back-off ends, the postponed scheduled attempt
    must not charge the lost card again.
    """
    await payment_failed(db, fake, "abe", "in_ab1")
    fake.script("in_ab1", "server_error", "hard_decline", "hard_decline")
    assert await schedule(db, day(1)) == 1
    assert (await charge(db, provider, day(1))).postponed == 1

    [customer_attempt] = await payments.request_retry_now(new_uow(db), "abe", day(1) + timedelta(seconds=10), RULES)
    assert (await charge(db, provider, day(1) + timedelta(seconds=10), attempt_ids=[customer_attempt])).charged == {
        "declined": 1
    }
    assert (await case_row(db, "in_ab1")).status == "needs_payment_method"
    charges_before = len(fake.pay_requests("in_ab1"))

    await charge(db, provider, day(1) + timedelta(minutes=5))

    assert len(fake.pay_requests("in_ab1")) == charges_before, (
        "the hard-declined card was charged again by an automatic retry"
    )
    case = await case_row(db, "in_ab1")
    assert case.status == "needs_payment_method"
    assert case.next_retry_at is None


async def test_one_attempt_that_cannot_be_recorded_does_not_stop_the_others(db, fake):
    """A paid invoice worth more credits than an event may carry (1,000,000) makes record_charge
    raise; the collector must still charge the other customers' attempts in its batch."""
    big = StripeProvider(
        load_settings(
            stripe_api_key="sk_test_collection",
            stripe_api_base=fake.url,
            stripe_plan_credits={"price_basic": 600_000},
            stripe_timeout_seconds=0.5,
        )
    )
    await payment_failed(db, fake, "bulk", "in_bulk", quantity=2)  # 1,200,000 credits
    await payment_failed(db, fake, "small", "in_small", at=T0 + timedelta(minutes=1))
    assert await schedule(db, day(1)) == 1
    assert await schedule(db, day(1) + timedelta(minutes=1)) == 1

    # Two collector runs, the second after every lease ran out.
    for at in (day(1) + timedelta(minutes=2), day(1) + timedelta(minutes=20)):
        with contextlib.suppress(ValidationError):  # the defect: one attempt's error aborts the batch
            await payments.charge_pending(payments.Collector(new_uow(db), big, clock(at), Rules(POLICY, RULES)))

    assert fake.invoices["in_bulk"]["status"] == "paid"
    assert len(fake.pay_requests("in_small")) == 1, "the other customer's due attempt was never charged"
    [attempt] = await attempt_rows(db, "in_small")
    assert attempt.outcome == "succeeded"


# ---------------------------------------------------------------- attempt numbering, Stripe's own decline, new cards, past due


def raw_requests(fake: FakeStripe) -> list[tuple[str, str]]:
    """Record each request's method and raw path with its query string (the fake keeps the path only)."""
    seen: list[tuple[str, str]] = []
    handle = fake._handle

    def recording(handler, method: str) -> None:
        seen.append((method, handler.path))
        handle(handler, method)

    fake._handle = recording
    return seen


def stripe_declined(
    fake: FakeStripe, invoice_id: str, decline_code: str, message: str = "Your card was declined."
) -> None:
    """The invoice's own (Stripe's) charge failed: its payments, expanded, carry the payment intent's last error."""
    fake.invoices[invoice_id]["payments"] = {
        "object": "list",
        "has_more": False,
        "data": [
            {
                "id": f"inpay_{invoice_id}",
                "object": "invoice_payment",
                "status": "open",
                "payment": {
                    "type": "payment_intent",
                    "payment_intent": {
                        "id": f"pi_{invoice_id}",
                        "object": "payment_intent",
                        "status": "requires_payment_method",
                        "last_payment_error": {
                            "type": "card_error",
                            "code": "card_declined",
                            "decline_code": decline_code,
                            "message": message,
                        },
                    },
                },
            }
        ],
    }


async def new_card(
    db, customer: str, at: datetime, payment_method_id: str | None, tag: str = ""
) -> tuple[Outcome, list[int]]:
    """A PaymentMethodUpdated as the relay publishes it. Returns the outcome and the attempts the worker would charge at once."""
    event = PaymentMethodUpdated(
        event_id=f"evt_pm_{customer}_{payment_method_id}_{at.timestamp()}{tag}",
        occurred_at=at,
        customer_id=customer,
        payment_method_id=payment_method_id,
    )
    uow = SqlUnitOfWork(db)
    outcome = await handlers.apply_event(event, uow, POLICY, RULES)
    return outcome, list(uow.dunning.new_attempt_ids)


def charged_with(request) -> list[str] | None:
    return request.form.get("payment_method")


async def test_after_a_skipped_scheduled_attempt_a_new_card_resumes_the_schedule_with_attempt_number_two(
    db, fake, provider
):
    """#1 postponed by a 500, a retry-now hard-declined, #1 closed uncharged, a new card soft-declined:
    retrying resumes a day after that decline, and the next scheduled attempt is number 2 — not a
    second number 1, whose key is taken (the case would never be retried again)."""
    await payment_failed(db, fake, "ada", "in_ad1", decline_code="insufficient_funds")
    fake.script("in_ad1", "server_error", "hard_decline", "soft_decline", "succeed")
    assert await schedule(db, day(1)) == 1
    assert (await charge(db, provider, day(1))).postponed == 1

    [pressed] = await payments.request_retry_now(new_uow(db), "ada", day(1) + timedelta(seconds=10), RULES)
    assert (await charge(db, provider, day(1) + timedelta(seconds=10), attempt_ids=[pressed])).charged == {
        "declined": 1
    }
    assert (await case_row(db, "in_ad1")).status == "needs_payment_method"
    calls_before = len(fake.requests)

    # The postponed scheduled attempt's back-off ends: closed, without reading or charging anything.
    assert (await charge(db, provider, day(1) + timedelta(minutes=5))).charged == {"closed": 1}
    assert len(fake.requests) == calls_before
    scheduled_one = (await attempt_rows(db, "in_ad1"))[0]
    assert (scheduled_one.kind, scheduled_one.number, scheduled_one.outcome) == ("scheduled", 1, "closed")
    assert scheduled_one.failure_message == "the schedule stopped: needs_payment_method"
    case = await case_row(db, "in_ad1")
    assert (case.status, case.attempts_made, case.next_retry_at) == ("needs_payment_method", 0, None)

    # A new card, soft-declined.
    outcome, at_once = await new_card(db, "ada", day(2), "pm_new")
    assert outcome is Outcome.APPLIED
    [card_attempt] = [a for a in await attempt_rows(db, "in_ad1") if a.kind == "payment_method"]
    assert at_once == [card_attempt.id]
    assert (card_attempt.payment_method_id, card_attempt.leased_until, card_attempt.number) == ("pm_new", None, None)
    declined_at = day(2) + timedelta(minutes=1)
    assert (await charge(db, provider, declined_at, attempt_ids=at_once)).charged == {"declined": 1}
    assert charged_with(fake.pay_requests("in_ad1")[-1]) == ["pm_new"]

    case = await case_row(db, "in_ad1")
    assert case.status == "retrying"
    assert case.next_retry_at >= declined_at + timedelta(days=1)
    assert case.next_retry_at == declined_at + timedelta(days=1)  # day 1 of the schedule is long past
    assert case.attempts_made == 0

    # When due, attempt number 2 is requested and charged (the invoice's default method).
    assert await schedule(db, case.next_retry_at - timedelta(seconds=1)) == 0
    assert await schedule(db, case.next_retry_at) == 1
    newest = (await attempt_rows(db, "in_ad1"))[-1]
    assert (newest.kind, newest.number, newest.idempotency_key) == ("scheduled", 2, "dunning:in_ad1:2")
    assert (await charge(db, provider, case.next_retry_at)).charged == {"succeeded": 1}

    last = fake.pay_requests("in_ad1")[-1]
    assert last.idempotency_key == "dunning:in_ad1:2"
    assert charged_with(last) is None
    assert len(fake.pay_requests("in_ad1")) == 4  # the 500, the retry-now, the new card, number 2
    case = await case_row(db, "in_ad1")
    assert (case.status, case.next_retry_at) == ("recovered", None)
    assert [lot.amount for lot in await lots_of(db, "ada")] == [100]
    assert await reconciliation(db) == []


@pytest.mark.parametrize(
    ("decline_code", "charged"),
    [("stolen_card", False), ("insufficient_funds", True)],
    ids=["hard-not-charged", "soft-charged"],
)
async def test_the_first_scheduled_attempt_reads_stripes_own_decline_first(db, fake, provider, decline_code, charged):
    """The payment_failed webhook carried no decline code; Stripe's payment intent has one."""
    await payment_failed(db, fake, "bea", "in_be1")
    stripe_declined(fake, "in_be1", decline_code)
    raw = raw_requests(fake)
    assert (await case_row(db, "in_be1")).last_decline_code is None
    assert await schedule(db, day(1)) == 1

    result = await charge(db, provider, day(1))

    method, path = raw[0]
    assert (method, urlparse(path).path) == ("GET", "/v1/invoices/in_be1")
    assert parse_qs(urlparse(path).query) == {"expand[0]": ["payments.data.payment.payment_intent"]}
    [attempt] = await attempt_rows(db, "in_be1")
    case = await case_row(db, "in_be1")
    if charged:
        assert result.charged == {"succeeded": 1}
        assert [r.idempotency_key for r in fake.pay_requests("in_be1")] == ["dunning:in_be1:1"]
        assert case.status == "recovered"
        return
    assert result.charged == {"declined": 1}
    assert fake.pay_requests("in_be1") == []
    assert [m for m, _ in raw] == ["GET"]
    assert (attempt.outcome, attempt.decline_code) == ("declined", "stolen_card")
    assert attempt.failure_message.startswith("not charged again")
    assert (case.status, case.next_retry_at, case.attempts_made, case.last_decline_code) == (
        "needs_payment_method",
        None,
        1,
        "stolen_card",
    )
    assert await schedule(db, day(3)) == 0
    assert fake.invoices["in_be1"]["status"] == "open"


async def test_a_new_card_is_charged_by_its_id_once_however_often_it_is_reported(db, fake, provider):
    await payment_failed(db, fake, "cal", "in_ca1", decline_code="lost_card")
    assert (await case_row(db, "in_ca1")).status == "needs_payment_method"
    fake.script("in_ca1", "soft_decline", "succeed")

    # payment_method.attached and customer.updated for the same card: one attempt.
    outcome, at_once = await new_card(db, "cal", T0 + timedelta(hours=1), "pm_new", tag="attached")
    assert outcome is Outcome.APPLIED and len(at_once) == 1
    again, none = await new_card(db, "cal", T0 + timedelta(hours=1, seconds=1), "pm_new", tag="updated")
    assert (again, none) == (Outcome.IGNORED, [])
    assert [(a.kind, a.payment_method_id) for a in await attempt_rows(db, "in_ca1")] == [("payment_method", "pm_new")]

    assert (await charge(db, provider, T0 + timedelta(hours=1), attempt_ids=at_once)).charged == {"declined": 1}
    [request] = fake.pay_requests("in_ca1")
    assert request.form.get("payment_method") == ["pm_new"]
    assert request.idempotency_key == "dunning:in_ca1:payment_method:1"

    # Reported once more after its charge finished: still not charged twice.
    late, none = await new_card(db, "cal", T0 + timedelta(hours=2), "pm_new", tag="late")
    assert (late, none) == (Outcome.IGNORED, [])
    assert len(await attempt_rows(db, "in_ca1")) == 1

    # Another card is another attempt, charged with that card.
    other, at_once = await new_card(db, "cal", T0 + timedelta(hours=3), "pm_other")
    assert other is Outcome.APPLIED and len(at_once) == 1
    assert (await charge(db, provider, T0 + timedelta(hours=3), attempt_ids=at_once)).charged == {"succeeded": 1}
    assert [charged_with(r) for r in fake.pay_requests("in_ca1")] == [["pm_new"], ["pm_other"]]
    assert (await case_row(db, "in_ca1")).status == "recovered"


async def test_a_new_card_over_the_retry_now_limit_is_charged_later_not_dropped(db, fake, provider):
    await payment_failed(db, fake, "dan", "in_da1")
    fake.script("in_da1", "soft_decline", "soft_decline", "soft_decline", "succeed")
    first_press = T0 + timedelta(hours=1)
    for minute in range(3):
        at = first_press + timedelta(minutes=minute)
        ids_ = await payments.request_retry_now(new_uow(db), "dan", at, RULES)
        assert (await charge(db, provider, at, attempt_ids=ids_)).charged == {"declined": 1}
    with pytest.raises(RetryLimited):
        await payments.request_retry_now(new_uow(db), "dan", first_press + timedelta(minutes=10), RULES)

    updated_at = first_press + timedelta(minutes=10)
    outcome, at_once = await new_card(db, "dan", updated_at, "pm_new")

    assert outcome is Outcome.APPLIED
    assert at_once == []  # not handed to a worker at once ...
    [delayed] = [a for a in await attempt_rows(db, "in_da1") if a.kind == "payment_method"]
    turn = first_press + RULES.retry_now.window  # ... but when the first press leaves the hour
    assert (delayed.payment_method_id, delayed.requested_at, delayed.leased_until, delayed.finished_at) == (
        "pm_new",
        updated_at,
        turn,
        None,
    )
    assert delayed.leased_until > updated_at

    assert await charge(db, provider, updated_at) == payments.CollectionResult()
    assert await charge(db, provider, turn - timedelta(seconds=1)) == payments.CollectionResult()
    assert len(fake.pay_requests("in_da1")) == 3

    assert (await charge(db, provider, turn)).charged == {"succeeded": 1}
    last = fake.pay_requests("in_da1")[-1]
    assert charged_with(last) == ["pm_new"]
    [done] = [a for a in await attempt_rows(db, "in_da1") if a.kind == "payment_method"]
    assert (done.outcome, done.finished_at) == ("succeeded", turn)
    assert (await case_row(db, "in_da1")).status == "recovered"
    assert [lot.amount for lot in await lots_of(db, "dan")] == [100]


async def test_a_new_card_charge_postponed_by_a_server_error_still_charges_the_new_card(db, fake, provider):
    """Stripe's own charge was hard-declined (lost card; its payment intent says so). The new card's
    charge meets a 500; after the back-off the same attempt reads the invoice first — and must not
    take the OLD card's hard decline as the answer for the NEW card."""
    await payment_failed(db, fake, "eve", "in_ev1", decline_code="lost_card")
    stripe_declined(fake, "in_ev1", "lost_card")
    fake.script("in_ev1", "server_error", "succeed")
    outcome, at_once = await new_card(db, "eve", T0 + timedelta(hours=1), "pm_new")
    assert outcome is Outcome.APPLIED
    assert (await charge(db, provider, T0 + timedelta(hours=1), attempt_ids=at_once)).postponed == 1

    result = await charge(db, provider, T0 + timedelta(hours=1) + PROVIDER_BACKOFF)

    assert [charged_with(r) for r in fake.pay_requests("in_ev1")] == [["pm_new"], ["pm_new"]], (
        f"the new card was not charged again after the 500 (result {result.charged}); "
        f"attempt: {[(a.outcome, a.decline_code, a.failure_message) for a in await attempt_rows(db, 'in_ev1')]}"
    )
    assert result.charged == {"succeeded": 1}
    assert (await case_row(db, "in_ev1")).status == "recovered"


async def exhaust(db, fake, provider, customer: str, invoice_id: str) -> None:
    await payment_failed(db, fake, customer, invoice_id, subscription=f"sub_{customer}")
    fake.script(invoice_id, *["soft_decline"] * 4)
    for retry_day in RULES.schedule.days:
        assert await schedule(db, day(retry_day)) == 1
        assert (await charge(db, provider, day(retry_day))).charged == {"declined": 1}
    assert (await case_row(db, invoice_id)).status == "past_due"


async def test_past_due_stays_past_due_after_a_later_hard_decline(db, fake, provider):
    await exhaust(db, fake, provider, "fay", "in_fa1")

    # Stripe reports a hard decline later (its own retry; a webhook relayed late).
    late = PaymentFailed(
        event_id="evt_late_fa1",
        occurred_at=day(14) + timedelta(hours=1),
        customer_id="fay",
        invoice_id="in_fa1",
        decline_code="lost_card",
        failure_message="lost",
    )
    assert await handlers.apply_event(late, SqlUnitOfWork(db), POLICY, RULES) is Outcome.APPLIED
    case = await case_row(db, "in_fa1")
    assert (case.status, case.next_retry_at, case.last_decline_code) == ("past_due", None, "lost_card")

    # The customer's own retry is hard-declined too.
    fake.script("in_fa1", "hard_decline")
    pressed = await payments.request_retry_now(new_uow(db), "fay", day(14) + timedelta(hours=2), RULES)
    assert (await charge(db, provider, day(14) + timedelta(hours=2), attempt_ids=pressed)).charged == {"declined": 1}
    assert (await case_row(db, "in_fa1")).status == "past_due"

    # So the end action still sees it.
    assert await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(day(15))) == 1
    assert fake.subscriptions["sub_fay"]["status"] == "canceled"
    assert (await case_row(db, "in_fa1")).status == "past_due"


async def stopped_by_a_hard_decline(db, fake, provider, customer: str, invoice_id: str) -> None:
    await payment_failed(db, fake, customer, invoice_id, subscription=f"sub_{customer}")
    fake.script(invoice_id, "hard_decline")
    assert await schedule(db, day(1)) == 1
    assert (await charge(db, provider, day(1))).charged == {"declined": 1}
    assert (await case_row(db, invoice_id)).status == "needs_payment_method"


async def test_a_case_stopped_by_a_hard_decline_is_past_due_when_the_schedule_ends_and_then_cancelled(
    db, fake, provider
):
    await stopped_by_a_hard_decline(db, fake, provider, "gus", "in_gu1")

    assert await schedule(db, day(14) - timedelta(seconds=1)) == 0
    assert (await case_row(db, "in_gu1")).status == "needs_payment_method"
    assert (
        await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(day(14) - timedelta(seconds=1))) == 0
    )
    assert fake.subscriptions["sub_gus"]["status"] == "active"

    assert await schedule(db, day(14)) == 0  # no attempt requested: only the status changes
    case = await case_row(db, "in_gu1")
    assert (case.status, case.next_retry_at, case.last_decline_code) == ("past_due", None, "lost_card")
    assert len(await attempt_rows(db, "in_gu1")) == 1

    assert (
        await payments.cancel_past_due_subscriptions(new_uow(db), provider, clock(day(14) + timedelta(minutes=1))) == 1
    )
    assert fake.subscriptions["sub_gus"]["status"] == "canceled"
    [cancel] = [r for r in fake.requests if r.path == "/v1/subscriptions/sub_gus"]
    assert (cancel.method, cancel.idempotency_key) == ("DELETE", "dunning-cancel:in_gu1")
    case = await case_row(db, "in_gu1")
    assert (case.status, case.subscription_cancelled_at) == ("past_due", day(14) + timedelta(minutes=1))
    assert len(fake.pay_requests("in_gu1")) == 1


async def test_a_case_past_due_by_the_calendar_stays_past_due_after_a_soft_declined_retry(db, fake, provider):
    """Past due is final until paid (domain/dunning.py `_stop`). A case that went past due because its
    schedule ended while stopped (hard decline on day 1, so attempts_made == 1) must not be put back
    to 'retrying' — with new scheduled charges after the schedule's end — by a soft-declined retry-now."""
    await stopped_by_a_hard_decline(db, fake, provider, "hal", "in_ha1")
    assert await schedule(db, day(14)) == 0
    assert (await case_row(db, "in_ha1")).status == "past_due"

    fake.script("in_ha1", "soft_decline")
    pressed = await payments.request_retry_now(new_uow(db), "hal", day(15), RULES)
    assert (await charge(db, provider, day(15), attempt_ids=pressed)).charged == {"declined": 1}

    case = await case_row(db, "in_ha1")
    assert (case.status, case.next_retry_at) == ("past_due", None), (
        f"a past-due case went back to {case.status!r}, next retry {case.next_retry_at}"
    )
    assert await schedule(db, day(30)) == 0


async def test_one_payment_issues_credits_to_one_customer_only(db, fake):
    await give_credits(db, "ivy", 100, T0, "in_shared")

    stolen = PaymentSucceeded(
        event_id="evt_paid_in_shared_jon",
        occurred_at=T0 + timedelta(minutes=1),
        customer_id="jon",
        payment_id="in_shared",
        credits=100,
    )
    with pytest.raises(IntegrityError, match="uq_credit_lots_payment"):
        await handlers.apply_event(stolen, SqlUnitOfWork(db), POLICY, RULES)

    assert [(lot.customer_id, lot.amount, lot.remaining) for lot in await lots_of(db, "ivy")] == [("ivy", 100, 100)]
    assert await lots_of(db, "jon") == []
    async with db.connect() as connection:
        assert (
            await connection.execute(
                select(func.count()).where(processed_events.c.event_id == "evt_paid_in_shared_jon")
            )
        ).scalar_one() == 0
        assert (
            await connection.execute(select(func.count()).where(customers.c.customer_id == "jon"))
        ).scalar_one() == 0
    assert (await customer_row(db, "ivy")).balance == 100
    assert await reconciliation(db) == []
