"""The sweeps on the same path as events, on the in-memory unit of work (no PostgreSQL)."""

from __future__ import annotations

from messages import MembershipFrozen
from service_layer.holds import place_hold
from service_layer.sweeps import SweepResult, expire_due_credits, lapse_due_holds
from tests.support.fake_ledger import FakeStore, FakeUnitOfWork
from tests.support.handlers import POLICY, apply, at, kinds, notice_kinds, paid


def new_uow(store: FakeStore):
    return lambda: FakeUnitOfWork(store)


async def test_the_expiry_sweep_expires_due_lots_in_batches_and_tells_who_ran_out():
    store = FakeStore()
    for n in range(5):
        await apply(store, paid(f"p{n}", f"c{n}", 2 + n))
    await apply(store, paid("late", "c0", 1, at(days=20)))  # c0 keeps a live lot
    now = at(days=40)
    first = await expire_due_credits(new_uow(store), now, batch_size=2, max_batches=1)
    assert first == SweepResult(2, 2, more=True)
    rest = await expire_due_credits(new_uow(store), now, batch_size=2)
    assert rest == SweepResult(3, 3)
    assert await expire_due_credits(new_uow(store), now, batch_size=2) == SweepResult(0, 0)
    assert sorted(n.customer_id for n in store.notices()) == ["c1", "c2", "c3", "c4"]  # c0 still has credit
    assert set(notice_kinds(store)) == {"credits_depleted"}
    assert kinds(store, "c0") == ["issued", "issued", "expired"]
    assert [e.event_id for e in store.entries_of("c1")][-1] == f"sweep:{now.isoformat()}"


async def test_the_expiry_sweep_passes_over_a_frozen_membership():
    store = FakeStore()
    await apply(store, paid("p", "c", 2), MembershipFrozen(event_id="f", occurred_at=at(days=1), customer_id="c"))
    assert await expire_due_credits(new_uow(store), at(days=60), batch_size=10) == SweepResult(0, 0)
    assert kinds(store, "c") == ["issued"]


async def test_the_lapse_sweep_lapses_holds_past_their_time_to_live_only():
    store = FakeStore()
    await apply(store, paid("p", "c", 5))
    await place_hold(FakeUnitOfWork(store), POLICY, "c", "old", 2, at(1))
    await place_hold(FakeUnitOfWork(store), POLICY, "c", "new", 1, at(days=3))
    assert await lapse_due_holds(new_uow(store), at(days=5), batch_size=10) == SweepResult(1, 1)
    assert [(h.job_id, h.status.value) for h in store.accounts["c"].holds] == [("old", "lapsed"), ("new", "active")]
    assert await lapse_due_holds(new_uow(store), at(days=5), batch_size=10) == SweepResult(0, 0)
