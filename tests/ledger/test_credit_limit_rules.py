"""The ledger's bounds (domain/limits.py): at the bound an event is applied, one credit past it
is refused as a CreditLimitExceeded (a DomainError: dead letter, 409), and nothing changes."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from domain import (
    MAX_BALANCE,
    MAX_CREDITS_PER_EVENT,
    MAX_OVERDRAFT,
    Account,
    CreditLimitExceeded,
    CreditPolicy,
    DomainError,
    Lot,
    LotSource,
)
from messages import PaymentSucceeded
from messages.events import MAX_AMOUNT_CENTS, MAX_CREDITS
from tests.support import t

POLICY = CreditPolicy()
AT = t(2026, 3, 2, 9)


def holding(credits: int, customer_id: str = "cust-max") -> Account:
    """An account with one lot of ``credits`` (bigger than any one event could issue)."""
    lot = Lot(credits, credits, AT - timedelta(days=1), POLICY.expiry_for(AT), LotSource.ADJUSTMENT, "seed", id=1)
    return Account(customer_id=customer_id, lots=[lot])


def test_the_bounds_sit_far_inside_64_bits_and_the_wire_schema_agrees():
    assert MAX_CREDITS == MAX_CREDITS_PER_EVENT
    assert issubclass(CreditLimitExceeded, DomainError)
    # Every customer at the largest balance, a million of them, still sums inside BIGINT.
    assert 1_000_000 * max(MAX_BALANCE, MAX_OVERDRAFT) < 2**63
    assert MAX_BALANCE > 2**31 and MAX_OVERDRAFT > 2**31


def test_an_adjustment_up_to_the_largest_balance_is_applied_and_one_more_credit_is_refused():
    account = holding(MAX_BALANCE - 10)
    account.adjust(10, AT, "exact", POLICY, note="to the max")
    assert account.book_balance == MAX_BALANCE
    assert account.new_entries[-1].balance_after == MAX_BALANCE

    entries = list(account.new_entries)
    with pytest.raises(CreditLimitExceeded, match="largest balance"):
        account.adjust(1, AT, "one-more", POLICY, note="past the max")
    assert account.book_balance == MAX_BALANCE
    assert account.new_entries == entries


def test_a_payment_past_the_largest_balance_is_refused():
    account = holding(MAX_BALANCE - 4)
    with pytest.raises(CreditLimitExceeded):
        account.issue(5, AT, "pay", POLICY, payment_id="in_1")
    account.issue(4, AT, "pay-exact", POLICY, payment_id="in_2")
    assert account.book_balance == MAX_BALANCE


def test_a_gift_that_would_take_the_receiver_past_the_largest_balance_is_refused_before_anything_moves():
    giver = holding(100, "giver")
    receiver = holding(MAX_BALANCE - 99, "receiver")
    with pytest.raises(CreditLimitExceeded):
        giver.give(100, receiver, AT, "gift")
    assert (giver.book_balance, receiver.book_balance) == (100, MAX_BALANCE - 99)
    giver.give(99, receiver, AT, "gift-exact")
    assert (giver.book_balance, receiver.book_balance) == (1, MAX_BALANCE)


def test_a_debit_past_the_largest_overdraft_is_refused_and_the_exact_one_applied():
    account = Account(customer_id="cust-owes", overdraft=MAX_OVERDRAFT - 3)
    account.debit(3, AT, "exact", job_id="job-1")
    assert account.overdraft == MAX_OVERDRAFT
    assert account.book_balance == -MAX_OVERDRAFT
    with pytest.raises(CreditLimitExceeded, match="largest overdraft"):
        account.debit(1, AT, "one-more", job_id="job-2")
    with pytest.raises(CreditLimitExceeded):
        account.adjust(-1, AT, "adjust-down", POLICY, note="past the overdraft")
    assert account.overdraft == MAX_OVERDRAFT


@pytest.mark.parametrize("credits", [MAX_CREDITS_PER_EVENT + 1, 2**31, 2**63])
def test_more_credits_than_one_event_may_move_are_refused_by_every_operation(credits):
    account = holding(10)
    for attempt in (
        lambda: account.issue(credits, AT, "pay", POLICY),
        lambda: account.debit(credits, AT, "debit"),
        lambda: account.adjust(credits, AT, "adjust-up", POLICY, note="x"),
        lambda: account.adjust(-credits, AT, "adjust-down", POLICY, note="x"),
        lambda: account.complete_job("job", credits, AT, "job"),
        lambda: account.place_hold("job", credits, AT, "hold", POLICY),
    ):
        with pytest.raises(CreditLimitExceeded):
            attempt()
    assert account.book_balance == 10


def test_the_wire_schema_bounds_a_payments_amount():
    common = dict(event_id="p", customer_id="c", occurred_at=AT, payment_id="in_1", credits=1)
    assert PaymentSucceeded(**common, amount_cents=MAX_AMOUNT_CENTS).amount_cents == MAX_AMOUNT_CENTS
    for amount in (MAX_AMOUNT_CENTS + 1, 2**63, -1):
        with pytest.raises(ValidationError):
            PaymentSucceeded(**common, amount_cents=amount)
