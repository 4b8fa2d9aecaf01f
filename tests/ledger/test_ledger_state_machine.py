"""Stateful property test: one Account against an independent, deliberately naive model.

Hypothesis drives a single account through payments, adjustments, debits, job completions,
holds, releases, views and clock moves. The clock never runs backwards, but now and then an
event arrives late (its time is before the clock). After every step the account has to agree
with the model on every lot, the overdraft, every hold, every entry, the balance and available
credit at several moments, and depleted_at; and its entries have to reconcile.

A refused command (JobAlreadyCharged, HoldConflict, InsufficientCredits) is rolled back on both
sides, as the unit of work does in production, so the model only has to say *that* it is refused.
"""

from __future__ import annotations

import calendar
import copy
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from domain import (
    Account,
    CreditPolicy,
    DomainError,
    Entry,
    EntryKind,
    HoldConflict,
    InsufficientCredits,
    JobAlreadyCharged,
)

UTC = UTC
# Just before a month end, so month arithmetic clamps (Jan 29/30/31 + 1 month = Feb 28) and
# lots issued on different days often share an expiry.
START = datetime(2025, 1, 28, tzinfo=UTC)
JOBS = [f"job-{n}" for n in range(6)]
SPENDING_KINDS = (EntryKind.DEBITED, EntryKind.CAPTURED)

# --------------------------------------------------------------------------- the model


def months_later(moment: datetime, months: int) -> datetime:
    """Calendar months on, clamped to the month's last day (written without dateutil)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


@dataclass
class ModelLot:
    index: int  # position in Account.lots (lots are only ever appended)
    amount: int
    remaining: int
    issued_at: datetime
    expires_at: datetime

    def key(self) -> tuple:
        return (self.expires_at, self.issued_at, self.index)


@dataclass
class ModelHold:
    credits: int
    placed_at: datetime
    expires_at: datetime
    status: str = "active"


@dataclass
class Model:
    months: int
    ttl: timedelta
    cap: int | None
    lots: list[ModelLot] = field(default_factory=list)
    overdraft: int = 0
    holds: dict[str, ModelHold] = field(default_factory=dict)
    charged: set[str] = field(default_factory=set)
    depleted_at: datetime | None = None
    #: expected entries: (kind, credits, occurred_at, balance_after, job_id)
    log: list[tuple] = field(default_factory=list)

    # reading
    @property
    def book(self) -> int:
        return sum(lot.remaining for lot in self.lots) - self.overdraft

    def spendable(self, at: datetime) -> list[ModelLot]:
        return sorted((lot for lot in self.lots if lot.remaining > 0 and lot.expires_at > at), key=ModelLot.key)

    def balance(self, at: datetime) -> int:
        return sum(lot.remaining for lot in self.spendable(at)) - self.overdraft

    def active_holds(self, at: datetime) -> dict[str, ModelHold]:
        return {job: h for job, h in self.holds.items() if h.status == "active" and h.expires_at > at}

    def held(self, at: datetime) -> int:
        return sum(h.credits for h in self.active_holds(at).values())

    # bookkeeping
    def _moved(self, kind: str, credits: int, at: datetime, before: int, job_id: str | None = None) -> None:
        """A balance change: apply the depletion rule and log the entry."""
        after = self.book
        if before > 0 >= after:
            self.depleted_at = at
        elif after > 0:
            self.depleted_at = None
        self.log.append((kind, credits, at, after, job_id))

    def _hold_entry(self, kind: str, job: str, hold: ModelHold, at: datetime) -> None:
        self.log.append((kind, hold.credits, at, self.book, job))

    def _drain(self, credits: int, at: datetime) -> int:
        """Take up to ``credits`` from spendable lots, oldest first; return what was not there."""
        left = credits
        for lot in self.spendable(at):
            take = min(lot.remaining, left)
            lot.remaining -= take
            left -= take
            if left == 0:
                break
        return left

    # rules
    def catch_up(self, at: datetime) -> None:
        # Expiries and lapses in time order; at the same instant, expiries first.
        due: list[tuple] = [
            ((lot.expires_at, 0) + lot.key(), "lot", lot)
            for lot in self.lots
            if lot.remaining > 0 and lot.expires_at <= at
        ]
        due += [
            ((h.expires_at, 1, h.placed_at, job), job, h)
            for job, h in self.holds.items()
            if h.status == "active" and h.expires_at <= at
        ]
        for _, job, item in sorted(due, key=lambda entry: entry[0]):
            if job == "lot":
                before, amount = self.book, item.remaining
                item.remaining = 0
                self._moved("expired", -amount, item.expires_at, before)
            else:
                item.status = "lapsed"
                self._hold_entry("lapsed", job, item, item.expires_at)

    def issue(self, credits: int, at: datetime, payment: bool) -> None:
        self.catch_up(at)
        if payment and self.cap is not None:
            excess = sum(lot.remaining for lot in self.spendable(at)) - self.cap
            if excess > 0:
                before = self.book
                assert self._drain(excess, at) == 0
                self._moved("expired", -excess, at, before)
        before = self.book
        repaid = min(self.overdraft, credits)
        self.overdraft -= repaid
        self.lots.append(ModelLot(len(self.lots), credits, credits - repaid, at, months_later(at, self.months)))
        self._moved("issued" if payment else "adjusted", credits, at, before)

    def spend(self, kind: str, credits: int, at: datetime, job_id: str | None = None) -> None:
        before = self.book
        self.overdraft += self._drain(credits, at)
        self._moved(kind, -credits, at, before, job_id)

    def debit(self, credits: int, at: datetime, job_id: str | None) -> None:
        self.catch_up(at)
        self.spend("debited", credits, at, job_id)

    def adjust(self, credits: int, at: datetime) -> None:
        if credits > 0:
            self.issue(credits, at, payment=False)
        else:
            self.catch_up(at)
            self.spend("adjusted", -credits, at)

    def complete_job(self, job: str, credits: int, at: datetime) -> None:
        if job in self.charged:
            raise JobAlreadyCharged(job)
        self.catch_up(at)
        hold = self.holds.get(job)
        if hold is not None and hold.status == "active":
            hold.status = "captured"
            self.spend("captured", credits, at, job)
        else:
            self.spend("debited", credits, at, job)
        self.charged.add(job)

    def place_hold(self, job: str, credits: int, at: datetime) -> bool:
        """Returns whether a new hold was placed (False: the identical one already was)."""
        self.catch_up(at)
        if job in self.charged:
            raise JobAlreadyCharged(job)
        existing = self.active_holds(at).get(job)
        if existing is not None:
            if existing.credits != credits:
                raise HoldConflict(job)
            return False
        if self.balance(at) - self.held(at) < credits:
            raise InsufficientCredits("c", credits, self.balance(at) - self.held(at))
        self.holds[job] = hold = ModelHold(credits, at, at + self.ttl)
        self._hold_entry("held", job, hold, at)
        return True

    def release_hold(self, job: str, at: datetime) -> bool:
        self.catch_up(at)
        hold = self.holds.get(job)
        if hold is None or hold.status != "active":
            return False
        hold.status = "released"
        self._hold_entry("released", job, hold, at)
        return True


# --------------------------------------------------------------------------- strategies

# Whole days, so lots issued at month ends often share an expiry (Jan 29, 30, 31 -> Feb 28).
_forward = st.one_of(st.integers(0, 2), st.integers(0, 20)).map(lambda days: timedelta(days=days))
_late = st.one_of(st.integers(1, 3), st.integers(1, 120)).map(lambda days: -timedelta(days=days))
#: How an event's time relates to the clock: mostly moving it forward, one in eight late.
WHEN = st.tuples(st.integers(0, 7), _forward, _late).map(lambda c: c[2] if c[0] == 0 else c[1])
PAYMENT = st.integers(1, 20)
CHARGE = st.integers(1, 8)
ADJUSTMENT = st.one_of(st.integers(-8, -1), st.integers(1, 10))


# --------------------------------------------------------------------------- the machine


class LedgerMachine(RuleBasedStateMachine):
    capped = False

    def __init__(self) -> None:
        super().__init__()
        self.account: Account | None = None
        self.model: Model | None = None
        self.now = START
        self.serial = 0

    @initialize(
        months=st.integers(1, 3), ttl_days=st.integers(1, 40), cap=st.integers(0, 15), opening=st.integers(0, 30)
    )
    def open_account(self, months: int, ttl_days: int, cap: int, opening: int) -> None:
        # An unlimited policy is given a cap too: it must be ignored.
        self.policy = CreditPolicy(
            credit_expiration_months=months,
            allow_unlimited_rollover=not self.capped,
            rollover_cap=cap,
            hold_ttl_days=ttl_days,
        )
        self.account = Account(customer_id="cust-sm")
        self.model = Model(months, timedelta(days=ttl_days), cap if self.capped else None)
        if opening:
            self.model.issue(opening, self.now, payment=True)
            self.account.issue(opening, self.now, self._event_id(), self.policy)

    # helpers
    def _at(self, when: timedelta) -> datetime:
        if when >= timedelta(0):
            self.now += when
            return self.now
        event("late event")
        return self.now + when  # a late event: the clock stays where it is

    def _event_id(self) -> str:
        self.serial += 1
        return f"ev-{self.serial}"

    def _refused_or_applied(self, on_model, on_account):
        """Run a command that may be refused on a copy of the model first.

        Refused: the account must refuse it the same way; both sides are rolled back.
        """
        trial = copy.deepcopy(self.model)
        try:
            outcome = on_model(trial)
        except DomainError as expected:
            snapshot = copy.deepcopy(self.account)
            with pytest.raises(type(expected)):
                on_account()
            self.account = snapshot
            return None, None
        self.model = trial
        return outcome, on_account()

    def _check_spend(self, entry: Entry, at: datetime) -> None:
        """Right after a spend: it drew oldest-first from lots spendable at ``at`` and skipped none."""
        position = {id(lot): i for i, lot in enumerate(self.account.lots)}

        def key(lot):
            return (lot.expires_at, lot.issued_at, position[id(lot)])

        assert entry.occurred_at == at
        assert sum(m.credits for m in entry.movements) + entry.overdraft_change == -entry.credits
        for movement in entry.movements:
            assert movement.credits > 0
            assert movement.lot.expires_at > at
        keys = [key(m.lot) for m in entry.movements]
        assert keys == sorted(keys) and len(set(keys)) == len(keys)
        for movement in entry.movements[:-1]:
            assert movement.lot.remaining == 0, "moved on to a younger lot before this one was empty"
        still_spendable = [lot for lot in self.account.lots if lot.spendable_at(at)]
        if entry.overdraft_change > 0:
            assert still_spendable == [], "overdrew while credit was spendable"
        elif entry.movements:
            last = keys[-1]
            assert all(key(lot) >= last for lot in still_spendable), "skipped an older lot"

    # rules
    @rule(when=WHEN, credits=PAYMENT)
    def pay(self, when: timedelta, credits: int) -> None:
        at = self._at(when)
        self.model.issue(credits, at, payment=True)
        lot = self.account.issue(credits, at, self._event_id(), self.policy)
        assert lot is self.account.lots[-1]
        if any(other is not lot and other.expires_at == lot.expires_at for other in self.account.lots):
            event("lots share an expiry")
        if any(e.note and e.note.startswith("over rollover cap") for e in self.account.new_entries[-2:]):
            event("credit over the rollover cap expired")

    @rule(data=st.data(), credits=PAYMENT)
    def late_pay_sharing_an_expiry(self, data: st.DataObject, credits: int) -> None:
        """A late payment whose lot expires together with a live one issued after it.

        Month-end clamping (Jan 29, 30, 31 + 1 month = Feb 28) and policy changes make such
        ties; only issued_at (then id) decides which lot is spent first.
        """
        months = self.model.months
        times = sorted(
            {
                self.now - timedelta(days=days)
                for lot in self.model.lots
                if lot.remaining > 0 and lot.expires_at > self.now
                for days in range(1, 121)
                if self.now - timedelta(days=days) < lot.issued_at
                and months_later(self.now - timedelta(days=days), months) == lot.expires_at
            }
        )
        if not times:
            return
        at = data.draw(st.sampled_from(times), label="late payment at")
        event("a lot issued earlier but stored later shares an expiry")
        self.model.issue(credits, at, payment=True)
        self.account.issue(credits, at, self._event_id(), self.policy)

    @rule(months=st.integers(1, 3))
    def change_expiration(self, months: int) -> None:
        """The membership policy changes: lots issued from now on live for a different time."""
        self.policy = replace(self.policy, credit_expiration_months=months)
        self.model.months = months

    @rule(when=WHEN, credits=ADJUSTMENT)
    def adjust(self, when: timedelta, credits: int) -> None:
        at = self._at(when)
        self.model.adjust(credits, at)
        self.account.adjust(credits, at, self._event_id(), self.policy, note="sm")
        if credits < 0:
            self._check_spend(self.account.new_entries[-1], at)

    @rule(when=WHEN, credits=CHARGE)
    def debit(self, when: timedelta, credits: int) -> None:
        at = self._at(when)
        self.model.debit(credits, at, None)
        entry = self.account.debit(credits, at, self._event_id())
        assert entry is self.account.new_entries[-1]
        self._check_spend(entry, at)

    @rule(when=WHEN, job=st.sampled_from(JOBS), credits=CHARGE)
    def complete_job(self, when: timedelta, job: str, credits: int) -> None:
        at = self._at(when)
        event_id = self._event_id()
        _, entry = self._refused_or_applied(
            lambda model: model.complete_job(job, credits, at),
            lambda: self.account.complete_job(job, credits, at, event_id),
        )
        if entry is not None:
            assert entry.kind in SPENDING_KINDS
            self._check_spend(entry, at)

    @rule(when=WHEN, job=st.sampled_from(JOBS), credits=st.integers(1, 4))
    def place_hold(self, when: timedelta, job: str, credits: int) -> None:
        self._place_hold(when, job, credits)

    @rule(data=st.data(), when=_forward, same=st.booleans())
    def place_hold_again(self, data: st.DataObject, when: timedelta, same: bool) -> None:
        """The booking is retried: the identical hold again, or a different amount for the job."""
        active = sorted(self.model.active_holds(self.now + when))
        if not active:
            return
        job = data.draw(st.sampled_from(active), label="job")
        credits = self.model.holds[job].credits
        self._place_hold(when, job, credits if same else credits + data.draw(st.integers(1, 3), label="more"))

    def _place_hold(self, when: timedelta, job: str, credits: int) -> None:
        at = self._at(when)
        event_id = self._event_id()
        entries_before = len(self.account.new_entries)
        created, hold = self._refused_or_applied(
            lambda model: model.place_hold(job, credits, at),
            lambda: self.account.place_hold(job, credits, at, event_id, self.policy),
        )
        if hold is not None:
            assert hold is self.account.holds[job]
            assert hold.credits == credits
            held_entries = [e for e in self.account.new_entries[entries_before:] if e.kind is EntryKind.HELD]
            assert len(held_entries) == (1 if created else 0)
            if not created:
                event("identical hold placed again")

    @rule(when=WHEN, job=st.sampled_from(JOBS))
    def release_hold(self, when: timedelta, job: str) -> None:
        at = self._at(when)
        expected = self.model.release_hold(job, at)
        assert self.account.release_hold(job, at, self._event_id()) is expected

    @rule(days=st.integers(0, 70), hours=st.sampled_from([0, 0, 0, 0, 12]))
    def advance_clock(self, days: int, hours: int) -> None:
        self.now += timedelta(days=days, hours=hours)
        self.model.catch_up(self.now)
        self.account.catch_up(self.now, self._event_id())

    @rule(when=WHEN)
    def view(self, when: timedelta) -> None:
        at = self._at(when)
        self.model.catch_up(at)
        view = self.account.view(at)
        assert view.balance == self.model.balance(at)
        assert view.available == self.model.balance(at) - self.model.held(at)
        assert view.credits_depleted_at == self.model.depleted_at
        position = {id(lot): i for i, lot in enumerate(self.account.lots)}
        assert [position[id(lot)] for lot in view.lots] == [lot.index for lot in self.model.spendable(at)]
        assert sorted(h.job_id for h in view.holds) == sorted(self.model.active_holds(at))

    # invariants
    @precondition(lambda self: self.account is not None)
    @invariant()
    def agrees_with_model(self) -> None:
        account, model = self.account, self.model
        assert len(account.lots) == len(model.lots)
        for lot, expected in zip(account.lots, model.lots, strict=True):
            assert (lot.amount, lot.remaining, lot.issued_at, lot.expires_at) == (
                expected.amount,
                expected.remaining,
                expected.issued_at,
                expected.expires_at,
            )
            assert 0 <= lot.remaining <= lot.amount
        assert account.overdraft == model.overdraft
        assert account.depleted_at == model.depleted_at
        assert {job: (h.credits, h.placed_at, h.expires_at, h.status.value) for job, h in account.holds.items()} == {
            job: (h.credits, h.placed_at, h.expires_at, h.status) for job, h in model.holds.items()
        }
        assert account.charged_jobs == model.charged
        actual_log = [(e.kind.value, e.credits, e.occurred_at, e.balance_after, e.job_id) for e in account.new_entries]
        assert actual_log == model.log

    @precondition(lambda self: self.account is not None)
    @invariant()
    def balance_and_available_at_every_moment(self) -> None:
        account, model = self.account, self.model
        moments = [self.now + timedelta(days=d) for d in (-45, -1, 0, 1, 20, 45, 100)]
        for lot in model.lots:  # both sides of every expiry boundary
            moments += [lot.expires_at - timedelta(seconds=1), lot.expires_at]
        for at in moments:
            assert account.balance(at) == model.balance(at)
            assert account.held(at) == model.held(at)
            assert account.available(at) == account.balance(at) - account.held(at)

    @precondition(lambda self: self.account is not None)
    @invariant()
    def entries_reconcile(self) -> None:
        account = self.account
        moving = [e for e in account.new_entries if e.kind.moves_balance]
        assert sum(e.credits for e in moving) == account.book_balance
        assert account.book_balance == sum(lot.remaining for lot in account.lots) - account.overdraft
        if moving:
            assert moving[-1].balance_after == account.book_balance
        assert all(e.event_id for e in account.new_entries)
        # Overdraft is repaid before any credit is kept, and only arises once credit ran out.
        assert account.overdraft >= 0
        assert account.overdraft == 0 or all(lot.remaining == 0 for lot in account.lots)
        # Every movement of every spend and expiry was from a lot alive at the entry's time, oldest first.
        for entry in account.new_entries:
            if entry.kind in SPENDING_KINDS or (entry.kind.moves_balance and entry.credits < 0):
                keys = [(m.lot.expires_at, m.lot.issued_at) for m in entry.movements]
                assert keys == sorted(keys)
                assert sum(m.credits for m in entry.movements) + entry.overdraft_change == -entry.credits
                for m in entry.movements:
                    assert m.credits > 0
                    if entry.kind is EntryKind.EXPIRED:
                        assert m.lot.expires_at >= entry.occurred_at
                    else:
                        assert m.lot.expires_at > entry.occurred_at


class CappedLedgerMachine(LedgerMachine):
    capped = True


SETTINGS = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestUnlimitedRollover = LedgerMachine.TestCase
TestUnlimitedRollover.settings = SETTINGS
TestCappedRollover = CappedLedgerMachine.TestCase
TestCappedRollover.settings = SETTINGS
