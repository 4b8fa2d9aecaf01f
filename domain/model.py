"""The credit account aggregate: lots, holds, overdraft and the append-only entries they produce.

Every method takes the moment it applies at (the event's own time), never reads a clock,
and first *catches up* to that moment: lots that expired by then are expired and holds
that lapsed by then are lapsed, each as an entry at its own expiry time. So expired
credit is never spendable, whether or not the periodic sweep has run yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from domain.errors import (
    CreditLimitExceeded,
    HoldConflict,
    InsufficientCredits,
    JobAlreadyCharged,
    MembershipIsFrozen,
    PaymentAlreadyApplied,
    PaymentNotApplied,
)
from domain.events import CreditsDepleted, CreditsRestored, DomainEvent
from domain.limits import MAX_BALANCE, MAX_CREDITS_PER_EVENT, MAX_OVERDRAFT
from domain.policy import CreditPolicy


class LotSource(StrEnum):
    PAYMENT = "payment"
    ADJUSTMENT = "adjustment"
    GIFT = "gift"


class EntryKind(StrEnum):
    ISSUED = "issued"
    DEBITED = "debited"
    CAPTURED = "captured"
    EXPIRED = "expired"
    ADJUSTED = "adjusted"
    HELD = "held"
    RELEASED = "released"
    LAPSED = "lapsed"
    #: Credits a refunded or disputed payment had issued, taken back.
    REVERSED = "reversed"
    #: Credits given to (−) or received from (+) another customer.
    GIFTED = "gifted"

    @property
    def moves_balance(self) -> bool:
        """Hold entries change what is *available*, not the balance."""
        return self not in (EntryKind.HELD, EntryKind.RELEASED, EntryKind.LAPSED)


class HoldStatus(StrEnum):
    ACTIVE = "active"
    CAPTURED = "captured"
    RELEASED = "released"
    LAPSED = "lapsed"


@dataclass(eq=False)
class Lot:
    """One issuance of credits. ``id`` is None until the lot is stored."""

    amount: int
    remaining: int
    issued_at: datetime
    expires_at: datetime
    source: LotSource
    event_id: str
    id: int | None = None
    #: The payment that issued the lot (payment lots only): a payment issues credits once.
    payment_id: str | None = None
    #: What the payment paid, in cents, when known.
    paid_cents: int | None = None
    #: Credits of this lot taken back because its payment was refunded or disputed.
    reversed: int = 0
    #: Credits of this lot that expired unused (and that no reversal has written off yet).
    expired: int = 0

    def sort_key(self) -> tuple:
        # Consumption order (expires_at, issued_at, id); unsaved lots are newer than saved ones.
        return (self.expires_at, self.issued_at, self.id is None, self.id or 0)

    def spendable_at(self, at: datetime) -> bool:
        return self.remaining > 0 and self.expires_at > at


@dataclass(eq=False)
class Hold:
    job_id: str
    credits: int
    placed_at: datetime
    expires_at: datetime
    status: HoldStatus = HoldStatus.ACTIVE
    closed_at: datetime | None = None
    id: int | None = None

    def active_at(self, at: datetime) -> bool:
        return self.status is HoldStatus.ACTIVE and self.expires_at > at


@dataclass(frozen=True)
class Movement:
    """Credits an entry took from (or, for an issuance, put into) one lot."""

    lot: Lot
    credits: int


@dataclass(frozen=True)
class Entry:
    """One append-only ledger line.

    ``credits`` is signed for balance-moving kinds (issued/adjusted +, debited/captured/
    expired −) and is the held amount for hold kinds. ``overdraft_change`` is how much
    the entry added to (+) or repaid from (−) the overdraft.
    """

    kind: EntryKind
    credits: int
    balance_after: int
    occurred_at: datetime
    event_id: str
    job_id: str | None = None
    movements: tuple[Movement, ...] = ()
    overdraft_change: int = 0
    note: str | None = None


@dataclass(frozen=True)
class CreditView:
    """What a customer's credits look like at one moment."""

    customer_id: str
    at: datetime
    balance: int
    available: int
    lots: tuple[Lot, ...]
    holds: tuple[Hold, ...]
    credits_depleted_at: datetime | None
    frozen_since: datetime | None = None

    @property
    def can_schedule(self) -> bool:
        return self.available >= 1 and self.frozen_since is None


@dataclass(eq=False)
class Account:
    """A customer's credits. Holds only open state: lots with credit left, active holds.

    ``charged_jobs`` holds the job ids (among those the caller asked about) that have
    already been charged; the repository fills it so the double-charge rule lives here.
    Likewise the lots of payments the caller asked about are loaded even when spent, so
    that a payment issues credits once and its reversal knows what it issued.
    """

    customer_id: str
    lots: list[Lot] = field(default_factory=list)
    holds: dict[str, Hold] = field(default_factory=dict)
    overdraft: int = 0
    depleted_at: datetime | None = None
    #: While frozen, nothing expires; unfreezing moves every open lot's expiry by the pause.
    frozen_since: datetime | None = None
    #: When the last pause ended: an older freeze or unfreeze reported late is recognised.
    unfrozen_at: datetime | None = None
    charged_jobs: set[str] = field(default_factory=set)
    new_entries: list[Entry] = field(default_factory=list)
    changed_lots: list[Lot] = field(default_factory=list)
    changed_holds: list[Hold] = field(default_factory=list)
    #: What happened (depleted, restored), in order, until the service layer collects it.
    events: list[DomainEvent] = field(default_factory=list)

    # ----------------------------------------------------------------- reading

    @property
    def book_balance(self) -> int:
        """Credit left in every stored lot minus overdraft: what the entries sum to."""
        return sum(lot.remaining for lot in self.lots) - self.overdraft

    def balance(self, at: datetime) -> int:
        return sum(lot.remaining for lot in self.lots if self._spendable(lot, at)) - self.overdraft

    def _spendable(self, lot: Lot, at: datetime) -> bool:
        # While frozen, a lot that would have expired during the pause is still held (not yet
        # moved: that happens at unfreezing, when the pause's length is known).
        return lot.spendable_at(min(at, self.frozen_since) if self.frozen_since is not None else at)

    def held(self, at: datetime) -> int:
        return sum(hold.credits for hold in self.holds.values() if hold.active_at(at))

    def available(self, at: datetime) -> int:
        return self.balance(at) - self.held(at)

    def view(self, at: datetime) -> CreditView:
        """The account as of ``at``, with due expiries applied in memory."""
        self.catch_up(at, event_id="view")
        return CreditView(
            customer_id=self.customer_id,
            at=at,
            balance=self.balance(at),
            available=self.available(at),
            lots=tuple(sorted((lot for lot in self.lots if self._spendable(lot, at)), key=Lot.sort_key)),
            holds=tuple(sorted((h for h in self.holds.values() if h.active_at(at)), key=lambda h: h.placed_at)),
            credits_depleted_at=self.depleted_at,
            frozen_since=self.frozen_since,
        )

    # ---------------------------------------------------------------- changing

    def catch_up(self, at: datetime, event_id: str) -> None:
        """Expire lots and lapse holds that are due by ``at``, each at its own expiry time."""
        # One time-ordered pass, so entries read chronologically (lapses move no balance,
        # so their place among the expiries changes no depletion time). A frozen membership
        # expires only what was due before the freeze.
        expiry_cutoff = min(at, self.frozen_since) if self.frozen_since is not None else at
        due: list[tuple[tuple, Lot | Hold]] = [
            ((lot.expires_at, 0, *lot.sort_key()), lot)
            for lot in self.lots
            if lot.remaining > 0 and lot.expires_at <= expiry_cutoff
        ]
        due += [
            ((hold.expires_at, 1, hold.placed_at, hold.job_id), hold)
            for hold in self.holds.values()
            if hold.status is HoldStatus.ACTIVE and hold.expires_at <= at
        ]
        for _, item in sorted(due, key=lambda pair: pair[0]):
            if isinstance(item, Lot):
                self._take(
                    EntryKind.EXPIRED, item.expires_at, event_id, [Movement(item, item.remaining)], note="expired"
                )
            else:
                self._close_hold(item, HoldStatus.LAPSED, item.expires_at, event_id)

    def issue(
        self,
        credits: int,
        at: datetime,
        event_id: str,
        policy: CreditPolicy,
        source: LotSource = LotSource.PAYMENT,
        note: str | None = None,
        payment_id: str | None = None,
        paid_cents: int | None = None,
        expires_at: datetime | None = None,
    ) -> Lot:
        """Create a lot. Outstanding overdraft is repaid from it first.

        ``expires_at`` is for a lot that brings its own expiry (imported history); by default
        the policy dates it."""
        _require_positive(credits)
        if payment_id is not None and self.payment_lot(payment_id) is not None:
            raise PaymentAlreadyApplied(
                f"payment {payment_id!r} of customer {self.customer_id!r} has already issued its credits"
            )
        self.catch_up(at, event_id)
        if source is LotSource.PAYMENT and policy.carry_limit is not None:
            self._expire_over_cap(policy.carry_limit, at, event_id)
        self._require_room_for(credits)
        before = self.book_balance
        expiry = expires_at if expires_at is not None else policy.expiry_for(at)
        lot = Lot(credits, credits, at, expiry, source, event_id, payment_id=payment_id, paid_cents=paid_cents)
        repaid = min(self.overdraft, credits)
        lot.remaining -= repaid
        self.overdraft -= repaid
        self.lots.append(lot)
        self.changed_lots.append(lot)
        kind = EntryKind.ISSUED if source is LotSource.PAYMENT else EntryKind.ADJUSTED
        self._record(
            kind,
            credits,
            at,
            event_id,
            movements=(Movement(lot, credits),),
            overdraft_change=-repaid,
            note=note,
            before=before,
        )
        return lot

    def debit(
        self, credits: int, at: datetime, event_id: str, job_id: str | None = None, note: str | None = None
    ) -> Entry:
        """Spend credits oldest-first; a shortfall becomes overdraft rather than being dropped."""
        _require_positive(credits)
        self.catch_up(at, event_id)
        return self._spend(EntryKind.DEBITED, credits, at, event_id, job_id, note)

    def adjust(self, credits: int, at: datetime, event_id: str, policy: CreditPolicy, note: str) -> None:
        """An admin correction: positive issues an adjustment lot, negative spends like a debit."""
        if credits == 0:
            raise ValueError("an adjustment must change the balance")
        _require_positive(abs(credits))
        if credits > 0:
            self.issue(credits, at, event_id, policy, source=LotSource.ADJUSTMENT, note=note)
        else:
            self.catch_up(at, event_id)
            self._spend(EntryKind.ADJUSTED, -credits, at, event_id, None, note)

    def complete_job(self, job_id: str, credits: int, at: datetime, event_id: str) -> Entry:
        """Charge a completed job once: capture its hold if one is active, else debit directly."""
        _require_positive(credits)
        if job_id in self.charged_jobs:
            raise JobAlreadyCharged(f"job {job_id!r} of customer {self.customer_id!r} has already been charged")
        self.catch_up(at, event_id)
        hold = self.holds.get(job_id)
        if hold is not None and hold.status is HoldStatus.ACTIVE:
            self._close_hold(hold, HoldStatus.CAPTURED, at, event_id, record=False)
            entry = self._spend(EntryKind.CAPTURED, credits, at, event_id, job_id, None)
        else:
            entry = self._spend(EntryKind.DEBITED, credits, at, event_id, job_id, None)
        self.charged_jobs.add(job_id)
        return entry

    def payment_lot(self, payment_id: str) -> Lot | None:
        return next((lot for lot in self.lots if lot.payment_id == payment_id), None)

    def reverse_payment(
        self, payment_id: str, total_reversed: int, at: datetime, event_id: str, note: str
    ) -> Entry | None:
        """Take back what a refunded or disputed payment issued, up to ``total_reversed`` credits in all.

        ``total_reversed`` is cumulative (a second partial refund states the new total), so
        replays and reordered reports never take back more than the payment issued. The
        credits come out of the payment's own lot first; what was already spent is taken from
        the customer's other credits, oldest first, and what nothing covers becomes overdraft.
        Past entries are never rewritten. Returns the new entry, or None if nothing was left to take.
        """
        _require_positive(total_reversed)
        lot = self.payment_lot(payment_id)
        if lot is None:
            raise PaymentNotApplied(
                f"payment {payment_id!r} of customer {self.customer_id!r} has issued no credits (yet)"
            )
        credits = min(total_reversed, lot.amount) - lot.reversed
        if credits <= 0:
            return None
        self.catch_up(at, event_id)
        lot.reversed += credits
        self.changed_lots.append(lot)
        movements: list[Movement] = []
        if self._spendable(lot, at):
            movements.append(Movement(lot, min(lot.remaining, credits)))
        left = credits - sum(m.credits for m in movements)
        written_off = min(lot.expired, left)
        lot.expired -= written_off
        if written_off:
            note = f"{note}; {written_off} of its credits had expired unused"
        others, shortfall = self._oldest_first(left - written_off, at, skip=lot)
        return self._take(EntryKind.REVERSED, at, event_id, movements + others, shortfall=shortfall, note=note)

    def freeze(self, at: datetime, event_id: str) -> bool:
        """Pause the membership: nothing expires, nothing can be booked. Returns whether it changed."""
        if self.frozen_since is not None:
            return False
        if self.unfrozen_at is not None and at < self.unfrozen_at:
            # A pause that already ended, reported late (its unfreeze came first): applying it
            # now would freeze the membership for good. Ignored; what expired meanwhile stays.
            return False
        self.catch_up(at, event_id)
        self.frozen_since = at
        return True

    def unfreeze(self, at: datetime, event_id: str) -> timedelta | None:
        """End the pause: every open lot that had not expired when it began expires that much later.
        Returns the pause's length, or None if the membership was not frozen."""
        if self.frozen_since is None:
            # Not frozen: a repeated unfreeze, or one that overtook its freeze. Remember it, so
            # that freeze, arriving late, does not freeze the membership for good.
            if self.unfrozen_at is None or at > self.unfrozen_at:
                self.unfrozen_at = at
            return None
        for lot in self.lots:
            if lot.remaining > 0 and lot.expires_at > self.frozen_since:
                # A lot issued during the pause moves only by the part of it that it lived through.
                lot.expires_at += max(at - max(self.frozen_since, lot.issued_at), timedelta(0))
                self.changed_lots.append(lot)
        pause = max(at - self.frozen_since, timedelta(0))
        self.frozen_since = None
        self.unfrozen_at = at
        self.catch_up(at, event_id)
        return pause

    def give(self, credits: int, to: Account, at: datetime, event_id: str) -> list[Lot]:
        """Gift credits: taken oldest-first from what this customer has available, given as new
        lots that keep each original expiry date. Never more than is available (no overdraft)."""
        _require_positive(credits)
        if to is self or to.customer_id == self.customer_id:
            raise ValueError("a customer cannot gift credits to themselves")
        for account in (self, to):
            if account.frozen_since is not None:
                raise MembershipIsFrozen(
                    f"customer {account.customer_id!r} is frozen: no gifts to or from a paused membership"
                )
        self.catch_up(at, event_id)
        to.catch_up(at, event_id)
        available = self.available(at)
        if credits > available:
            raise InsufficientCredits(self.customer_id, credits, available)
        to._require_room_for(credits)
        movements, shortfall = self._oldest_first(credits, at)
        assert shortfall == 0
        self._take(EntryKind.GIFTED, at, event_id, movements, note=f"gift to {to.customer_id}")
        return [
            to._receive(m.credits, m.lot.expires_at, at, event_id, f"gift from {self.customer_id}") for m in movements
        ]

    def _receive(self, credits: int, expires_at: datetime, at: datetime, event_id: str, note: str) -> Lot:
        self._require_room_for(credits)
        before = self.book_balance
        lot = Lot(credits, credits, at, expires_at, LotSource.GIFT, event_id)
        repaid = min(self.overdraft, credits)
        lot.remaining -= repaid
        self.overdraft -= repaid
        self.lots.append(lot)
        self.changed_lots.append(lot)
        self._record(
            EntryKind.GIFTED,
            credits,
            at,
            event_id,
            movements=(Movement(lot, credits),),
            overdraft_change=-repaid,
            note=note,
            before=before,
        )
        return lot

    def place_hold(self, job_id: str, credits: int, at: datetime, event_id: str, policy: CreditPolicy) -> Hold:
        """Reserve credits for a booked job. Placing the same hold twice returns the first."""
        _require_positive(credits)
        if self.frozen_since is not None:
            raise MembershipIsFrozen(f"customer {self.customer_id!r} has paused their membership: unfreeze it to book")
        self.catch_up(at, event_id)
        if job_id in self.charged_jobs:
            raise JobAlreadyCharged(f"job {job_id!r} of customer {self.customer_id!r} has already been charged")
        existing = self.holds.get(job_id)
        if existing is not None and existing.active_at(at):
            if existing.credits != credits:
                raise HoldConflict(f"job {job_id!r} already holds {existing.credits} credit(s), not {credits}")
            return existing
        available = self.available(at)
        if available < credits:
            raise InsufficientCredits(self.customer_id, credits, available)
        hold = Hold(job_id, credits, at, policy.hold_expiry_for(at))
        self.holds[job_id] = hold
        self.changed_holds.append(hold)
        self._record(EntryKind.HELD, credits, at, event_id, job_id=job_id, before=self.book_balance)
        return hold

    def release_hold(self, job_id: str, at: datetime, event_id: str) -> bool:
        """Release a job's active hold (job cancelled). Returns whether there was one."""
        self.catch_up(at, event_id)
        hold = self.holds.get(job_id)
        if hold is None or hold.status is not HoldStatus.ACTIVE:
            return False
        self._close_hold(hold, HoldStatus.RELEASED, at, event_id)
        return True

    # ---------------------------------------------------------------- internals

    def _spend(
        self, kind: EntryKind, credits: int, at: datetime, event_id: str, job_id: str | None, note: str | None
    ) -> Entry:
        movements, shortfall = self._oldest_first(credits, at)
        return self._take(kind, at, event_id, movements, job_id=job_id, shortfall=shortfall, note=note)

    def _require_room_for(self, credits: int) -> None:
        if self.book_balance + credits > MAX_BALANCE:
            raise CreditLimitExceeded(
                f"customer {self.customer_id!r} holds {self.book_balance} credit(s): {credits} more would pass the largest balance, {MAX_BALANCE}"
            )

    def _expire_over_cap(self, cap: int, at: datetime, event_id: str) -> None:
        excess = sum(lot.remaining for lot in self.lots if self._spendable(lot, at)) - cap
        if excess > 0:
            movements, _ = self._oldest_first(excess, at)
            self._take(EntryKind.EXPIRED, at, event_id, movements, note=f"over rollover cap of {cap}")

    def _oldest_first(self, credits: int, at: datetime, skip: Lot | None = None) -> tuple[list[Movement], int]:
        """Plan taking ``credits`` from lots spendable at ``at``, oldest first; returns what no lot covers."""
        movements = []
        left = credits
        for lot in sorted((lot for lot in self.lots if self._spendable(lot, at) and lot is not skip), key=Lot.sort_key):
            if left == 0:
                break
            take = min(lot.remaining, left)
            movements.append(Movement(lot, take))
            left -= take
        return movements, left

    def _take(
        self,
        kind: EntryKind,
        at: datetime,
        event_id: str,
        movements: list[Movement],
        job_id: str | None = None,
        shortfall: int = 0,
        note: str | None = None,
    ) -> Entry:
        if self.overdraft + shortfall > MAX_OVERDRAFT:
            raise CreditLimitExceeded(
                f"customer {self.customer_id!r} owes {self.overdraft} credit(s): {shortfall} more would pass the largest overdraft, {MAX_OVERDRAFT}"
            )
        before = self.book_balance
        for movement in movements:
            movement.lot.remaining -= movement.credits
            if kind is EntryKind.EXPIRED:
                movement.lot.expired += movement.credits
            self.changed_lots.append(movement.lot)
        self.overdraft += shortfall
        credits = sum(m.credits for m in movements) + shortfall
        return self._record(
            kind,
            -credits,
            at,
            event_id,
            job_id=job_id,
            movements=tuple(movements),
            overdraft_change=shortfall,
            note=note,
            before=before,
        )

    def _close_hold(self, hold: Hold, status: HoldStatus, at: datetime, event_id: str, record: bool = True) -> None:
        hold.status = status
        hold.closed_at = at
        self.changed_holds.append(hold)
        if record:
            kind = EntryKind.LAPSED if status is HoldStatus.LAPSED else EntryKind.RELEASED
            self._record(kind, hold.credits, at, event_id, job_id=hold.job_id, before=self.book_balance)

    def _record(
        self,
        kind: EntryKind,
        credits: int,
        at: datetime,
        event_id: str,
        *,
        before: int,
        job_id: str | None = None,
        movements: tuple[Movement, ...] = (),
        overdraft_change: int = 0,
        note: str | None = None,
    ) -> Entry:
        after = self.book_balance
        if before > 0 >= after:
            self.depleted_at = at
            self.events.append(CreditsDepleted(self.customer_id, at))
        elif after > 0 and self.depleted_at is not None:
            self.events.append(CreditsRestored(self.customer_id, self.depleted_at, at))
            self.depleted_at = None
        entry = Entry(kind, credits, after, at, event_id, job_id, movements, overdraft_change, note)
        self.new_entries.append(entry)
        return entry


def _require_positive(credits: int) -> None:
    if credits <= 0:
        raise ValueError(f"credits must be positive, got {credits}")
    if credits > MAX_CREDITS_PER_EVENT:
        raise CreditLimitExceeded(f"{credits} credits in one event: at most {MAX_CREDITS_PER_EVENT} may move at once")
