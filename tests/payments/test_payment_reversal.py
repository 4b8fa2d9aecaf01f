"""Payments issue credits once; a refund or dispute takes them back (pure domain, no I/O).

Reversals are cumulative (each report states the total reversed so far), come out of the
payment's own lot first, then the customer's other credits oldest first, and only what nothing
covers becomes overdraft, which the next issuance repays first.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from domain import Account, CreditPolicy, DomainError, EntryKind, LotSource, Movement
from domain.errors import PaymentAlreadyApplied, PaymentNotApplied
from tests.support.ledger import assert_reconciles

UTC = UTC
POLICY = CreditPolicy()
T0 = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)


def t(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def new_account() -> Account:
    return Account(customer_id="cust-1")


def pay(account: Account, payment_id: str, credits: int, at: datetime):
    return account.issue(credits, at, f"evt-{payment_id}", POLICY, note=f"payment {payment_id}", payment_id=payment_id)


def reverse(account: Account, payment_id: str, total: int, at: datetime):
    return account.reverse_payment(
        payment_id, total, at, f"evt-rev-{payment_id}-{total}", f"payment {payment_id} refunded"
    )


# --------------------------------------------------------------------------- a payment issues once


def test_a_payment_issues_its_credits_once():
    account = new_account()
    lot = pay(account, "in_1", 10, t(0))
    assert (lot.payment_id, lot.source, lot.amount, lot.remaining, lot.reversed) == (
        "in_1",
        LotSource.PAYMENT,
        10,
        10,
        0,
    )
    entries_before = list(account.new_entries)

    with pytest.raises(PaymentAlreadyApplied, match="in_1"):
        pay(account, "in_1", 10, t(1))
    with pytest.raises(PaymentAlreadyApplied):
        pay(account, "in_1", 25, t(2))  # whatever amount the replay states

    assert account.new_entries == entries_before
    assert [lot.amount for lot in account.lots] == [10]
    assert account.balance(t(2)) == 10
    assert_reconciles(account)


def test_a_spent_payment_still_issues_only_once():
    account = new_account()
    pay(account, "in_1", 5, t(0))
    account.debit(5, t(1), "evt-debit")
    assert account.payment_lot("in_1").remaining == 0
    with pytest.raises(PaymentAlreadyApplied):
        pay(account, "in_1", 5, t(2))
    assert account.balance(t(2)) == 0


def test_payment_already_applied_is_a_refused_domain_request():
    assert issubclass(PaymentAlreadyApplied, DomainError)
    assert not issubclass(PaymentNotApplied, DomainError)  # retried: the payment may just be behind


def test_different_payments_and_plain_issuances_do_not_conflict():
    account = new_account()
    pay(account, "in_1", 10, t(0))
    pay(account, "in_2", 10, t(1))
    account.issue(3, t(2), "evt-grant", POLICY)  # no payment id
    account.issue(4, t(3), "evt-grant-2", POLICY)
    assert account.balance(t(3)) == 27
    assert_reconciles(account)


def test_payment_lot_finds_the_lot_a_payment_issued():
    account = new_account()
    first = pay(account, "in_1", 10, t(0))
    second = pay(account, "in_2", 4, t(1))
    assert account.payment_lot("in_1") is first
    assert account.payment_lot("in_2") is second
    assert account.payment_lot("in_3") is None
    assert new_account().payment_lot("in_1") is None


# --------------------------------------------------------------------------- reversal


def test_full_reversal_of_an_unspent_payment_takes_its_lot_to_zero():
    account = new_account()
    lot = pay(account, "in_1", 10, t(0))

    entry = reverse(account, "in_1", 10, t(5))

    assert entry is account.new_entries[-1]
    assert entry.kind is EntryKind.REVERSED
    assert entry.credits == -10
    assert entry.movements == (Movement(lot, 10),)
    assert entry.overdraft_change == 0
    assert entry.balance_after == 0
    assert entry.occurred_at == t(5)
    assert entry.note == "payment in_1 refunded"
    assert [e.kind for e in account.new_entries] == [EntryKind.ISSUED, EntryKind.REVERSED]
    assert (lot.remaining, lot.reversed) == (0, 10)
    assert lot in account.changed_lots
    assert account.balance(t(5)) == 0 and account.overdraft == 0
    assert_reconciles(account)


def test_reversing_part_of_a_spent_payment_takes_the_rest_from_other_lots_oldest_first():
    account = new_account()
    paid = pay(account, "in_1", 10, t(0))
    account.debit(7, t(1), "evt-debit")  # 3 left of the payment's lot
    older = pay(account, "in_2", 5, t(2))
    newer = pay(account, "in_3", 6, t(3))
    assert account.balance(t(3)) == 14

    entry = reverse(account, "in_1", 10, t(4))

    assert entry.credits == -10
    assert entry.movements == (Movement(paid, 3), Movement(older, 5), Movement(newer, 2))
    assert entry.overdraft_change == 0
    assert (paid.remaining, older.remaining, newer.remaining) == (0, 0, 4)
    assert (paid.reversed, older.reversed, newer.reversed) == (10, 0, 0)  # only the payment's lot counts it
    assert account.overdraft == 0
    assert account.balance(t(4)) == entry.balance_after == 4
    assert_reconciles(account)


def test_what_no_lot_covers_becomes_overdraft():
    account = new_account()
    paid = pay(account, "in_1", 10, t(0))
    account.debit(7, t(1), "evt-debit")
    other = account.issue(2, t(2), "evt-grant", POLICY)

    entry = reverse(account, "in_1", 10, t(3))

    assert entry.credits == -10
    assert entry.movements == (Movement(paid, 3), Movement(other, 2))
    assert entry.overdraft_change == 5
    assert account.overdraft == 5
    assert account.balance(t(3)) == entry.balance_after == -5
    assert account.available(t(3)) == -5
    assert_reconciles(account)


def test_a_fully_spent_payment_is_taken_back_from_other_lots_and_overdraft():
    account = new_account()
    paid = pay(account, "in_1", 4, t(0))
    account.debit(4, t(1), "evt-debit")
    other = pay(account, "in_2", 1, t(2))

    entry = reverse(account, "in_1", 4, t(3))

    assert entry.movements == (Movement(other, 1),)  # nothing from the empty lot
    assert entry.overdraft_change == 3
    assert (paid.remaining, paid.reversed, account.overdraft, account.balance(t(3))) == (0, 4, 3, -3)
    assert_reconciles(account)


def test_reversals_are_cumulative_totals():
    account = new_account()
    lot = pay(account, "in_1", 10, t(0))

    first = reverse(account, "in_1", 4, t(1))
    assert (first.credits, lot.remaining, lot.reversed, account.balance(t(1))) == (-4, 6, 4, 6)
    assert_reconciles(account)

    second = reverse(account, "in_1", 10, t(2))  # the new total, not 10 more
    assert (second.credits, lot.remaining, lot.reversed, account.balance(t(2))) == (-6, 0, 10, 0)
    assert second.movements == (Movement(lot, 6),)
    assert_reconciles(account)


@pytest.mark.parametrize("replayed_total", [4, 10, 7, 1])
def test_a_replayed_or_older_total_takes_nothing(replayed_total):
    account = new_account()
    pay(account, "in_1", 10, t(0))
    reverse(account, "in_1", 4, t(1))
    reverse(account, "in_1", 10, t(2))
    entries = list(account.new_entries)

    assert reverse(account, "in_1", replayed_total, t(3)) is None

    assert account.new_entries == entries
    assert account.balance(t(3)) == 0 and account.overdraft == 0
    assert_reconciles(account)


def test_an_older_partial_total_arriving_after_a_larger_one_takes_nothing():
    account = new_account()
    lot = pay(account, "in_1", 10, t(0))
    reverse(account, "in_1", 6, t(1))
    assert reverse(account, "in_1", 4, t(2)) is None
    assert (lot.reversed, lot.remaining, len(account.new_entries)) == (6, 4, 2)


def test_a_total_above_what_the_payment_issued_is_capped_at_its_amount():
    account = new_account()
    lot = pay(account, "in_1", 10, t(0))
    account.issue(50, t(1), "evt-grant", POLICY)

    entry = reverse(account, "in_1", 25, t(2))

    assert entry.credits == -10
    assert (lot.reversed, account.balance(t(2))) == (10, 50)
    assert reverse(account, "in_1", 40, t(3)) is None
    assert account.balance(t(3)) == 50
    assert_reconciles(account)


def test_reversing_a_payment_that_issued_nothing_is_refused_for_a_retry():
    account = new_account()
    pay(account, "in_1", 10, t(0))
    account.issue(5, t(1), "evt-grant", POLICY)
    with pytest.raises(PaymentNotApplied, match="in_2"):
        reverse(account, "in_2", 5, t(2))
    with pytest.raises(PaymentNotApplied):
        reverse(new_account(), "in_1", 5, t(2))
    assert [e.kind for e in account.new_entries] == [EntryKind.ISSUED, EntryKind.ISSUED]
    assert account.balance(t(2)) == 15


@pytest.mark.parametrize("total", [0, -3])
def test_a_reversal_total_must_be_positive(total):
    account = new_account()
    pay(account, "in_1", 10, t(0))
    with pytest.raises(ValueError):
        reverse(account, "in_1", total, t(1))
    assert account.balance(t(1)) == 10


def test_the_next_issuance_repays_reversal_overdraft_first():
    account = new_account()
    pay(account, "in_1", 10, t(0))
    account.debit(10, t(1), "evt-debit")
    reverse(account, "in_1", 10, t(2))
    assert account.overdraft == 10 and account.balance(t(2)) == -10

    partly = pay(account, "in_2", 4, t(3))  # not enough to repay it all
    issued = account.new_entries[-1]
    assert (issued.kind, issued.credits, issued.overdraft_change, issued.balance_after) == (EntryKind.ISSUED, 4, -4, -6)
    assert (partly.remaining, account.overdraft) == (0, 6)
    assert_reconciles(account)

    rest = pay(account, "in_3", 10, t(4))
    issued = account.new_entries[-1]
    assert (issued.credits, issued.overdraft_change, issued.balance_after) == (10, -6, 4)
    assert (rest.remaining, account.overdraft, account.balance(t(4))) == (4, 0, 4)
    assert_reconciles(account)


def test_a_reversal_that_empties_the_balance_marks_the_depletion_time():
    account = new_account()
    pay(account, "in_1", 10, t(0))
    pay(account, "in_2", 3, t(1))

    reverse(account, "in_1", 5, t(2))
    assert account.depleted_at is None  # 8 left

    reverse(account, "in_1", 10, t(3))
    assert account.depleted_at is None  # 3 left

    account.debit(3, t(4), "evt-debit")
    assert account.depleted_at == t(4)
    assert_reconciles(account)


def test_a_reversal_into_overdraft_marks_the_depletion_time_and_the_next_payment_clears_it():
    account = new_account()
    pay(account, "in_1", 10, t(0))
    account.debit(8, t(1), "evt-debit")
    assert account.depleted_at is None

    reverse(account, "in_1", 10, t(2))  # 2 from the lot, 8 overdraft
    assert account.depleted_at == t(2)
    assert account.balance(t(2)) == -8

    pay(account, "in_2", 5, t(3))  # still -3: stays depleted since t(2)
    assert account.depleted_at == t(2)
    pay(account, "in_3", 5, t(4))  # +2
    assert account.depleted_at is None
    assert_reconciles(account)


def test_a_reversal_of_an_already_depleted_account_keeps_its_first_depletion_time():
    account = new_account()
    pay(account, "in_1", 5, t(0))
    account.debit(5, t(1), "evt-debit")
    assert account.depleted_at == t(1)
    reverse(account, "in_1", 5, t(2))
    assert (account.depleted_at, account.balance(t(2))) == (t(1), -5)


def test_credits_of_the_payment_that_expired_are_not_taken_again_from_other_lots():
    """Bug: reverse_payment takes everything its lot no longer holds from the customer's other
    lots, as if it had all been spent. Of a 10-credit payment 4 were spent and 6 expired
    unused; refunding it takes 10 from a newer purchase, so the customer loses 16 credits for
    a 10-credit payment. Only what was spent (4) should come from other credits."""
    account = new_account()
    one_month = CreditPolicy(credit_expiration_months=1)
    account.issue(10, t(0), "evt-in_1", one_month, payment_id="in_1")
    account.debit(4, t(24), "evt-debit")
    newer = pay(account, "in_2", 20, t(24 * 40))  # in_1's lot expired (6 credits) on the way
    assert [e.kind for e in account.new_entries] == [
        EntryKind.ISSUED,
        EntryKind.DEBITED,
        EntryKind.EXPIRED,
        EntryKind.ISSUED,
    ]

    reverse(account, "in_1", 10, t(24 * 41))

    assert_reconciles(account)
    assert newer.remaining == 16
    assert account.balance(t(24 * 41)) == 16


def test_reversals_reconcile_after_every_step():
    account = new_account()
    steps = [
        lambda: pay(account, "in_1", 10, t(0)),
        lambda: account.debit(3, t(1), "evt-d1"),
        lambda: pay(account, "in_2", 6, t(2)),
        lambda: reverse(account, "in_1", 4, t(3)),
        lambda: account.debit(5, t(4), "evt-d2"),
        lambda: reverse(account, "in_2", 6, t(5)),
        lambda: reverse(account, "in_1", 10, t(6)),
        lambda: reverse(account, "in_1", 10, t(7)),  # replay: nothing
        lambda: pay(account, "in_3", 20, t(8)),
        lambda: reverse(account, "in_3", 3, t(9)),
    ]
    balances = []
    for step in steps:
        step()
        assert_reconciles(account)
        balances.append(account.balance(t(10)))
    assert balances == [10, 7, 13, 9, 4, -2, -8, -8, 12, 9]
    assert [e.kind for e in account.new_entries].count(EntryKind.REVERSED) == 4  # the replay wrote none
