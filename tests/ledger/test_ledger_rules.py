"""Worked examples for every ledger rule: pure domain, no I/O, no clock reads."""

from __future__ import annotations

from datetime import UTC

import pytest

from domain import (
    Account,
    CreditPolicy,
    EntryKind,
    Hold,
    HoldConflict,
    HoldStatus,
    InsufficientCredits,
    JobAlreadyCharged,
    Lot,
    LotSource,
    add_months,
)
from tests.support import t
from tests.support.ledger import assert_reconciles

UTC = UTC
POLICY = CreditPolicy()
ONE_MONTH = CreditPolicy(credit_expiration_months=1)


def new_account() -> Account:
    return Account(customer_id="cust-1")


def kinds(account: Account) -> list[EntryKind]:
    return [e.kind for e in account.new_entries]


# --------------------------------------------------------------------- policy & month arithmetic


@pytest.mark.parametrize(
    ("start", "months", "expected"),
    [
        (t(2025, 1, 31), 1, t(2025, 2, 28)),  # clamps to the end of a short month
        (t(2024, 1, 31), 1, t(2024, 2, 29)),  # leap year
        (t(2025, 3, 31), 1, t(2025, 4, 30)),
        (t(2025, 1, 15, 9, 30), 1, t(2025, 2, 15, 9, 30)),  # time of day kept
        (t(2024, 2, 29), 12, t(2025, 2, 28)),  # leap day + 12 months
        (t(2025, 3, 15, 10), 12, t(2026, 3, 15, 10)),
        (t(2025, 11, 30), 3, t(2026, 2, 28)),  # across a year end, clamped
    ],
)
def test_add_months_clamps_to_month_end(start, months, expected):
    assert add_months(start, months) == expected


def test_default_policy_expires_after_twelve_months_with_unlimited_rollover():
    policy = CreditPolicy()
    assert policy.credit_expiration_months == 12
    assert policy.allow_unlimited_rollover is True
    assert policy.carry_limit is None
    assert policy.expiry_for(t(2025, 1, 31, 12)) == t(2026, 1, 31, 12)
    assert policy.expiry_for(t(2024, 2, 29)) == t(2025, 2, 28)


def test_capped_policy_exposes_its_carry_limit():
    assert CreditPolicy(allow_unlimited_rollover=False, rollover_cap=7).carry_limit == 7
    # With unlimited rollover a configured cap is ignored.
    assert CreditPolicy(allow_unlimited_rollover=True, rollover_cap=7).carry_limit is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"credit_expiration_months": 0},
        {"hold_ttl_days": 0},
        {"allow_unlimited_rollover": False},  # cap missing
        {"allow_unlimited_rollover": False, "rollover_cap": -1},
    ],
)
def test_policy_refuses_nonsense(kwargs):
    with pytest.raises(ValueError):
        CreditPolicy(**kwargs)


def test_hold_expiry_is_placed_at_plus_ttl_days():
    assert CreditPolicy(hold_ttl_days=3).hold_expiry_for(t(2025, 2, 27, 8)) == t(2025, 3, 2, 8)


# --------------------------------------------------------------------- issuance


def test_payment_issuance_creates_a_lot_and_an_issued_entry():
    account = new_account()
    lot = account.issue(10, t(2025, 1, 31, 9), "pay-1", POLICY)

    assert (lot.amount, lot.remaining) == (10, 10)
    assert lot.issued_at == t(2025, 1, 31, 9)
    assert lot.expires_at == t(2026, 1, 31, 9)
    assert lot.source is LotSource.PAYMENT
    assert lot.event_id == "pay-1"
    assert account.lots == [lot]

    [entry] = account.new_entries
    assert entry.kind is EntryKind.ISSUED
    assert entry.credits == 10
    assert entry.balance_after == 10
    assert entry.event_id == "pay-1"
    assert entry.occurred_at == t(2025, 1, 31, 9)
    assert [(m.lot, m.credits) for m in entry.movements] == [(lot, 10)]
    assert account.balance(t(2025, 2, 1)) == 10
    assert_reconciles(account)


def test_issuance_uses_the_policy_month_count_with_clamping():
    account = new_account()
    lot = account.issue(5, t(2025, 1, 31), "pay-1", ONE_MONTH)
    assert lot.expires_at == t(2025, 2, 28)
    leap = account.issue(5, t(2024, 1, 31), "pay-2", ONE_MONTH)
    assert leap.expires_at == t(2024, 2, 29)


@pytest.mark.parametrize("credits", [0, -1])
def test_non_positive_credits_are_refused_everywhere(credits):
    account = new_account()
    account.issue(10, t(2025, 1, 1), "pay-1", POLICY)
    before = list(account.new_entries)
    with pytest.raises(ValueError):
        account.issue(credits, t(2025, 1, 2), "pay-2", POLICY)
    with pytest.raises(ValueError):
        account.debit(credits, t(2025, 1, 2), "deb-1")
    with pytest.raises(ValueError):
        account.complete_job("job-1", credits, t(2025, 1, 2), "done-1")
    with pytest.raises(ValueError):
        account.place_hold("job-1", credits, t(2025, 1, 2), "hold-1", POLICY)
    assert account.new_entries == before
    assert account.balance(t(2025, 1, 2)) == 10
    assert "job-1" not in account.charged_jobs


# --------------------------------------------------------------------- FIFO consumption


def test_debit_splits_across_lots_oldest_first_and_records_movements():
    account = new_account()
    first = account.issue(3, t(2025, 1, 1), "pay-1", POLICY)
    second = account.issue(5, t(2025, 2, 1), "pay-2", POLICY)
    third = account.issue(4, t(2025, 3, 1), "pay-3", POLICY)

    entry = account.debit(6, t(2025, 4, 1), "deb-1", job_id="job-1")

    assert entry.kind is EntryKind.DEBITED
    assert entry.credits == -6
    assert entry.job_id == "job-1"
    assert entry.overdraft_change == 0
    assert [(m.lot, m.credits) for m in entry.movements] == [(first, 3), (second, 3)]
    assert (first.remaining, second.remaining, third.remaining) == (0, 2, 4)
    assert entry.balance_after == 6
    assert account.balance(t(2025, 4, 1)) == 6
    assert_reconciles(account)


def test_lot_expiring_first_is_spent_first_even_if_issued_later():
    account = new_account()
    long_lived = account.issue(5, t(2025, 1, 1), "pay-1", POLICY)  # expires 2026-01-01
    short_lived = account.issue(5, t(2025, 2, 1), "adj-1", ONE_MONTH)  # expires 2025-03-01

    entry = account.debit(7, t(2025, 2, 2), "deb-1")

    assert [(m.lot, m.credits) for m in entry.movements] == [(short_lived, 5), (long_lived, 2)]


def test_equal_expiry_is_tie_broken_by_issued_at():
    account = new_account()
    # Both expire at 2025-02-28 00:00 (clamped); the later-issued lot is stored first.
    later = account.issue(4, t(2025, 1, 31), "pay-late", ONE_MONTH)
    earlier = account.issue(4, t(2025, 1, 29), "pay-early", ONE_MONTH)  # a late event
    assert later.expires_at == earlier.expires_at == t(2025, 2, 28)
    assert account.lots == [later, earlier]

    entry = account.debit(5, t(2025, 2, 1), "deb-1")

    assert [(m.lot, m.credits) for m in entry.movements] == [(earlier, 4), (later, 1)]
    assert (earlier.remaining, later.remaining) == (0, 3)


def test_equal_expiry_and_issue_time_is_tie_broken_by_id():
    issued, expires = t(2025, 1, 1), t(2026, 1, 1)
    newer = Lot(5, 5, issued, expires, LotSource.PAYMENT, "pay-b", id=7)
    older = Lot(5, 5, issued, expires, LotSource.PAYMENT, "pay-a", id=3)
    account = Account(customer_id="cust-1", lots=[newer, older])

    entry = account.debit(6, t(2025, 6, 1), "deb-1")

    assert [(m.lot.id, m.credits) for m in entry.movements] == [(3, 5), (7, 1)]


def test_stored_lots_are_spent_before_unsaved_ones_with_the_same_times():
    issued, expires = t(2025, 1, 1), t(2026, 1, 1)
    unsaved = Lot(5, 5, issued, expires, LotSource.PAYMENT, "pay-new")
    stored = Lot(5, 5, issued, expires, LotSource.PAYMENT, "pay-old", id=99)
    account = Account(customer_id="cust-1", lots=[unsaved, stored])

    entry = account.debit(5, t(2025, 6, 1), "deb-1")

    assert [m.lot for m in entry.movements] == [stored]


# --------------------------------------------------------------------- balance and expiry


def test_balance_counts_only_unexpired_lots_minus_overdraft():
    account = new_account()
    account.issue(3, t(2025, 1, 10), "pay-1", ONE_MONTH)  # expires 2025-02-10
    account.issue(4, t(2025, 1, 20), "pay-2", ONE_MONTH)  # expires 2025-02-20

    assert account.balance(t(2025, 2, 9, 23, 59)) == 7
    assert account.balance(t(2025, 2, 10)) == 4  # expiry is exclusive: at expires_at it is gone
    assert account.balance(t(2025, 2, 20)) == 0
    account.overdraft = 2
    assert account.balance(t(2025, 2, 1)) == 5
    assert account.balance(t(2025, 3, 1)) == -2


def test_expired_but_unswept_credit_is_never_spendable():
    account = new_account()
    lot = account.issue(10, t(2025, 1, 1), "pay-1", ONE_MONTH)  # expires 2025-02-01
    # No sweep has run: the lot still holds its credit in memory...
    assert lot.remaining == 10
    # ...but it is not part of the balance past its expiry.
    assert account.balance(t(2025, 2, 1)) == 0
    assert account.available(t(2025, 2, 2)) == 0

    entry = account.debit(3, t(2025, 2, 2), "deb-1")

    # The debit first expired the lot (at its own expiry time), then overdrew.
    assert kinds(account) == [EntryKind.ISSUED, EntryKind.EXPIRED, EntryKind.DEBITED]
    expired = account.new_entries[1]
    assert expired.credits == -10
    assert expired.occurred_at == t(2025, 2, 1)
    assert expired.event_id == "deb-1"
    assert [(m.lot, m.credits) for m in expired.movements] == [(lot, 10)]
    assert entry.movements == ()
    assert entry.overdraft_change == 3
    assert lot.remaining == 0
    assert account.overdraft == 3
    assert account.balance(t(2025, 2, 2)) == -3
    assert_reconciles(account)


def test_expired_but_unswept_credit_cannot_be_held():
    account = new_account()
    account.issue(10, t(2025, 1, 1), "pay-1", ONE_MONTH)  # expires 2025-02-01
    with pytest.raises(InsufficientCredits) as refused:
        account.place_hold("job-1", 1, t(2025, 2, 1), "hold-1", ONE_MONTH)
    assert refused.value.available == 0


def test_catch_up_expires_each_lot_at_its_own_expiry_and_is_idempotent():
    account = new_account()
    a = account.issue(2, t(2025, 1, 5), "pay-1", ONE_MONTH)
    b = account.issue(3, t(2025, 1, 10), "pay-2", ONE_MONTH)
    keep = account.issue(4, t(2025, 2, 1), "pay-3", ONE_MONTH)

    account.catch_up(t(2025, 2, 15), "sweep-1")
    account.catch_up(t(2025, 2, 15), "sweep-2")

    expired = [e for e in account.new_entries if e.kind is EntryKind.EXPIRED]
    assert [(e.occurred_at, e.credits, e.event_id) for e in expired] == [
        (t(2025, 2, 5), -2, "sweep-1"),
        (t(2025, 2, 10), -3, "sweep-1"),
    ]
    assert (a.remaining, b.remaining, keep.remaining) == (0, 0, 4)
    assert account.book_balance == 4
    assert_reconciles(account)


def test_view_applies_due_expiry_and_lists_spendable_lots_oldest_first():
    account = new_account()
    old = account.issue(2, t(2025, 1, 5), "pay-1", ONE_MONTH)
    newer = account.issue(3, t(2025, 2, 1), "pay-2", ONE_MONTH)
    oldest_alive = account.issue(1, t(2025, 1, 20), "pay-3", ONE_MONTH)  # late event
    account.place_hold("job-1", 2, t(2025, 2, 1), "hold-1", POLICY)

    view = account.view(t(2025, 2, 10))

    assert old.remaining == 0
    assert view.balance == 4
    assert view.available == 2
    assert view.lots == (oldest_alive, newer)
    assert [h.job_id for h in view.holds] == ["job-1"]
    assert view.can_schedule is True


# --------------------------------------------------------------------- overdraft


def test_completed_job_is_never_dropped_shortfall_becomes_overdraft():
    account = new_account()
    lot = account.issue(2, t(2025, 1, 1), "pay-1", POLICY)

    entry = account.complete_job("job-1", 5, t(2025, 1, 2), "done-1")

    assert entry.kind is EntryKind.DEBITED
    assert entry.credits == -5
    assert [(m.lot, m.credits) for m in entry.movements] == [(lot, 2)]
    assert entry.overdraft_change == 3
    assert entry.balance_after == -3
    assert account.overdraft == 3
    assert account.balance(t(2025, 1, 2)) == -3
    assert account.available(t(2025, 1, 2)) == -3
    assert_reconciles(account)


def test_next_issuance_repays_overdraft_first():
    account = new_account()
    account.debit(4, t(2025, 1, 1), "deb-1")
    assert account.overdraft == 4

    lot = account.issue(10, t(2025, 1, 2), "pay-1", POLICY)

    assert lot.amount == 10
    assert lot.remaining == 6
    assert account.overdraft == 0
    entry = account.new_entries[-1]
    assert entry.kind is EntryKind.ISSUED
    assert entry.credits == 10
    assert entry.overdraft_change == -4
    assert entry.balance_after == 6
    assert account.balance(t(2025, 1, 2)) == 6
    assert_reconciles(account)


def test_issuance_smaller_than_overdraft_repays_part_of_it():
    account = new_account()
    account.debit(10, t(2025, 1, 1), "deb-1")

    lot = account.issue(4, t(2025, 1, 2), "pay-1", POLICY)

    assert lot.remaining == 0
    assert account.overdraft == 6
    assert account.new_entries[-1].overdraft_change == -4
    assert account.balance(t(2025, 1, 2)) == -6
    # The fully used lot is never drawn from again.
    entry = account.debit(1, t(2025, 1, 3), "deb-2")
    assert entry.movements == ()
    assert account.overdraft == 7
    assert_reconciles(account)


# --------------------------------------------------------------------- rollover cap


def test_unlimited_rollover_carries_everything():
    account = new_account()
    account.issue(50, t(2025, 1, 1), "pay-1", POLICY)
    account.issue(10, t(2025, 2, 1), "pay-2", POLICY)
    assert EntryKind.EXPIRED not in kinds(account)
    assert account.balance(t(2025, 2, 1)) == 60


def test_rollover_cap_expires_the_excess_oldest_first_at_issuance():
    capped = CreditPolicy(allow_unlimited_rollover=False, rollover_cap=5)
    account = new_account()
    older = account.issue(4, t(2025, 1, 1), "pay-1", POLICY)  # cap applies only from the next payment
    newer = account.issue(4, t(2025, 1, 15), "adj-1", POLICY, source=LotSource.ADJUSTMENT)

    fresh = account.issue(10, t(2025, 2, 1), "pay-2", capped)

    expired = account.new_entries[-2]
    assert expired.kind is EntryKind.EXPIRED
    assert expired.credits == -3
    assert expired.occurred_at == t(2025, 2, 1)
    assert expired.event_id == "pay-2"
    assert [(m.lot, m.credits) for m in expired.movements] == [(older, 3)]
    assert (older.remaining, newer.remaining, fresh.remaining) == (1, 4, 10)
    assert account.new_entries[-1].kind is EntryKind.ISSUED
    assert account.balance(t(2025, 2, 1)) == 5 + 10
    assert_reconciles(account)


def test_rollover_cap_of_zero_expires_everything_carried():
    capped = CreditPolicy(allow_unlimited_rollover=False, rollover_cap=0)
    account = new_account()
    account.issue(4, t(2025, 1, 1), "pay-1", capped)
    account.issue(6, t(2025, 2, 1), "pay-2", capped)

    assert kinds(account) == [EntryKind.ISSUED, EntryKind.EXPIRED, EntryKind.ISSUED]
    assert account.new_entries[1].credits == -4
    assert account.balance(t(2025, 2, 1)) == 6
    assert account.depleted_at is None  # the same issuance refilled it
    assert_reconciles(account)


def test_rollover_under_the_cap_expires_nothing():
    capped = CreditPolicy(allow_unlimited_rollover=False, rollover_cap=5)
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", capped)
    account.issue(5, t(2025, 2, 1), "pay-2", capped)
    assert kinds(account) == [EntryKind.ISSUED, EntryKind.ISSUED]
    assert account.balance(t(2025, 2, 1)) == 10


def test_rollover_cap_ignores_already_expired_credit():
    capped = CreditPolicy(credit_expiration_months=1, allow_unlimited_rollover=False, rollover_cap=2)
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", capped)  # expires 2025-02-01
    account.issue(3, t(2025, 1, 20), "pay-2", capped)  # carries 2 of 5: 3 over the cap expire

    account.issue(1, t(2025, 2, 5), "pay-3", capped)

    expired = [(e.occurred_at, e.credits, e.note) for e in account.new_entries if e.kind is EntryKind.EXPIRED]
    assert expired == [
        (t(2025, 1, 20), -3, "over rollover cap of 2"),
        (t(2025, 2, 1), -2, "expired"),  # natural expiry, at the lot's own time
        (t(2025, 2, 5), -1, "over rollover cap of 2"),  # 3 carried, cap 2
    ]
    assert account.balance(t(2025, 2, 5)) == 3
    assert_reconciles(account)


def test_adjustments_are_not_capped():
    capped = CreditPolicy(allow_unlimited_rollover=False, rollover_cap=1)
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", capped)

    account.adjust(5, t(2025, 1, 2), "adj-1", capped, note="goodwill")

    assert EntryKind.EXPIRED not in kinds(account)
    assert account.balance(t(2025, 1, 2)) == 10


# --------------------------------------------------------------------- depletion


def test_depleted_at_set_when_a_debit_empties_the_balance():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    account.debit(3, t(2025, 1, 2), "deb-1")
    assert account.depleted_at is None

    account.debit(2, t(2025, 1, 3, 12), "deb-2")

    assert account.balance(t(2025, 1, 3, 12)) == 0
    assert account.depleted_at == t(2025, 1, 3, 12)


def test_depleted_at_set_when_a_debit_overdraws_and_not_moved_by_further_debits():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    account.debit(8, t(2025, 1, 2), "deb-1")
    assert account.depleted_at == t(2025, 1, 2)

    account.debit(1, t(2025, 1, 5), "deb-2")
    account.complete_job("job-1", 2, t(2025, 1, 6), "done-1")
    account.adjust(-1, t(2025, 1, 7), "adj-1", POLICY, note="fix")

    assert account.depleted_at == t(2025, 1, 2)
    assert account.balance(t(2025, 1, 7)) == -7


def test_depleted_at_cleared_when_an_issuance_brings_balance_above_zero():
    account = new_account()
    account.issue(2, t(2025, 1, 1), "pay-1", POLICY)
    account.debit(5, t(2025, 1, 2), "deb-1")  # -3, depleted

    account.issue(2, t(2025, 1, 3), "pay-2", POLICY)  # -1: still depleted, same time
    assert account.depleted_at == t(2025, 1, 2)

    account.issue(2, t(2025, 1, 4), "pay-3", POLICY)  # +1
    assert account.depleted_at is None

    account.debit(1, t(2025, 1, 9), "deb-2")  # depleted again, new time
    assert account.depleted_at == t(2025, 1, 9)


def test_depleted_at_by_expiry_is_the_lots_expiry_time():
    account = new_account()
    account.issue(3, t(2025, 1, 10, 8), "pay-1", ONE_MONTH)  # expires 2025-02-10 08:00
    account.issue(4, t(2025, 1, 20, 8), "pay-2", ONE_MONTH)  # expires 2025-02-20 08:00

    account.catch_up(t(2025, 3, 15), "sweep-1")  # discovered much later

    assert account.balance(t(2025, 3, 15)) == 0
    assert account.depleted_at == t(2025, 2, 20, 8)


def test_depleted_at_by_expiry_discovered_by_a_later_debit():
    account = new_account()
    account.issue(3, t(2025, 1, 10), "pay-1", ONE_MONTH)  # expires 2025-02-10
    account.debit(1, t(2025, 3, 1), "deb-1")
    # It went to zero by expiry; the overdrawing debit does not move it.
    assert account.depleted_at == t(2025, 2, 10)
    assert account.balance(t(2025, 3, 1)) == -1


def test_depleted_at_by_negative_adjustment():
    account = new_account()
    account.issue(3, t(2025, 1, 1), "pay-1", POLICY)
    account.adjust(-3, t(2025, 1, 5), "adj-1", POLICY, note="refund")
    assert account.depleted_at == t(2025, 1, 5)


def test_customer_without_credits_who_overdraws_stays_undepleted():
    account = new_account()
    account.complete_job("job-1", 2, t(2025, 1, 1), "done-1")
    account.debit(1, t(2025, 1, 2), "deb-1")
    account.issue(1, t(2025, 1, 3), "pay-1", POLICY)  # still -2
    assert account.balance(t(2025, 1, 3)) == -2
    assert account.depleted_at is None


def test_holds_do_not_deplete():
    account = new_account()
    account.issue(3, t(2025, 1, 1), "pay-1", POLICY)
    account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", POLICY)
    assert account.available(t(2025, 1, 2)) == 0
    assert account.depleted_at is None


# --------------------------------------------------------------------- holds


def test_available_is_balance_minus_active_holds():
    policy = CreditPolicy(hold_ttl_days=10)
    account = new_account()
    account.issue(10, t(2025, 1, 1), "pay-1", policy)
    account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", policy)
    account.place_hold("job-2", 4, t(2025, 1, 5), "hold-2", policy)

    assert account.balance(t(2025, 1, 6)) == 10
    assert account.held(t(2025, 1, 6)) == 7
    assert account.available(t(2025, 1, 6)) == 3
    # job-1's hold has lapsed by its expiry even before a catch-up wrote it.
    assert account.available(t(2025, 1, 12)) == 6
    assert account.available(t(2025, 1, 15)) == 10


def test_hold_beyond_available_raises_insufficient_credits():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", POLICY)
    before = list(account.new_entries)

    with pytest.raises(InsufficientCredits) as refused:
        account.place_hold("job-2", 3, t(2025, 1, 3), "hold-2", POLICY)

    assert (refused.value.wanted, refused.value.available) == (3, 2)
    assert refused.value.customer_id == "cust-1"
    assert "job-2" not in account.holds
    assert account.new_entries == before
    # Exactly what is available can be held.
    account.place_hold("job-2", 2, t(2025, 1, 3), "hold-2", POLICY)
    assert account.available(t(2025, 1, 3)) == 0


def test_hold_with_no_credits_or_in_overdraft_is_refused():
    account = new_account()
    with pytest.raises(InsufficientCredits):
        account.place_hold("job-1", 1, t(2025, 1, 1), "hold-1", POLICY)
    account.debit(2, t(2025, 1, 1), "deb-1")
    account.issue(2, t(2025, 1, 2), "pay-1", POLICY)  # balance 0
    with pytest.raises(InsufficientCredits):
        account.place_hold("job-1", 1, t(2025, 1, 2), "hold-1", POLICY)


def test_placing_a_hold_records_a_held_entry_without_moving_the_balance():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)

    hold = account.place_hold("job-1", 2, t(2025, 1, 2), "hold-1", POLICY)

    assert hold.status is HoldStatus.ACTIVE
    assert (hold.job_id, hold.credits, hold.placed_at) == ("job-1", 2, t(2025, 1, 2))
    assert hold.expires_at == t(2025, 2, 1)  # default 30 days
    entry = account.new_entries[-1]
    assert (entry.kind, entry.credits, entry.job_id, entry.balance_after) == (EntryKind.HELD, 2, "job-1", 5)
    assert not entry.kind.moves_balance
    assert account.balance(t(2025, 1, 2)) == 5
    assert_reconciles(account)


def test_complete_job_captures_the_active_hold():
    account = new_account()
    lot = account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    hold = account.place_hold("job-1", 2, t(2025, 1, 2), "hold-1", POLICY)

    entry = account.complete_job("job-1", 2, t(2025, 1, 3), "done-1")

    assert entry.kind is EntryKind.CAPTURED
    assert entry.credits == -2
    assert entry.job_id == "job-1"
    assert entry.event_id == "done-1"
    assert [(m.lot, m.credits) for m in entry.movements] == [(lot, 2)]
    assert hold.status is HoldStatus.CAPTURED
    assert hold.closed_at == t(2025, 1, 3)
    assert account.held(t(2025, 1, 3)) == 0
    assert account.balance(t(2025, 1, 3)) == 3
    assert account.available(t(2025, 1, 3)) == 3
    assert "job-1" in account.charged_jobs
    # Capturing writes no RELEASED/LAPSED entry.
    assert kinds(account) == [EntryKind.ISSUED, EntryKind.HELD, EntryKind.CAPTURED]
    assert_reconciles(account)


def test_capture_charges_what_the_completed_job_cost_not_what_was_held():
    account = new_account()
    account.issue(4, t(2025, 1, 1), "pay-1", POLICY)
    account.place_hold("job-1", 2, t(2025, 1, 2), "hold-1", POLICY)
    account.place_hold("job-2", 2, t(2025, 1, 2), "hold-2", POLICY)

    cheaper = account.complete_job("job-1", 1, t(2025, 1, 3), "done-1")
    dearer = account.complete_job("job-2", 5, t(2025, 1, 3), "done-2")

    assert (cheaper.kind, cheaper.credits) == (EntryKind.CAPTURED, -1)
    assert (dearer.kind, dearer.credits, dearer.overdraft_change) == (EntryKind.CAPTURED, -5, 2)
    assert account.balance(t(2025, 1, 3)) == -2
    assert account.held(t(2025, 1, 3)) == 0
    assert_reconciles(account)


def test_complete_job_without_a_hold_debits_directly():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    account.place_hold("job-other", 1, t(2025, 1, 1), "hold-1", POLICY)

    entry = account.complete_job("job-1", 3, t(2025, 1, 2), "done-1")

    assert entry.kind is EntryKind.DEBITED
    assert entry.credits == -3
    assert entry.job_id == "job-1"
    assert account.holds["job-other"].status is HoldStatus.ACTIVE
    assert account.balance(t(2025, 1, 2)) == 2
    assert account.available(t(2025, 1, 2)) == 1


def test_second_completion_of_a_charged_job_raises_job_already_charged():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    account.complete_job("job-1", 2, t(2025, 1, 2), "done-1")
    before = list(account.new_entries)

    with pytest.raises(JobAlreadyCharged):
        account.complete_job("job-1", 2, t(2025, 1, 3), "done-2")

    assert account.new_entries == before
    assert account.balance(t(2025, 1, 3)) == 3


def test_second_completion_after_capture_raises_job_already_charged():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    account.place_hold("job-1", 2, t(2025, 1, 2), "hold-1", POLICY)
    account.complete_job("job-1", 2, t(2025, 1, 3), "done-1")

    with pytest.raises(JobAlreadyCharged):
        account.complete_job("job-1", 2, t(2025, 1, 4), "done-2")
    with pytest.raises(JobAlreadyCharged):
        account.place_hold("job-1", 2, t(2025, 1, 4), "hold-2", POLICY)
    assert account.balance(t(2025, 1, 4)) == 3


def test_job_charged_earlier_as_told_by_the_repository_is_refused():
    account = Account(customer_id="cust-1", charged_jobs={"job-1"})
    with pytest.raises(JobAlreadyCharged):
        account.complete_job("job-1", 1, t(2025, 1, 1), "done-2")
    assert account.new_entries == []
    assert account.overdraft == 0


def test_release_hold_records_released_and_frees_credits():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    hold = account.place_hold("job-1", 4, t(2025, 1, 2), "hold-1", POLICY)

    assert account.release_hold("job-1", t(2025, 1, 3), "cancel-1") is True

    assert hold.status is HoldStatus.RELEASED
    assert hold.closed_at == t(2025, 1, 3)
    entry = account.new_entries[-1]
    assert (entry.kind, entry.credits, entry.job_id, entry.occurred_at) == (
        EntryKind.RELEASED,
        4,
        "job-1",
        t(2025, 1, 3),
    )
    assert account.available(t(2025, 1, 3)) == 5
    # Nothing left to release: no entry.
    count = len(account.new_entries)
    assert account.release_hold("job-1", t(2025, 1, 4), "cancel-2") is False
    assert account.release_hold("job-unknown", t(2025, 1, 4), "cancel-3") is False
    assert len(account.new_entries) == count
    # Completing the cancelled job later debits directly.
    assert account.complete_job("job-1", 4, t(2025, 1, 5), "done-1").kind is EntryKind.DEBITED


def test_hold_not_captured_within_ttl_lapses_at_its_expiry():
    policy = CreditPolicy(hold_ttl_days=7)
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", policy)
    hold = account.place_hold("job-1", 4, t(2025, 1, 2, 10), "hold-1", policy)
    assert hold.expires_at == t(2025, 1, 9, 10)
    assert account.available(t(2025, 1, 9, 9)) == 1
    assert account.available(t(2025, 1, 9, 10)) == 5  # lapsed at its expiry, even before the sweep

    entry = account.complete_job("job-1", 4, t(2025, 1, 20), "done-1")

    lapsed = account.new_entries[-2]
    assert (lapsed.kind, lapsed.credits, lapsed.job_id) == (EntryKind.LAPSED, 4, "job-1")
    assert lapsed.occurred_at == t(2025, 1, 9, 10)
    assert lapsed.event_id == "done-1"
    assert hold.status is HoldStatus.LAPSED
    assert hold.closed_at == t(2025, 1, 9, 10)
    assert entry.kind is EntryKind.DEBITED
    assert account.balance(t(2025, 1, 20)) == 1
    assert_reconciles(account)


def test_catch_up_lapses_holds_and_a_lapsed_job_can_be_held_again():
    policy = CreditPolicy(hold_ttl_days=1)
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", policy)
    first = account.place_hold("job-1", 5, t(2025, 1, 1), "hold-1", policy)
    account.catch_up(t(2025, 1, 3), "sweep-1")
    assert first.status is HoldStatus.LAPSED
    assert kinds(account)[-1] is EntryKind.LAPSED

    second = account.place_hold("job-1", 5, t(2025, 1, 3), "hold-2", policy)

    assert second is not first
    assert second.status is HoldStatus.ACTIVE
    assert account.holds["job-1"] is second


def test_placing_the_identical_hold_twice_returns_the_existing_one():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    first = account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", POLICY)
    count = len(account.new_entries)

    again = account.place_hold("job-1", 3, t(2025, 1, 3), "hold-1b", POLICY)

    assert again is first
    assert again.placed_at == t(2025, 1, 2)
    assert len(account.new_entries) == count
    assert account.held(t(2025, 1, 3)) == 3


def test_placing_a_hold_with_a_different_amount_raises_hold_conflict():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    first = account.place_hold("job-1", 3, t(2025, 1, 2), "hold-1", POLICY)
    count = len(account.new_entries)

    with pytest.raises(HoldConflict):
        account.place_hold("job-1", 2, t(2025, 1, 3), "hold-2", POLICY)

    assert account.holds["job-1"] is first
    assert first.credits == 3
    assert len(account.new_entries) == count


def test_an_identical_hold_is_returned_even_when_no_longer_affordable():
    account = new_account()
    account.issue(5, t(2025, 1, 1), "pay-1", POLICY)
    hold = account.place_hold("job-1", 5, t(2025, 1, 2), "hold-1", POLICY)
    account.debit(5, t(2025, 1, 3), "deb-1")
    assert account.place_hold("job-1", 5, t(2025, 1, 4), "hold-1", POLICY) is hold


def test_hold_objects_from_the_repository_are_respected():
    hold = Hold("job-1", 4, t(2025, 1, 1), t(2025, 1, 31))
    lot = Lot(5, 5, t(2025, 1, 1), t(2026, 1, 1), LotSource.PAYMENT, "pay-1", id=1)
    account = Account(customer_id="cust-1", lots=[lot], holds={"job-1": hold})
    assert account.available(t(2025, 1, 2)) == 1
    with pytest.raises(InsufficientCredits):
        account.place_hold("job-2", 2, t(2025, 1, 2), "hold-2", POLICY)


# --------------------------------------------------------------------- adjustments


def test_positive_adjustment_issues_an_adjustment_lot_and_repays_overdraft():
    account = new_account()
    account.debit(2, t(2025, 1, 1), "deb-1")

    account.adjust(5, t(2025, 1, 2), "adj-1", POLICY, note="goodwill (by ops)")

    lot = account.lots[-1]
    assert lot.source is LotSource.ADJUSTMENT
    assert (lot.amount, lot.remaining) == (5, 3)
    assert lot.expires_at == t(2026, 1, 2)
    entry = account.new_entries[-1]
    assert (entry.kind, entry.credits, entry.overdraft_change, entry.note) == (
        EntryKind.ADJUSTED,
        5,
        -2,
        "goodwill (by ops)",
    )
    assert account.balance(t(2025, 1, 2)) == 3
    assert_reconciles(account)


def test_negative_adjustment_spends_oldest_first_and_may_overdraw():
    account = new_account()
    first = account.issue(2, t(2025, 1, 1), "pay-1", POLICY)
    second = account.issue(2, t(2025, 1, 2), "pay-2", POLICY)

    account.adjust(-5, t(2025, 1, 3), "adj-1", POLICY, note="chargeback")

    entry = account.new_entries[-1]
    assert entry.kind is EntryKind.ADJUSTED
    assert entry.credits == -5
    assert [(m.lot, m.credits) for m in entry.movements] == [(first, 2), (second, 2)]
    assert entry.overdraft_change == 1
    assert account.balance(t(2025, 1, 3)) == -1
    assert_reconciles(account)


def test_zero_adjustment_is_refused():
    account = new_account()
    with pytest.raises(ValueError):
        account.adjust(0, t(2025, 1, 1), "adj-1", POLICY, note="nothing")
    assert account.new_entries == []


# --------------------------------------------------------------------- entries & late events


def test_only_hold_kinds_leave_the_balance_alone():
    assert {k for k in EntryKind if not k.moves_balance} == {EntryKind.HELD, EntryKind.RELEASED, EntryKind.LAPSED}


def test_entries_reconcile_through_a_mixed_history():
    policy = CreditPolicy(credit_expiration_months=1, allow_unlimited_rollover=False, rollover_cap=6, hold_ttl_days=5)
    account = new_account()
    account.issue(5, t(2025, 1, 1), "e1", policy)
    account.place_hold("j1", 2, t(2025, 1, 2), "e2", policy)
    account.issue(8, t(2025, 1, 3), "e3", policy)  # 5 carried, under cap 6
    account.complete_job("j1", 2, t(2025, 1, 4), "e4")
    account.issue(4, t(2025, 1, 5), "e5", policy)  # 11 carried: 5 over the cap
    account.place_hold("j2", 3, t(2025, 1, 6), "e6", policy)
    account.adjust(-2, t(2025, 1, 7), "e7", policy, note="fix")
    account.release_hold("j2", t(2025, 1, 8), "e8")
    account.debit(20, t(2025, 2, 10), "e9")  # after every lot expired
    account.adjust(3, t(2025, 2, 11), "e10", policy, note="goodwill")

    assert_reconciles(account)
    assert account.overdraft == 17
    assert account.balance(t(2025, 2, 11)) == -17
    assert {e.event_id for e in account.new_entries} >= {f"e{i}" for i in range(1, 11)}
    assert all(e.event_id for e in account.new_entries)


def test_late_debit_draws_from_lots_issued_after_it_if_unexpired_then():
    account = new_account()
    lot = account.issue(5, t(2025, 3, 1), "pay-1", POLICY)

    entry = account.debit(2, t(2025, 2, 1), "deb-late")  # happened before the payment

    assert [(m.lot, m.credits) for m in entry.movements] == [(lot, 2)]
    assert entry.overdraft_change == 0
    assert account.balance(t(2025, 3, 2)) == 3


def test_late_debit_does_not_draw_from_a_lot_already_expired_at_its_time():
    account = new_account()
    expired = account.issue(5, t(2025, 1, 1), "pay-1", ONE_MONTH)  # expires 2025-02-01
    alive = account.issue(5, t(2025, 1, 20), "pay-2", ONE_MONTH)  # expires 2025-02-20

    entry = account.debit(3, t(2025, 2, 1), "deb-1")  # exactly at the first lot's expiry

    assert [(m.lot, m.credits) for m in entry.movements] == [(alive, 3)]
    assert expired.remaining == 0
    assert account.new_entries[-2].kind is EntryKind.EXPIRED
