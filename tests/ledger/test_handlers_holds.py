"""Holds and the credit view on the in-memory unit of work (no PostgreSQL)."""

from __future__ import annotations

import pytest

from domain import HoldConflict, InsufficientCredits
from service_layer.errors import CustomerNotFound
from service_layer.holds import credit_view, place_hold, release_hold
from tests.support.fake_ledger import FakeStore, FakeUnitOfWork
from tests.support.handlers import POLICY, apply, at, job, kinds, notice_kinds, paid


async def hold(store: FakeStore, job_id: str, credits: int, when, customer: str = "c"):
    return await place_hold(FakeUnitOfWork(store), POLICY, customer, job_id, credits, when)


async def test_a_hold_reserves_credits_once_and_its_repeat_is_harmless():
    store = FakeStore()
    await apply(store, paid("p", "c", 5))
    first, created = await hold(store, "j", 3, at(1))
    again, created_again = await hold(store, "j", 3, at(2))
    assert (created, created_again) == (True, False)
    assert again.id == first.id
    assert (await credit_view(FakeUnitOfWork(store), "c", at(2))).available == 2
    with pytest.raises(HoldConflict):
        await hold(store, "j", 2, at(2))
    with pytest.raises(InsufficientCredits):
        await hold(store, "k", 3, at(2))
    assert kinds(store, "c") == ["issued", "held"]


async def test_holds_need_a_known_customer():
    store = FakeStore()
    with pytest.raises(CustomerNotFound):
        await hold(store, "j", 1, at(0), customer="nobody")
    with pytest.raises(CustomerNotFound):
        await release_hold(FakeUnitOfWork(store), "nobody", "j", at(0))
    with pytest.raises(CustomerNotFound):
        await credit_view(FakeUnitOfWork(store), "nobody", at(0))
    assert store.accounts == {} and store.commits == 0


async def test_releasing_a_hold_frees_its_credits_and_a_second_release_finds_none():
    store = FakeStore()
    await apply(store, paid("p", "c", 2))
    await hold(store, "j", 2, at(1))
    assert await release_hold(FakeUnitOfWork(store), "c", "j", at(2)) is True
    assert await release_hold(FakeUnitOfWork(store), "c", "j", at(3)) is False
    assert (await credit_view(FakeUnitOfWork(store), "c", at(3))).available == 2
    assert kinds(store, "c") == ["issued", "held", "released"]


async def test_a_hold_past_its_time_to_live_lapses_before_the_same_job_is_booked_again():
    store = FakeStore()
    await apply(store, paid("p", "c", 3))
    await hold(store, "j", 2, at(1))
    rebooked, created = await hold(store, "j", 2, at(days=5))  # four days to live
    assert created
    assert [h.status.value for h in store.accounts["c"].holds] == ["lapsed", "active"]
    assert kinds(store, "c") == ["issued", "held", "lapsed", "held"]


async def test_booking_whose_catch_up_expires_the_last_credits_tells_the_customer_once():
    store = FakeStore()
    await apply(store, paid("p", "c", 1))
    with pytest.raises(InsufficientCredits):
        await hold(store, "j", 1, at(days=40))  # refused: nothing written, nothing told
    assert notice_kinds(store) == [] and kinds(store, "c") == ["issued"]
    await apply(store, job("done", "c", "other", 1, at(1)))
    assert notice_kinds(store, "c") == ["credits_depleted"]
