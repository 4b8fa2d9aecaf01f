"""The Account records what happened as domain events; one step's net change is what is told."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain import Account, CreditPolicy
from domain.events import CreditsDepleted, CreditsRestored, net_change

T0 = datetime(2026, 3, 2, tzinfo=UTC)
POLICY = CreditPolicy(credit_expiration_months=1)


def test_the_account_records_running_out_and_getting_credits_back_in_order():
    account = Account("c")
    account.issue(2, T0, "p", POLICY)
    assert account.events == []  # from zero to two: it had not run out
    account.debit(3, T0 + timedelta(hours=1), "d")
    account.adjust(1, T0 + timedelta(hours=2), "a1", POLICY, note="x")  # repays the overdraft only: still out
    account.adjust(4, T0 + timedelta(hours=3), "a2", POLICY, note="y")
    assert account.events == [
        CreditsDepleted("c", T0 + timedelta(hours=1)),
        CreditsRestored("c", T0 + timedelta(hours=1), T0 + timedelta(hours=3)),
    ]


def test_expiry_during_a_catch_up_is_recorded_at_the_lot_s_own_expiry():
    account = Account("c")
    lot = account.issue(2, T0, "p", POLICY)
    account.events.clear()
    account.catch_up(lot.expires_at + timedelta(days=3), "sweep")
    assert account.events == [CreditsDepleted("c", lot.expires_at)]


def test_the_net_change_of_a_step_compares_its_end_with_its_beginning():
    d1, d2 = CreditsDepleted("c", T0), CreditsDepleted("c", T0 + timedelta(days=2))
    r1, r2 = (
        CreditsRestored("c", T0, T0 + timedelta(days=1)),
        CreditsRestored("c", T0 + timedelta(days=2), T0 + timedelta(days=3)),
    )
    assert net_change([]) is None
    assert net_change([d1]) == d1
    assert net_change([d1, r1]) is None
    assert net_change([d1, r1, d2]) == d2
    assert net_change([r1, d2]) is None
    assert net_change([r1, d2, r2]) == CreditsRestored("c", T0, T0 + timedelta(days=3))
