"""Model-based test of the REAL ledger: the service layer over PostgreSQL against a naive model.

Hypothesis drives one customer through payments, debits, holds and captures, cancellations,
adjustments, clock moves with the expiry (and hold-lapse) sweeps, replays of applied events and
same-id/different-payload events, all through ``service_layer.handlers`` and ``SqlUnitOfWork``.
The model below is written independently of ``domain.model`` (it shares only the documented
rules: oldest-first consumption, catch-up of due expiries at each event's own time, overdraft
repaid first, the depletion rule). After every step the database has to agree with it row for
row: the customer row, every lot, every hold, every ledger entry, the idempotency record, what
``credit_view`` shows, and the reconciliation.

The state machine is synchronous; it owns an event loop of its own and a ``Database`` created
on it (asyncpg connections are loop-bound), so it never touches the session loop.
"""

from __future__ import annotations

import asyncio
import calendar
import copy
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select, text

from domain import (
    CreditPolicy,
    DomainError,
    HoldConflict,
    InsufficientCredits,
    JobAlreadyCharged,
)
from infra.db import Database
from infra.db.tables import (
    credit_lots,
    customers,
    holds,
    ledger_entries,
    notifications,
    processed_events,
)
from messages import CreditsAdjusted, JobCancelled, JobCompleted, PaymentSucceeded
from service_layer import events, handlers
from service_layer.errors import CustomerNotFound, EventConflict
from service_layer.handlers import Outcome
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import LEDGER_TABLES, reconciliation
from workers.batching import EventBatcher

#: Slow: Hypothesis drives the real ledger on PostgreSQL through hundreds of steps (~20 s).
pytestmark = pytest.mark.slow

START = datetime(2025, 1, 28, tzinfo=UTC)  # near a month end: month arithmetic clamps, expiries tie
CUSTOMER = "cust-mb"
JOBS = [f"job-{n}" for n in range(4)]


# --------------------------------------------------------------------------- the model


def months_later(moment: datetime, months: int) -> datetime:
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    return moment.replace(year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1]))


@dataclass
class MLot:
    index: int
    amount: int
    remaining: int
    issued_at: datetime
    expires_at: datetime
    expired: int = 0

    def key(self) -> tuple:
        return (self.expires_at, self.issued_at, self.index)


@dataclass
class MHold:
    job: str
    credits: int
    placed_at: datetime
    expires_at: datetime
    status: str = "active"
    closed_at: datetime | None = None


@dataclass
class Model:
    months: int
    ttl: timedelta
    cap: int | None
    exists: bool = False
    lots: list[MLot] = field(default_factory=list)
    overdraft: int = 0
    holds: list[MHold] = field(default_factory=list)  # every hold ever placed, in order
    charged: set[str] = field(default_factory=set)
    payments: set[str] = field(default_factory=set)
    depleted_at: datetime | None = None
    recorded: int = 0  # rows in processed_events
    log: list[tuple] = field(default_factory=list)  # (kind, credits, occurred_at, balance_after, job_id)
    notices: set[str] = field(default_factory=set)  # keys of the notices owed (once per key)

    @property
    def book(self) -> int:
        return sum(lot.remaining for lot in self.lots) - self.overdraft

    def spendable(self, at: datetime) -> list[MLot]:
        return sorted((lot for lot in self.lots if lot.remaining > 0 and lot.expires_at > at), key=MLot.key)

    def balance(self, at: datetime) -> int:
        return sum(lot.remaining for lot in self.spendable(at)) - self.overdraft

    def active(self, at: datetime) -> dict[str, MHold]:
        return {h.job: h for h in self.holds if h.status == "active" and h.expires_at > at}

    def available(self, at: datetime) -> int:
        return self.balance(at) - sum(h.credits for h in self.active(at).values())

    def _moved(self, kind: str, credits: int, at: datetime, before: int, job: str | None = None) -> None:
        after = self.book
        if before > 0 >= after:
            self.depleted_at = at
        elif after > 0:
            self.depleted_at = None
        self.log.append((kind, credits, at, after, job))

    def _drain(self, credits: int, at: datetime, expiring: bool = False) -> int:
        left = credits
        for lot in self.spendable(at):
            if left == 0:
                break
            take = min(lot.remaining, left)
            lot.remaining -= take
            if expiring:
                lot.expired += take
            left -= take
        return left

    def catch_up(self, at: datetime) -> None:
        due = [
            ((lot.expires_at, 0, *lot.key()), lot) for lot in self.lots if lot.remaining > 0 and lot.expires_at <= at
        ]
        due += [
            ((h.expires_at, 1, h.placed_at, h.job), h)
            for h in self.holds
            if h.status == "active" and h.expires_at <= at
        ]
        for _, item in sorted(due, key=lambda pair: pair[0]):
            if isinstance(item, MLot):
                before, amount = self.book, item.remaining
                item.expired += amount
                item.remaining = 0
                self._moved("expired", -amount, item.expires_at, before)
            else:
                item.status, item.closed_at = "lapsed", item.expires_at
                self.log.append(("lapsed", item.credits, item.expires_at, self.book, item.job))

    def issue(self, credits: int, at: datetime, payment: bool) -> None:
        self.exists = True
        self.catch_up(at)
        if payment and self.cap is not None:
            excess = sum(lot.remaining for lot in self.spendable(at)) - self.cap
            if excess > 0:
                before = self.book
                assert self._drain(excess, at, expiring=True) == 0
                self._moved("expired", -excess, at, before)
        before = self.book
        repaid = min(self.overdraft, credits)
        self.overdraft -= repaid
        self.lots.append(MLot(len(self.lots), credits, credits - repaid, at, months_later(at, self.months)))
        self._moved("issued" if payment else "adjusted", credits, at, before)

    def spend(self, kind: str, credits: int, at: datetime, job: str | None = None) -> None:
        before = self.book
        self.overdraft += self._drain(credits, at)
        self._moved(kind, -credits, at, before, job)

    def adjust(self, credits: int, at: datetime) -> None:
        if credits > 0:
            self.issue(credits, at, payment=False)
        else:
            self.exists = True
            self.catch_up(at)
            self.spend("adjusted", -credits, at)

    def complete_job(self, job: str, credits: int, at: datetime) -> None:
        self.exists = True
        if job in self.charged:
            raise JobAlreadyCharged(job)
        self.catch_up(at)
        hold = self.active(at).get(job)
        if hold is not None:
            hold.status, hold.closed_at = "captured", at
            self.spend("captured", credits, at, job)
        else:
            self.spend("debited", credits, at, job)
        self.charged.add(job)

    def place_hold(self, job: str, credits: int, at: datetime) -> bool:
        if not self.exists:
            raise CustomerNotFound(CUSTOMER)
        self.catch_up(at)
        if job in self.charged:
            raise JobAlreadyCharged(job)
        existing = self.active(at).get(job)
        if existing is not None:
            if existing.credits != credits:
                raise HoldConflict(job)
            return False
        if self.available(at) < credits:
            raise InsufficientCredits(CUSTOMER, credits, self.available(at))
        self.holds.append(MHold(job, credits, at, at + self.ttl))
        self.log.append(("held", credits, at, self.book, job))
        return True

    def release_hold(self, job: str, at: datetime, via_event: bool) -> bool:
        if not self.exists and not via_event:
            raise CustomerNotFound(CUSTOMER)
        self.exists = True
        self.catch_up(at)
        hold = self.active(at).get(job)
        if hold is None:
            return False
        hold.status, hold.closed_at = "released", at
        self.log.append(("released", hold.credits, at, self.book, job))
        return True

    def sweep_due(self, at: datetime, lots: bool) -> bool:
        """What a sweep at ``at`` touches: the customer is caught up iff it has a due lot (or hold)."""
        if lots:
            due = any(lot.remaining > 0 and lot.expires_at <= at for lot in self.lots)
        else:
            due = any(h.status == "active" and h.expires_at <= at for h in self.holds)
        if due:
            self.catch_up(at)
        return due


def noticing(on_model):
    """A command, and the notice it owes: the customer's state compared before and after it."""

    def run(model: Model):
        before = model.depleted_at
        result = on_model(model)
        if before is None and model.depleted_at is not None:
            model.notices.add(f"credits_depleted:{CUSTOMER}:{model.depleted_at.isoformat()}")
        elif before is not None and model.depleted_at is None:
            model.notices.add(f"credits_restored:{CUSTOMER}:{before.isoformat()}")
        return result

    return run


# --------------------------------------------------------------------------- strategies

_forward = st.one_of(st.integers(0, 2), st.integers(0, 20)).map(lambda days: timedelta(days=days))
_late = st.integers(1, 60).map(lambda days: -timedelta(days=days))
#: Mostly forward, one event in eight late (its time before the clock).
WHEN = st.tuples(st.integers(0, 7), _forward, _late).map(lambda c: c[2] if c[0] == 0 else c[1])


# --------------------------------------------------------------------------- the machine


class RealLedgerMachine(RuleBasedStateMachine):
    loop: asyncio.AbstractEventLoop
    db: Database

    def __init__(self) -> None:
        super().__init__()
        self.run(_truncate(self.db))
        self.now = START
        self.serial = 0
        self.applied: list = []  # events recorded in processed_events
        self.model: Model | None = None

    # ----------------------------------------------------------- plumbing
    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def uow(self, read_only: bool = False) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.db, read_only=read_only)

    def _next(self) -> str:
        self.serial += 1
        return f"ev-{self.serial}"

    def _at(self, when: timedelta) -> datetime:
        if when >= timedelta(0):
            self.now += when
            return self.now
        return self.now + when

    def _attempt(self, on_model, on_ledger):
        """Run a command on a copy of the model; if the model refuses it, the ledger must refuse it
        the same way (and, rolled back, change nothing). Returns (model result, ledger result)."""
        self._settle_pending()
        trial = copy.deepcopy(self.model)
        try:
            expected = noticing(on_model)(trial)
        except (DomainError, CustomerNotFound) as refusal:
            with pytest.raises(type(refusal)):
                self.run(on_ledger())
            return None, None
        actual = self.run(on_ledger())
        self.model = trial
        return expected, actual

    def _settle_pending(self) -> None:
        """Before a command that is not a batchable event: nothing is held back here (see BatchedLedgerMachine)."""

    def _apply(self, event, on_model) -> None:
        """Apply a new event; the model says what it does (or raises to refuse it)."""

        def model_side(model: Model):
            outcome = on_model(model)
            model.recorded += 1
            return outcome

        async def ledger_side():
            return await handlers.apply_event(event, self.uow(), self.policy)

        expected, outcome = self._attempt(model_side, ledger_side)
        if outcome is not None:
            assert outcome == (expected or Outcome.APPLIED)
            self.applied.append(event)

    # ----------------------------------------------------------- rules
    @initialize(
        months=st.integers(1, 3),
        ttl_days=st.integers(1, 30),
        cap=st.none() | st.integers(0, 15),
        opening=st.integers(0, 20),
    )
    def open_account(self, months: int, ttl_days: int, cap: int | None, opening: int) -> None:
        self.policy = CreditPolicy(
            credit_expiration_months=months,
            allow_unlimited_rollover=cap is None,
            rollover_cap=cap,
            hold_ttl_days=ttl_days,
        )
        self.model = Model(months, timedelta(days=ttl_days), cap)
        if opening:
            self.pay(timedelta(0), opening, reuse=False)

    @rule(when=WHEN, credits=st.integers(1, 20), reuse=st.integers(0, 9).map(lambda n: n == 0))
    def pay(self, when: timedelta, credits: int, reuse: bool) -> None:
        at = self._at(when)
        event_id = self._next()
        if reuse and self.model.payments:
            # A new event for a payment that already issued its credits: recorded, ignored.
            payment_id = min(self.model.payments)

            def on_model(model):
                return Outcome.IGNORED

        else:
            payment_id = f"pay-{event_id}"

            def on_model(model: Model):
                model.issue(credits, at, payment=True)
                model.payments.add(payment_id)

        event = PaymentSucceeded(
            event_id=event_id, occurred_at=at, customer_id=CUSTOMER, payment_id=payment_id, credits=credits
        )
        self._apply(event, on_model)

    @rule(when=WHEN, credits=st.integers(1, 8))
    def debit(self, when: timedelta, credits: int) -> None:
        """A job completed that was never booked (no hold): a direct debit."""
        at = self._at(when)
        event_id = self._next()
        event = JobCompleted(
            event_id=event_id, occurred_at=at, customer_id=CUSTOMER, job_id=f"direct-{event_id}", credits=credits
        )
        self._apply(event, lambda model: model.complete_job(event.job_id, credits, at))

    @rule(when=WHEN, job=st.sampled_from(JOBS), credits=st.integers(1, 6))
    def complete_job(self, when: timedelta, job: str, credits: int) -> None:
        """A booked job completed (captures its hold if active), or one already charged (refused)."""
        at = self._at(when)
        event = JobCompleted(event_id=self._next(), occurred_at=at, customer_id=CUSTOMER, job_id=job, credits=credits)
        self._apply(event, lambda model: model.complete_job(job, credits, at))

    @rule(when=WHEN, job=st.sampled_from(JOBS), credits=st.integers(1, 5))
    def place_hold(self, when: timedelta, job: str, credits: int) -> None:
        at = self._at(when)
        created, result = self._attempt(
            lambda model: model.place_hold(job, credits, at),
            lambda: handlers.place_hold(self.uow(), self.policy, CUSTOMER, job, credits, at),
        )
        if result is not None:
            hold, new = result
            assert new is created
            assert (hold.job_id, hold.credits) == (job, credits)

    @rule(data=st.data(), when=_forward)
    def place_same_hold_again(self, data: st.DataObject, when: timedelta) -> None:
        """A booking retried with the same amount: harmless, no second hold."""
        active = sorted(self.model.active(self.now + when).items())
        if not active:
            return
        job, hold = data.draw(st.sampled_from(active), label="hold")
        self.place_hold(when, job, hold.credits)

    @rule(data=st.data(), after=st.integers(0, 3).map(lambda days: timedelta(days=days)))
    def rebook_after_hold_expired(self, data: st.DataObject, after: timedelta) -> None:
        """The job is booked again once its hold's time to live is over, before any sweep lapsed it."""
        stale = [h for h in self.model.holds if h.status == "active"]
        if not stale:
            return
        hold = data.draw(st.sampled_from(stale), label="expired hold")
        self.now = max(self.now, hold.expires_at + after)
        self.place_hold(timedelta(0), hold.job, hold.credits)

    @rule(when=WHEN, job=st.sampled_from(JOBS), via_event=st.booleans())
    def cancel(self, when: timedelta, job: str, via_event: bool) -> None:
        at = self._at(when)
        if via_event:
            event = JobCancelled(event_id=self._next(), occurred_at=at, customer_id=CUSTOMER, job_id=job)
            self._apply(event, lambda model: model.release_hold(job, at, via_event=True) and None)
        else:
            expected, released = self._attempt(
                lambda model: model.release_hold(job, at, via_event=False),
                lambda: handlers.release_hold(self.uow(), CUSTOMER, job, at),
            )
            assert released is expected

    @rule(when=WHEN, credits=st.one_of(st.integers(-8, -1), st.integers(1, 10)))
    def adjust(self, when: timedelta, credits: int) -> None:
        at = self._at(when)
        event = CreditsAdjusted(
            event_id=self._next(),
            occurred_at=at,
            customer_id=CUSTOMER,
            credits=credits,
            reason="model",
            actor="hypothesis",
        )
        self._apply(event, lambda model: model.adjust(credits, at))

    @rule(
        days=st.integers(0, 80),
        hours=st.sampled_from([0, 0, 0, 12]),
        sweep=st.sampled_from(["expire", "expire", "lapse", "none"]),
    )
    def advance_clock(self, days: int, hours: int, sweep: str) -> None:
        """Time passes; the expiry sweep (or the hold-lapse sweep, or neither) runs at the new time."""
        self._settle_pending()
        self.now += timedelta(days=days, hours=hours)
        if sweep == "none":
            return
        entries_before = len(self.model.log)
        touched = noticing(lambda model: model.sweep_due(self.now, lots=sweep == "expire"))(self.model)
        run = handlers.expire_due_credits if sweep == "expire" else handlers.lapse_due_holds
        result = self.run(run(self.uow, self.now, batch_size=10))
        assert (result.customers, result.entries, result.more) == (
            int(touched),
            len(self.model.log) - entries_before,
            False,
        )

    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """An applied event delivered again (same id, same payload): a duplicate, nothing changes."""
        self._settle_pending()
        if not self.applied:
            return
        event = data.draw(st.sampled_from(self.applied), label="replayed")
        assert self.run(handlers.apply_event(event, self.uow(), self.policy)) == Outcome.DUPLICATE

    @rule(data=st.data(), change=st.sampled_from(["credits", "time", "customer", "job"]))
    def conflicting_replay(self, data: st.DataObject, change: str) -> None:
        """An applied event's id reused with another payload: EventConflict, nothing changes."""
        self._settle_pending()
        if not self.applied:
            return
        event = data.draw(st.sampled_from(self.applied), label="original")
        if change == "credits" and hasattr(event, "credits"):
            update = {"credits": event.credits + 1 if event.credits != -1 else -2}
        elif change == "job" and hasattr(event, "job_id"):
            update = {"job_id": event.job_id + "-other"}
        elif change == "customer":
            update = {"customer_id": "cust-other"}  # must not even create that customer
        else:
            update = {"occurred_at": event.occurred_at + timedelta(minutes=1)}
        variant = event.model_copy(update=update)
        with pytest.raises(EventConflict):
            self.run(handlers.apply_event(variant, self.uow(), self.policy))

    # ----------------------------------------------------------- the check after every step
    async def _read(self) -> dict:
        async with self.db.connect() as connection:
            return {
                "customers": (
                    await connection.execute(
                        select(
                            customers.c.customer_id,
                            customers.c.balance,
                            customers.c.overdraft,
                            customers.c.credits_depleted_at,
                        )
                    )
                ).all(),
                "lots": (
                    await connection.execute(
                        select(
                            credit_lots.c.amount,
                            credit_lots.c.remaining,
                            credit_lots.c.issued_at,
                            credit_lots.c.expires_at,
                            credit_lots.c.expired,
                        ).order_by(credit_lots.c.id)
                    )
                ).all(),
                "holds": (
                    await connection.execute(
                        select(
                            holds.c.job_id,
                            holds.c.credits,
                            holds.c.placed_at,
                            holds.c.expires_at,
                            holds.c.status,
                            holds.c.closed_at,
                        ).order_by(holds.c.id)
                    )
                ).all(),
                "entries": (
                    await connection.execute(
                        select(
                            ledger_entries.c.kind,
                            ledger_entries.c.credits,
                            ledger_entries.c.occurred_at,
                            ledger_entries.c.balance_after,
                            ledger_entries.c.job_id,
                        ).order_by(ledger_entries.c.id)
                    )
                ).all(),
                "processed": (await connection.execute(select(func.count()).select_from(processed_events))).scalar(),
                "notices": set((await connection.execute(select(notifications.c.key))).scalars()),
            }

    @invariant()
    def ledger_agrees_with_model(self) -> None:
        if self.model is None:
            return
        model, stored = self.model, self.run(self._read())
        expected_customers = [(CUSTOMER, model.book, model.overdraft, model.depleted_at)] if model.exists else []
        assert [tuple(row) for row in stored["customers"]] == expected_customers
        # Every lot, consumed oldest first: each remainder equals the model's FIFO remainder.
        assert [tuple(row) for row in stored["lots"]] == [
            (lot.amount, lot.remaining, lot.issued_at, lot.expires_at, lot.expired) for lot in model.lots
        ]
        assert all(row.remaining >= 0 for row in stored["lots"])
        assert [tuple(row) for row in stored["holds"]] == [
            (h.job, h.credits, h.placed_at, h.expires_at, h.status, h.closed_at) for h in model.holds
        ]
        assert [tuple(row) for row in stored["entries"]] == model.log
        assert stored["processed"] == model.recorded
        assert stored["notices"] == model.notices
        assert self.run(reconciliation(self.db)) == []

    @invariant()
    def credit_view_agrees_with_model(self) -> None:
        if self.model is None:
            return
        if not self.model.exists:
            with pytest.raises(CustomerNotFound):
                self.run(handlers.credit_view(self.uow(read_only=True), CUSTOMER, self.now))
            return
        view = self.run(handlers.credit_view(self.uow(read_only=True), CUSTOMER, self.now))
        seen = copy.deepcopy(self.model)
        seen.catch_up(self.now)  # the view applies due expiries in memory
        assert (view.balance, view.available) == (seen.balance(self.now), seen.available(self.now))
        assert [(lot.remaining, lot.expires_at, lot.issued_at) for lot in view.lots] == [
            (lot.remaining, lot.expires_at, lot.issued_at) for lot in seen.spendable(self.now)
        ]
        assert sorted((h.job_id, h.credits) for h in view.holds) == sorted(
            (job, h.credits) for job, h in seen.active(self.now).items()
        )
        assert view.credits_depleted_at == seen.depleted_at


class BatchedLedgerMachine(RealLedgerMachine):
    """The same commands, with the events of the kinds that may share a transaction held back and
    sent together through the workers' EventBatcher, in batches of random sizes with duplicates
    inside them (a repeat of an event of the batch, or of one applied before). A batch applies
    whole, or is split and settled one event at a time by the same path; either way every
    event's outcome, and the ledger after, must be what the model says one at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple] = []  # (event, what the model does with it)

    def _apply(self, event, on_model) -> None:
        if events.batchable(event):
            self.pending.append((event, on_model))
        else:
            super()._apply(event, on_model)

    @rule(data=st.data())
    def repeat_inside_the_batch(self, data: st.DataObject) -> None:
        candidates = self.pending + [(event, None) for event in self.applied if events.batchable(event)]
        if candidates:
            self.pending.append(data.draw(st.sampled_from(candidates), label="repeated"))

    @rule(max_batch=st.integers(1, 8))
    def send_the_batch(self, max_batch: int) -> None:
        self._send(max_batch)

    def _settle_pending(self) -> None:
        self._send(max_batch=8)

    def _send(self, max_batch: int) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        expected = [self._on_model(event, on_model) for event, on_model in pending]
        outcomes = self.run(self._through_batcher([event for event, _ in pending], max_batch))
        for event, want, got in zip([e for e, _ in pending], expected, outcomes, strict=True):
            if isinstance(want, type):
                assert isinstance(got, want), f"{event.event_id}: {got!r}, expected {want.__name__}"
            else:
                assert got == want, f"{event.event_id}: {got!r}, expected {want!r}"

    def _on_model(self, event, on_model):
        """The event's outcome one at a time (a refusal's type), the model moved on by it."""
        if any(event.event_id == seen.event_id for seen in self.applied):
            return Outcome.DUPLICATE
        trial = copy.deepcopy(self.model)
        try:
            result = noticing(on_model)(trial)
        except (DomainError, CustomerNotFound) as refusal:
            return type(refusal)
        trial.recorded += 1
        self.model = trial
        self.applied.append(event)
        return result or Outcome.APPLIED

    async def _through_batcher(self, batch: list, max_batch: int) -> list:
        # One transaction at a time: two in flight on one customer would commit in either order.
        batcher = EventBatcher(
            lambda some: events.apply_events(some, self.uow(), self.policy),
            lambda one: events.apply_event(one, self.uow(), self.policy),
            max_batch=max_batch,
            in_flight=1,
        )
        return await asyncio.gather(*(batcher.apply(event) for event in batch), return_exceptions=True)


#: Every example costs ~0.5 s of real database work, so Hypothesis' shrinker runs into its five-minute
#: limit: by default a failure is reported as generated (the step list is printed, then the error).
#: RELIABILITY_SHRINK=1 shrinks it (minutes), e.g. to a minimal reproduction for a bug report.
PHASES = tuple(Phase) if os.environ.get("RELIABILITY_SHRINK") else (Phase.explicit, Phase.reuse, Phase.generate)


def run_machine(pg_url: str, machine: type[RealLedgerMachine], **overrides) -> None:
    loop = asyncio.new_event_loop()

    db = loop.run_until_complete(_open(pg_url))
    bound = type(machine.__name__, (machine,), {"loop": loop, "db": db})
    options = {
        "max_examples": 25,
        "stateful_step_count": 30,
        "deadline": None,
        "phases": PHASES,
        "suppress_health_check": [HealthCheck.too_slow],
    }
    try:
        run_state_machine_as_test(bound, settings=settings(**{**options, **overrides}))
    finally:
        loop.run_until_complete(db.dispose())
        loop.close()


def test_real_ledger_matches_model(pg_url: str) -> None:
    run_machine(pg_url, RealLedgerMachine)


def test_the_one_apply_path_in_batches_with_duplicates_matches_model(pg_url: str) -> None:
    run_machine(pg_url, BatchedLedgerMachine)


def test_booking_a_job_again_after_its_hold_expired_before_the_lapse_sweep(pg_url: str) -> None:
    """The minimal case the machine finds (BUG: IntegrityError uq_holds_active_job).

    A hold's time to live is over but the lapse sweep (every 15 minutes) has not run yet, so its
    row still says 'active'. Booking the same job again lapses the old hold in memory and places a
    new one; save_many inserts the new hold before updating the old row, which violates the partial
    unique index "one active hold per job" and the booking fails with a database error.
    """
    policy = CreditPolicy(hold_ttl_days=1)

    async def scenario(db: Database) -> None:
        await handlers.apply_event(
            PaymentSucceeded(
                event_id="rebook-pay", occurred_at=START, customer_id=CUSTOMER, payment_id="rebook-pay", credits=10
            ),
            SqlUnitOfWork(db),
            policy,
        )
        first, _ = await handlers.place_hold(SqlUnitOfWork(db), policy, CUSTOMER, "rebooked-job", 2, START)
        later = first.expires_at + timedelta(hours=1)
        second, created = await handlers.place_hold(SqlUnitOfWork(db), policy, CUSTOMER, "rebooked-job", 2, later)
        assert created and second.placed_at == later
        view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), CUSTOMER, later)
        assert (view.balance, view.available) == (10, 8)
        async with db.connect() as connection:
            rows = (await connection.execute(select(holds.c.status, holds.c.closed_at).order_by(holds.c.id))).all()
        assert [tuple(r) for r in rows] == [("lapsed", first.expires_at), ("active", None)]
        assert await reconciliation(db) == []

    loop = asyncio.new_event_loop()
    try:
        db = loop.run_until_complete(_open(pg_url))
        try:
            loop.run_until_complete(_truncate(db))
            loop.run_until_complete(scenario(db))
        finally:
            loop.run_until_complete(db.dispose())
    finally:
        loop.close()


async def _open(pg_url: str) -> Database:
    return Database(pg_url, pool_size=2)


async def _truncate(db: Database) -> None:
    async with db.begin() as connection:
        await connection.execute(text(f"TRUNCATE {LEDGER_TABLES} RESTART IDENTITY CASCADE"))
