"""Admins' adjustments and actions on the in-memory unit of work (no PostgreSQL)."""

from __future__ import annotations

import pytest

from domain import InsufficientCredits, UnknownCustomer
from messages import CreditsGifted
from service_layer.adjustments import Adjustment, admin_adjustment, apply_admin_event
from service_layer.apply import Outcome
from service_layer.errors import CustomerNotFound
from tests.support.fake_ledger import FakeStore, FakeUnitOfWork
from tests.support.handlers import POLICY, apply, at, balance, kinds, paid


async def adjust(store: FakeStore, customer: str, credits: int, key: str | None, when=None) -> Outcome:
    adjustment = Adjustment(customer, credits, "goodwill", "ops@example.com", when or at(1), key)
    return await admin_adjustment(FakeUnitOfWork(store), POLICY, adjustment)


async def test_an_adjustment_applies_once_per_key_whatever_the_repeat_carries():
    store = FakeStore()
    await apply(store, paid("p", "c", 2))
    assert await adjust(store, "c", 3, "form-1") is Outcome.APPLIED
    assert await adjust(store, "c", 3, "form-1", at(2)) is Outcome.DUPLICATE  # another moment: same key
    assert await adjust(store, "c", 3, None) is Outcome.APPLIED  # no key: each call applies
    assert balance(store, "c") == 8
    [entry] = [e for e in store.entries_of("c") if e.event_id == "admin-adjustment:form-1"]
    assert entry.note == "goodwill (by ops@example.com)"


async def test_an_admin_never_creates_a_customer():
    store = FakeStore()
    with pytest.raises(CustomerNotFound):
        await adjust(store, "nobody", 3, "form-2")
    assert store.accounts == {} and store.processed == {}


async def test_an_admin_gift_is_refused_to_an_unknown_customer_and_over_what_is_available():
    store = FakeStore()
    await apply(store, paid("p", "giver", 2), paid("q", "taker", 1))
    gift = CreditsGifted(
        event_id="admin-gift:k1", occurred_at=at(1), customer_id="giver", to_customer_id="taker", credits=2
    )
    with pytest.raises(UnknownCustomer):
        await apply_admin_event(FakeUnitOfWork(store), POLICY, gift.model_copy(update={"to_customer_id": "typo"}))
    with pytest.raises(InsufficientCredits):
        await apply_admin_event(FakeUnitOfWork(store), POLICY, gift.model_copy(update={"credits": 3}))
    assert await apply_admin_event(FakeUnitOfWork(store), POLICY, gift) is Outcome.APPLIED
    assert (
        await apply_admin_event(FakeUnitOfWork(store), POLICY, gift.model_copy(update={"occurred_at": at(2)}))
        is Outcome.DUPLICATE
    )
    assert (balance(store, "giver"), balance(store, "taker")) == (0, 3)
    assert kinds(store, "taker") == ["issued", "gifted"]
