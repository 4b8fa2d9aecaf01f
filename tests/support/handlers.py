"""Shared by the fast handler tests: a store, its unit of work, events with defaults."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain import CreditPolicy
from messages import CreditsAdjusted, JobCompleted, PaymentSucceeded
from service_layer import events
from tests.support.fake_ledger import FakeStore, FakeUnitOfWork

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
POLICY = CreditPolicy(credit_expiration_months=1, hold_ttl_days=4)


def at(hours: float = 0, days: float = 0) -> datetime:
    return T0 + timedelta(hours=hours, days=days)


def paid(
    event_id: str, customer: str, credits: int, when: datetime = T0, payment_id: str | None = None
) -> PaymentSucceeded:
    return PaymentSucceeded(
        event_id=event_id,
        occurred_at=when,
        customer_id=customer,
        payment_id=payment_id or f"in-{event_id}",
        credits=credits,
    )


def job(event_id: str, customer: str, job_id: str, credits: int = 1, when: datetime = T0) -> JobCompleted:
    return JobCompleted(event_id=event_id, occurred_at=when, customer_id=customer, job_id=job_id, credits=credits)


def adjusted(event_id: str, customer: str, credits: int, when: datetime = T0) -> CreditsAdjusted:
    return CreditsAdjusted(
        event_id=event_id, occurred_at=when, customer_id=customer, credits=credits, reason="goodwill", actor="ops"
    )


async def apply(store: FakeStore, *applied):
    """Apply each event alone; their outcomes."""
    return [await events.apply_event(event, FakeUnitOfWork(store), POLICY) for event in applied]


def balance(store: FakeStore, customer: str) -> int:
    row = store.accounts[customer]
    return sum(lot.remaining for lot in row.lots) - row.overdraft


def kinds(store: FakeStore, customer: str) -> list[str]:
    return [entry.kind.value for entry in store.entries_of(customer)]


def notice_kinds(store: FakeStore, customer: str | None = None) -> list[str]:
    return [notice.kind.value for notice in store.notices() if customer is None or notice.customer_id == customer]
