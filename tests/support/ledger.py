"""Checks of one Account in memory that every ledger rule must leave true."""

from __future__ import annotations

from domain import Account


def assert_reconciles(account: Account) -> None:
    """The balance-moving entries sum to the book balance, which is the lots' credit minus
    overdraft; each entry is backed by its lot movements (plus what overdraft covered)."""
    moving = [e for e in account.new_entries if e.kind.moves_balance]
    assert sum(e.credits for e in moving) == account.book_balance
    assert account.book_balance == sum(lot.remaining for lot in account.lots) - account.overdraft
    assert account.overdraft >= 0
    if moving:
        assert moving[-1].balance_after == account.book_balance
    for entry in moving:
        if entry.credits > 0:
            # Credits in make a lot of that size, whatever part of it repaid overdraft.
            assert sum(m.credits for m in entry.movements) == entry.credits, entry
        else:
            assert -entry.credits == sum(m.credits for m in entry.movements) + entry.overdraft_change, entry
    for lot in account.lots:
        assert 0 <= lot.remaining <= lot.amount
        assert 0 <= lot.reversed <= lot.amount
