"""Membership tools, pure domain: freezing pauses expiry and booking; gifts move credits between customers.

No I/O, no clock reads: every rule is driven by the moment it applies at.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import domain
from domain import (
    Account,
    CreditPolicy,
    DomainError,
    EntryKind,
    InsufficientCredits,
    LotSource,
    MembershipIsFrozen,
    UnknownCustomer,
)
from domain import errors as domain_errors
from messages import CreditsGifted
from tests.support import t
from tests.support.ledger import assert_reconciles

UTC = UTC
POLICY = CreditPolicy()
ONE_MONTH = CreditPolicy(credit_expiration_months=1)


def state(account: Account) -> tuple:
    """Everything about an account a refused request must leave alone."""
    return (
        [(id(lot), lot.amount, lot.remaining, lot.expires_at, lot.expired) for lot in account.lots],
        {job: (h.credits, h.status) for job, h in account.holds.items()},
        account.overdraft,
        account.depleted_at,
        account.frozen_since,
        list(account.new_entries),
        len(account.changed_lots),
        len(account.changed_holds),
    )


def of_kind(account: Account, kind: EntryKind) -> list:
    return [e for e in account.new_entries if e.kind is kind]


# --------------------------------------------------------------------- freeze / unfreeze


def test_unfreezing_moves_every_unexpired_lot_by_exactly_the_pause():
    account = Account("cust-f")
    gone = account.issue(4, t(2024, 1, 10), "pay-gone", POLICY)  # expires 2025-01-10, before the freeze
    due_in_pause = account.issue(5, t(2024, 6, 1), "pay-mid", POLICY)  # expires 2025-06-01, during the pause
    later = account.issue(7, t(2024, 9, 1), "pay-late", POLICY)  # expires 2025-09-01, after the pause
    frozen_at, unfrozen_at = t(2025, 3, 1, 12), t(2025, 8, 1, 18, 30)

    assert account.freeze(frozen_at, "freeze-1") is True
    assert account.frozen_since == frozen_at
    # Catching up at the freeze expired the lot already due, at its own expiry time.
    [expired] = of_kind(account, EntryKind.EXPIRED)
    assert (expired.credits, expired.occurred_at) == (-4, t(2025, 1, 10))
    assert gone.remaining == 0 and gone.expired == 4

    pause = account.unfreeze(unfrozen_at, "unfreeze-1")
    assert pause == unfrozen_at - frozen_at
    assert account.frozen_since is None
    assert gone.expires_at == t(2025, 1, 10)  # expired before the freeze: not moved, not revived
    assert gone.remaining == 0
    assert due_in_pause.expires_at == t(2025, 6, 1) + pause
    assert later.expires_at == t(2025, 9, 1) + pause
    # The lot that would have expired during the pause did not.
    assert len(of_kind(account, EntryKind.EXPIRED)) == 1
    assert (due_in_pause.remaining, due_in_pause.expired) == (5, 0)
    assert account.balance(unfrozen_at) == 12
    assert_reconciles(account)

    # It now expires at its moved date, not a moment sooner.
    just_before = due_in_pause.expires_at - timedelta(seconds=1)
    assert account.view(just_before).balance == 12
    assert account.view(due_in_pause.expires_at).balance == 7
    assert of_kind(account, EntryKind.EXPIRED)[-1].occurred_at == t(2025, 6, 1) + pause
    assert account.view(later.expires_at).balance == 0
    assert [e.occurred_at for e in of_kind(account, EntryKind.EXPIRED)] == [
        t(2025, 1, 10),
        t(2025, 6, 1) + pause,
        t(2025, 9, 1) + pause,
    ]
    assert_reconciles(account)


def test_a_lot_expiring_exactly_at_the_freeze_is_expired_and_not_moved():
    account = Account("cust-f")
    edge = account.issue(3, t(2024, 3, 1), "pay-edge", POLICY)  # expires 2025-03-01 00:00
    keep = account.issue(2, t(2024, 3, 2), "pay-keep", POLICY)
    account.freeze(t(2025, 3, 1), "freeze")
    pause = account.unfreeze(t(2025, 4, 1), "unfreeze")
    assert (edge.remaining, edge.expires_at) == (0, t(2025, 3, 1))
    assert keep.expires_at == t(2025, 3, 2) + pause
    assert account.balance(t(2025, 4, 1)) == 2
    assert_reconciles(account)


def test_nothing_expires_while_frozen_however_late_it_is_read():
    account = Account("cust-f")
    first = account.issue(6, t(2024, 1, 1), "pay-1", ONE_MONTH)  # expires 2024-02-01
    second = account.issue(4, t(2024, 1, 15), "pay-2", POLICY)  # expires 2025-01-15
    account.freeze(t(2024, 1, 20), "freeze")
    before = state(account)

    for far in (t(2024, 2, 1), t(2025, 1, 15), t(2030, 6, 1), t(2124, 1, 1)):
        view = account.view(far)
        assert (view.balance, view.available) == (10, 10)
        assert [lot.remaining for lot in view.lots] == [6, 4]
        assert view.frozen_since == t(2024, 1, 20)
        assert view.can_schedule is False
        account.catch_up(far, "late-read")
        assert account.balance(far) == 10 and account.available(far) == 10
    assert state(account) == before  # not one entry, not one lot touched
    assert (first.expires_at, second.expires_at) == (t(2024, 2, 1), t(2025, 1, 15))
    assert of_kind(account, EntryKind.EXPIRED) == []


def test_holds_still_count_against_available_while_frozen():
    account = Account("cust-f")
    account.issue(10, t(2025, 1, 1), "pay", POLICY)
    account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", POLICY)
    account.freeze(t(2025, 1, 3), "freeze")
    view = account.view(t(2025, 1, 4))
    assert (view.balance, view.available, view.can_schedule) == (10, 7, False)


def test_freeze_and_unfreeze_are_idempotent():
    account = Account("cust-f")
    account.issue(5, t(2025, 1, 1), "pay", POLICY)
    assert account.unfreeze(t(2025, 1, 2), "unfreeze-early") is None  # not frozen: nothing to end
    assert account.frozen_since is None

    assert account.freeze(t(2025, 2, 1), "freeze-1") is True
    before = state(account)
    assert account.freeze(t(2025, 3, 1), "freeze-2") is False  # a second freeze changes nothing
    assert account.frozen_since == t(2025, 2, 1)
    assert state(account) == before

    pause = account.unfreeze(t(2025, 4, 1), "unfreeze-1")
    assert pause == t(2025, 4, 1) - t(2025, 2, 1)
    [lot] = account.lots
    moved = lot.expires_at
    assert moved == t(2026, 1, 1) + pause
    after = state(account)
    assert account.unfreeze(t(2025, 5, 1), "unfreeze-2") is None  # the second unfreeze moves nothing
    assert lot.expires_at == moved
    assert state(account) == after


def test_a_frozen_membership_cannot_book_and_can_again_once_unfrozen():
    account = Account("cust-f")
    account.issue(10, t(2025, 1, 1), "pay", POLICY)
    account.freeze(t(2025, 1, 10), "freeze")
    before = state(account)
    with pytest.raises(MembershipIsFrozen):
        account.place_hold("job-1", 1, t(2025, 1, 11), "hold-1", POLICY)
    assert state(account) == before
    assert account.holds == {}
    view = account.view(t(2025, 1, 11))
    assert view.available == 10 and view.can_schedule is False

    account.unfreeze(t(2025, 1, 20), "unfreeze")
    assert account.view(t(2025, 1, 21)).can_schedule is True
    hold = account.place_hold("job-1", 1, t(2025, 1, 21), "hold-1", POLICY)
    assert hold.credits == 1 and account.available(t(2025, 1, 21)) == 9


# --------------------------------------------------------------------- gifts


def test_a_gift_is_taken_oldest_first_and_keeps_each_lots_expiry():
    giver, receiver = Account("giver"), Account("receiver")
    late = giver.issue(10, t(2025, 1, 5), "pay-late", POLICY)  # expires 2026-01-05
    soon = giver.issue(3, t(2025, 2, 1), "pay-soon", ONE_MONTH)  # expires 2025-03-01: spent first
    middle = giver.issue(
        5, t(2025, 1, 20), "adj-mid", CreditPolicy(credit_expiration_months=6), source=LotSource.ADJUSTMENT
    )  # 2025-07-20
    at = t(2025, 2, 10)

    given_lots = giver.give(10, receiver, at, "gift-1")

    assert (soon.remaining, middle.remaining, late.remaining) == (0, 0, 8)
    assert [(lot.amount, lot.remaining, lot.expires_at) for lot in given_lots] == [
        (3, 3, t(2025, 3, 1)),
        (5, 5, t(2025, 7, 20)),
        (2, 2, t(2026, 1, 5)),
    ]
    assert all(lot.source is LotSource.GIFT and lot.issued_at == at and lot.event_id == "gift-1" for lot in given_lots)
    assert receiver.lots == given_lots

    [taken] = of_kind(giver, EntryKind.GIFTED)
    assert (taken.credits, taken.balance_after, taken.occurred_at, taken.event_id) == (-10, 8, at, "gift-1")
    assert [(m.lot, m.credits) for m in taken.movements] == [(soon, 3), (middle, 5), (late, 2)]
    assert taken.note == "gift to receiver"
    received = of_kind(receiver, EntryKind.GIFTED)
    assert [(e.credits, e.balance_after) for e in received] == [(3, 3), (5, 8), (2, 10)]
    assert [[(m.lot, m.credits) for m in e.movements] for e in received] == [[(lot, lot.amount)] for lot in given_lots]
    assert all(e.note == "gift from giver" and e.overdraft_change == 0 for e in received)
    assert_reconciles(giver)
    assert_reconciles(receiver)
    assert giver.balance(at) + receiver.balance(at) == 18

    # The gifted credits expire on the receiver's side when the originals would have.
    assert receiver.view(t(2025, 3, 1)).balance == 7
    assert receiver.view(t(2025, 7, 20)).balance == 2
    assert receiver.view(t(2026, 1, 5)).balance == 0
    assert_reconciles(receiver)


def test_a_gift_never_includes_credits_that_expired_before_it():
    giver, receiver = Account("giver"), Account("receiver")
    giver.issue(4, t(2025, 1, 1), "pay-old", ONE_MONTH)  # expires 2025-02-01
    giver.issue(6, t(2025, 1, 15), "pay-new", POLICY)
    with pytest.raises(InsufficientCredits) as refused:
        giver.give(7, receiver, t(2025, 2, 5), "gift-too-much")
    assert refused.value.available == 6
    [lot] = giver.give(6, receiver, t(2025, 2, 5), "gift")
    assert lot.expires_at == t(2026, 1, 15)
    assert giver.balance(t(2025, 2, 5)) == 0
    assert_reconciles(giver)


@pytest.mark.parametrize("held", [0, 4])
def test_a_gift_above_what_is_available_is_refused_and_changes_nothing(held):
    giver, receiver = Account("giver"), Account("receiver")
    giver.issue(10, t(2025, 1, 1), "pay", POLICY)
    receiver.issue(2, t(2025, 1, 1), "pay-r", POLICY)
    if held:
        giver.place_hold("job-1", held, t(2025, 1, 2), "hold", POLICY)
    available = 10 - held
    giver_before, receiver_before = state(giver), state(receiver)

    with pytest.raises(InsufficientCredits) as refused:
        giver.give(available + 1, receiver, t(2025, 1, 3), "gift-too-much")
    assert (refused.value.available, refused.value.wanted) == (available, available + 1)
    assert state(giver) == giver_before
    assert state(receiver) == receiver_before

    giver.give(available, receiver, t(2025, 1, 3), "gift-all")  # exactly what is available is fine
    assert giver.available(t(2025, 1, 3)) == 0
    assert giver.balance(t(2025, 1, 3)) == held
    assert giver.overdraft == 0
    assert receiver.balance(t(2025, 1, 3)) == 2 + available


def test_a_customer_with_nothing_cannot_gift_and_is_not_put_in_overdraft():
    giver, receiver = Account("giver"), Account("receiver")
    with pytest.raises(InsufficientCredits):
        giver.give(1, receiver, t(2025, 1, 1), "gift")
    assert (giver.overdraft, giver.new_entries, receiver.new_entries) == (0, [], [])


@pytest.mark.parametrize("frozen", ["giver", "receiver"])
def test_no_gift_to_or_from_a_frozen_membership(frozen):
    giver, receiver = Account("giver"), Account("receiver")
    giver.issue(10, t(2025, 1, 1), "pay", POLICY)
    receiver.issue(1, t(2025, 1, 1), "pay-r", POLICY)
    (giver if frozen == "giver" else receiver).freeze(t(2025, 1, 5), "freeze")
    giver_before, receiver_before = state(giver), state(receiver)
    with pytest.raises(MembershipIsFrozen):
        giver.give(3, receiver, t(2025, 1, 6), "gift")
    assert state(giver) == giver_before
    assert state(receiver) == receiver_before


def test_a_receiver_in_overdraft_is_repaid_first_from_the_gift():
    giver, receiver = Account("giver"), Account("receiver")
    giver.issue(10, t(2025, 1, 1), "pay", POLICY)
    receiver.issue(2, t(2025, 1, 1), "pay-r", POLICY)
    receiver.debit(6, t(2025, 1, 2), "job-done", job_id="job-1")  # 2 spent, 4 of overdraft
    assert (receiver.overdraft, receiver.book_balance) == (4, -4)
    assert receiver.depleted_at == t(2025, 1, 2)

    [lot] = giver.give(7, receiver, t(2025, 1, 3), "gift")

    assert (lot.amount, lot.remaining) == (7, 3)
    assert receiver.overdraft == 0
    [received] = of_kind(receiver, EntryKind.GIFTED)
    assert (received.credits, received.overdraft_change, received.balance_after) == (7, -4, 3)
    assert receiver.depleted_at is None
    assert receiver.balance(t(2025, 1, 3)) == 3
    assert giver.balance(t(2025, 1, 3)) == 3
    assert_reconciles(giver)
    assert_reconciles(receiver)


def test_a_gift_that_only_partly_repays_an_overdraft():
    giver, receiver = Account("giver"), Account("receiver")
    giver.issue(10, t(2025, 1, 1), "pay", POLICY)
    receiver.issue(1, t(2025, 1, 1), "pay-r", POLICY)
    receiver.debit(7, t(2025, 1, 2), "job-done", job_id="job-1")
    [lot] = giver.give(2, receiver, t(2025, 1, 3), "gift")
    assert (lot.remaining, receiver.overdraft, receiver.book_balance) == (0, 4, -4)
    [received] = of_kind(receiver, EntryKind.GIFTED)
    assert (received.credits, received.overdraft_change, received.balance_after) == (2, -2, -4)
    assert receiver.depleted_at is not None
    assert_reconciles(receiver)


def test_no_gift_to_oneself():
    account = Account("cust")
    account.issue(5, t(2025, 1, 1), "pay", POLICY)
    with pytest.raises(ValueError):
        account.give(1, account, t(2025, 1, 2), "gift")
    with pytest.raises(ValueError):
        account.give(1, Account("cust"), t(2025, 1, 2), "gift")
    with pytest.raises(ValueError):
        account.give(0, Account("other"), t(2025, 1, 2), "gift")
    with pytest.raises(ValueError):
        CreditsGifted(event_id="g", occurred_at=t(2025, 1, 2), customer_id="cust", to_customer_id="cust", credits=1)


def test_an_unknown_receiver_is_a_domain_error_so_the_worker_dead_letters_it():
    """A gift to a customer the ledger does not know is refused (service_layer) with
    UnknownCustomer: a DomainError, which the worker dead-letters instead of retrying."""
    assert issubclass(UnknownCustomer, DomainError)
    assert UnknownCustomer is domain_errors.UnknownCustomer
    assert "UnknownCustomer" in domain.__all__


# --------------------------------------------------------------------- booking and depletion


def test_releasing_a_hold_after_the_last_lot_expired_depletes_at_the_lots_expiry():
    """The release reads the ledger at its own moment: the lot that expired meanwhile is
    written off first, which is a depletion (the API then queues its notice)."""
    account = Account("cust-h")
    lot = account.issue(5, t(2024, 3, 10), "pay", POLICY)  # expires 2025-03-10
    account.place_hold("job-1", 2, t(2025, 3, 1), "hold-1", POLICY)
    assert account.depleted_at is None

    assert account.release_hold("job-1", t(2025, 3, 12), "release-1") is True
    assert account.depleted_at == lot.expires_at == t(2025, 3, 10)
    [expired] = of_kind(account, EntryKind.EXPIRED)
    assert (expired.credits, expired.occurred_at) == (-5, t(2025, 3, 10))
    [released] = of_kind(account, EntryKind.RELEASED)
    assert released.occurred_at == t(2025, 3, 12)
    assert_reconciles(account)

    # Releasing nothing later moves nothing: still depleted since the expiry.
    assert account.release_hold("job-1", t(2025, 3, 20), "release-2") is False
    assert account.depleted_at == t(2025, 3, 10)


def test_placing_the_same_hold_again_after_the_lot_expired_returns_it_and_depletes():
    account = Account("cust-h")
    account.issue(5, t(2024, 3, 10), "pay", POLICY)  # expires 2025-03-10
    first = account.place_hold("job-1", 2, t(2025, 3, 1), "hold-1", POLICY)
    assert account.depleted_at is None

    again = account.place_hold("job-1", 2, t(2025, 3, 11), "hold-1-again", POLICY)
    assert again is first  # the credits were reserved before: the booking stands
    assert account.depleted_at == t(2025, 3, 10)
    assert account.balance(t(2025, 3, 11)) == 0 and account.available(t(2025, 3, 11)) == -2
    # A new booking now is refused: nothing is available.
    with pytest.raises(InsufficientCredits):
        account.place_hold("job-2", 1, t(2025, 3, 11), "hold-2", POLICY)


def test_a_hold_that_leaves_credits_changes_no_depletion():
    account = Account("cust-h")
    account.issue(3, t(2025, 1, 1), "pay", POLICY)
    account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", POLICY)  # all of it reserved
    # Holds move no balance: reserving everything is not running out.
    assert (account.balance(t(2025, 1, 2)), account.available(t(2025, 1, 2)), account.depleted_at) == (3, 0, None)
    account.release_hold("job-1", t(2025, 1, 3), "release-1")
    assert account.depleted_at is None


# --------------------------------------------------------------------- property: freezing never loses or creates credits

START = t(2025, 1, 1)
POLICIES = [CreditPolicy(credit_expiration_months=m) for m in (1, 2, 6)]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(min_value=1, max_value=120 * 24)),  # hours
        st.tuples(st.just("freeze"), st.just(0)),
        st.tuples(st.just("unfreeze"), st.just(0)),
        st.tuples(st.just("issue"), st.integers(min_value=1, max_value=50)),
        st.tuples(st.just("view"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations, policy_index=st.integers(0, len(POLICIES) - 1))
def test_freezing_and_time_never_lose_or_create_credits(ops, policy_index):
    policy = POLICIES[policy_index]
    account = Account("cust-prop")
    now = START
    issued = 0
    pauses: list[tuple[datetime, datetime]] = []
    frozen_since: datetime | None = None
    for n, (op, arg) in enumerate(ops):
        if op == "advance":
            now += timedelta(hours=arg)
        elif op == "freeze":
            changed = account.freeze(now, f"freeze-{n}")
            assert changed is (frozen_since is None)
            frozen_since = frozen_since or now
        elif op == "unfreeze":
            pause = account.unfreeze(now, f"unfreeze-{n}")
            if frozen_since is None:
                assert pause is None
            else:
                assert pause == now - frozen_since
                pauses.append((frozen_since, now))
                frozen_since = None
        elif op == "issue":
            account.issue(arg, now, f"pay-{n}", policy)
            issued += arg
        else:
            view = account.view(now)
            assert view.balance == view.available == account.balance(now)
            cutoff = frozen_since or now
            # Caught up: nothing due by the (frozen) cutoff is left open; nothing open is unspendable.
            assert all(lot.expires_at > cutoff for lot in account.lots if lot.remaining > 0)
            assert view.balance == sum(lot.remaining for lot in account.lots)
        assert account.frozen_since == frozen_since

        remaining = sum(lot.remaining for lot in account.lots)
        expired = sum(lot.expired for lot in account.lots)
        assert remaining + expired == issued
        assert account.overdraft == 0
        assert -sum(e.credits for e in of_kind(account, EntryKind.EXPIRED)) == expired
        assert_reconciles(account)
        # No credit ever expires inside a pause (nor at its very end: moved lots expire after it).
        for entry in of_kind(account, EntryKind.EXPIRED):
            assert not any(start < entry.occurred_at <= end for start, end in pauses)
            if frozen_since is not None:
                assert entry.occurred_at <= frozen_since
        # While frozen, every open lot stays spendable, however late.
        if frozen_since is not None:
            assert account.balance(now + timedelta(days=3650)) == remaining
