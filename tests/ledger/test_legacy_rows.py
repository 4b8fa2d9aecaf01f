"""Old-system rows: what is a bad row, and how a history replays through the ledger's rules."""

from __future__ import annotations

import json
import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from domain import CreditPolicy, EntryKind
from domain.legacy import LEGACY_NAMESPACE, BadRow, LegacyRow, legacy_event_id, parse_row, replay
from tests.support import t
from tests.support.legacy_history import Ids, member_history

NOW = t(2026, 6, 1)
POLICY = CreditPolicy(credit_expiration_months=12)


def row(line: int, row_id: str, kind: str, amount: str, created: str, expires: str = "") -> LegacyRow:
    return parse_row(line, (row_id, "m1", kind, amount, created, expires))


def replayed(*rows: LegacyRow, now: datetime = NOW):
    return replay("c1", rows, POLICY, now, "sweep:test")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        (("1", "m1", "Refund", "5", "2025-01-01T10:00:00Z", ""), "unknown Type 'Refund'"),
        (("1", "m1", "Debit", "-5", "", ""), "missing CreatedAt"),
        (("1", "m1", "Debit", "-5", "2025-01-01T10:00:00", ""), "has no UTC offset"),
        (("1", "m1", "Debit", "-5", "2025-01-01", ""), "has no UTC offset"),
        (("1", "m1", "Debit", "-5", "yesterday", ""), "is not an ISO 8601 date"),
        (("1", "m1", "Debit", "-1.5", "2025-01-01T10:00:00Z", ""), "is not an integer"),
        (("1", "m1", "Debit", "five", "2025-01-01T10:00:00Z", ""), "is not an integer"),
        (("1", "m1", "Debit", "", "2025-01-01T10:00:00Z", ""), "missing Amount"),
        (("1", "m1", "Adjusted", "0", "2025-01-01T10:00:00Z", ""), "zero Amount"),
        (("1", "m1", "Credit", "10", "2025-01-01T10:00:00Z", ""), "Credit without ExpiresAt"),
        (
            ("1", "m1", "Credit", "10", "2025-01-01T10:00:00Z", "2026-01-01T10:00:00"),
            "ExpiresAt '2026-01-01T10:00:00' has no UTC offset",
        ),
        (
            ("1", "m1", "Credit", "10", "2025-01-01T10:00:00Z", "2024-01-01T10:00:00Z"),
            "ExpiresAt is not after CreatedAt",
        ),
        (
            ("1", "m1", "Credit", "-10", "2025-01-01T10:00:00Z", "2026-01-01T10:00:00Z"),
            "negative Amount -10 on a Credit row",
        ),
        (("1", "m1", "Debit", "5", "2025-01-01T10:00:00Z", ""), "positive Amount 5 on a Debit row"),
        (("1", "m1", "Expired", "5", "2025-01-01T10:00:00Z", ""), "positive Amount 5 on a Expired row"),
        (("", "m1", "Debit", "-5", "2025-01-01T10:00:00Z", ""), "missing Id"),
        (("1", " ", "Debit", "-5", "2025-01-01T10:00:00Z", ""), "missing MembershipId"),
        (("1", "m1", "Debit", "-99999999999", "2025-01-01T10:00:00Z", ""), "out of range"),
    ],
)
def test_each_kind_of_bad_row_says_what_is_wrong(fields, problem):
    with pytest.raises(BadRow, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_row(7, fields)


def test_a_good_row_is_read_in_utc_whatever_its_offset():
    summer = row(2, "10", "Credit", "10.00", "2025-07-01T09:00:00-04:00", "2026-07-01T09:00:00-04:00")
    winter = row(3, "11", "Debit", " -3 ", "2025-12-01T09:00:00-05:00")
    assert summer.amount == 10 and summer.created_at == datetime(2025, 7, 1, 13, tzinfo=UTC)
    assert summer.created_at.tzinfo is UTC
    assert winter.created_at == datetime(2025, 12, 1, 14, tzinfo=UTC) and winter.amount == -3
    assert winter.expires_at is None


def test_event_ids_are_uuid5_of_the_old_id_and_stable():
    assert legacy_event_id("42") == f"legacy:{uuid.uuid5(LEGACY_NAMESPACE, '42')}"
    assert legacy_event_id("42") == legacy_event_id("42") != legacy_event_id("43")


@pytest.mark.parametrize("seed", range(5))
def test_the_fingerprinted_payload_is_the_sorted_compact_json_of_the_row(seed):
    """Byte for byte what json.dumps writes: rows imported before keep their fingerprints."""
    rng = random.Random(seed)
    alphabet = 'aZ09 "\\/\n\t\x00\x1f\x7fé€\u2028😀,'
    for _ in range(200):
        text = "x" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) + "x"  # ids are stripped
        expires = "" if rng.random() < 0.5 else "2026-02-01T10:00:00.5-05:00"
        parsed = parse_row(
            2,
            (
                text,
                text[::-1],
                "Credit" if expires else "Adjusted",
                str(rng.randint(1, 99)),
                "2025-03-09T03:30:00+01:00",
                expires,
            ),
        )
        assert parsed.payload_json == json.dumps(parsed.payload, sort_keys=True, separators=(",", ":"))


def test_spending_beyond_the_balance_becomes_overdraft_repaid_by_the_next_credit():
    result = replayed(
        row(2, "1", "Credit", "5", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        row(3, "2", "Debit", "-8", "2025-02-01T00:00:00Z"),
        row(4, "3", "Credit", "10", "2025-03-01T00:00:00Z", "2026-03-01T00:00:00Z"),
        now=t(2025, 4, 1),
    )
    account = result.account
    assert account.overdraft == 0 and account.book_balance == 7
    [first, second] = account.lots
    assert (first.remaining, second.remaining) == (0, 7)
    assert [e.overdraft_change for e in account.new_entries] == [0, 3, -3]


def test_a_lot_expires_at_its_own_expiry_and_a_matching_expired_row_is_no_mismatch():
    result = replayed(
        row(2, "1", "Credit", "10", "2024-01-01T00:00:00Z", "2024-04-01T00:00:00Z"),
        row(3, "2", "Debit", "-4", "2024-02-01T00:00:00Z"),
        row(4, "3", "Expired", "-6", "2024-04-15T00:00:00Z"),
    )
    expired = [e for e in result.account.new_entries if e.kind is EntryKind.EXPIRED]
    assert [(e.credits, e.occurred_at) for e in expired] == [(-6, t(2024, 4, 1))]
    assert result.mismatches == [] and result.account.book_balance == 0


def test_an_expired_row_our_rules_disagree_with_is_a_mismatch_and_our_rules_win():
    result = replayed(
        row(2, "1", "Credit", "10", "2024-01-01T00:00:00Z", "2024-04-01T00:00:00Z"),
        row(3, "2", "Expired", "-10", "2024-03-15T00:00:00Z"),  # before its lot expired
        row(4, "3", "Credit", "5", "2024-05-01T00:00:00Z", "2025-05-01T00:00:00Z"),
        now=t(2024, 6, 1),
    )
    [mismatch] = result.mismatches
    assert (mismatch.line, mismatch.old_expired, mismatch.replayed) == (3, 10, 0)
    assert result.account.book_balance == 5


def test_one_expired_row_for_several_lots_matches_their_total():
    result = replayed(
        row(2, "1", "Credit", "10", "2024-01-01T00:00:00Z", "2024-04-01T00:00:00Z"),
        row(3, "2", "Credit", "4", "2024-01-02T00:00:00Z", "2024-04-02T00:00:00Z"),
        row(4, "3", "Expired", "-14", "2024-05-01T00:00:00Z"),
    )
    assert result.mismatches == []


def test_a_positive_adjustment_lives_credit_expiration_months_and_a_negative_one_spends():
    result = replay(
        "c1",
        [row(2, "1", "Adjusted", "5", "2025-01-31T12:00:00Z"), row(3, "2", "Adjusted", "-2", "2025-02-01T12:00:00Z")],
        CreditPolicy(credit_expiration_months=1),
        t(2025, 2, 10),
        "sweep:test",
    )
    [lot] = result.account.lots
    assert lot.expires_at == datetime(2025, 2, 28, 12, tzinfo=UTC) and lot.remaining == 3
    assert [e.kind for e in result.account.new_entries] == [EntryKind.ADJUSTED, EntryKind.ADJUSTED]


def test_rows_at_the_same_moment_apply_in_id_order_numerically():
    same = "2025-01-01T00:00:00Z"
    # Given out of order; Id 9 (the Debit) comes before Id 10 (the Credit): 9 < 10 as numbers.
    credit = row(2, "10", "Credit", "5", same, "2026-01-01T00:00:00Z")
    debit = row(3, "9", "Debit", "-5", same)
    result = replayed(credit, debit, now=t(2025, 2, 1))
    assert [e.kind for e in result.account.new_entries] == [EntryKind.DEBITED, EntryKind.ISSUED]
    assert result.account.new_entries[0].overdraft_change == 5


def test_what_is_due_at_import_time_expires_with_an_entry_as_the_sweep_would():
    result = replayed(row(2, "1", "Credit", "10", "2025-01-01T00:00:00Z", "2025-06-01T00:00:00Z"))
    last = result.account.new_entries[-1]
    assert (last.kind, last.credits, last.occurred_at, last.event_id) == (
        EntryKind.EXPIRED,
        -10,
        t(2025, 6, 1),
        "sweep:test",
    )


def test_every_lot_is_kept_for_writing_spent_ones_too():
    result = replayed(
        row(2, "1", "Credit", "5", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
        row(3, "2", "Debit", "-5", "2025-01-02T00:00:00Z"),
        row(4, "3", "Credit", "5", "2025-01-03T00:00:00Z", "2026-01-03T00:00:00Z"),
    )
    assert [lot.remaining for lot in result.account.lots] == [0, 0]  # the second expired by NOW


@pytest.mark.parametrize("seed", range(25))
def test_replay_agrees_with_the_independent_oracle_of_the_old_system(seed):
    rng = random.Random(seed)
    history, expected = member_history(rng, "m1", Ids(), NOW - timedelta(days=3 * 365), NOW, rng.randint(1, 80))
    rows = [parse_row(line, old.fields()) for line, old in enumerate(reversed(history), start=2)]
    result = replayed(*rows)
    assert result.account.book_balance == expected
    assert result.mismatches == []


def test_the_worked_example_of_docs_migration():
    lines = [
        "4,m-17,Debit,-12,2025-03-10T09:00:00-04:00,",
        "1,m-17,Credit,10,2024-01-15T10:00:00-05:00,2025-01-15T10:00:00-05:00",
        "2,m-17,Debit,-4,2024-06-01T12:00:00-04:00,",
        "3,m-17,Credit,8,2025-02-01T10:00:00-05:00,2026-02-01T10:00:00-05:00",
        "5,m-17,Expired,-6,2025-01-20T08:00:00-05:00,",
        "6,m-17,Adjusted,5,2025-04-01T12:00:00-04:00,",
    ]
    rows = [parse_row(number, line.split(",")) for number, line in enumerate(lines, start=2)]
    result = replay("m-17", rows, POLICY, t(2025, 5, 1), "sweep:test")
    assert result.mismatches == [] and result.account.book_balance == 1 and result.account.overdraft == 0
    expired = [e for e in result.account.new_entries if e.kind is EntryKind.EXPIRED]
    assert [(e.credits, e.occurred_at) for e in expired] == [(-6, t(2025, 1, 15, 15))]
    assert result.account.lots[-1].expires_at == t(2026, 4, 1, 16)
