"""An in-memory unit of work for fast unit tests of the use cases (service_layer/ports.py).

It lives with the tests, beside tests/fake_stripe.py, not in ``service_layer``: nothing in
production may ever run on it, and the image ships only the production packages.

``FakeStore`` plays the database: it holds committed state. ``FakeUnitOfWork`` works on a copy
of it and puts the copy back on ``commit()``, so a refused event leaves nothing behind, as a
rolled-back transaction does. The account repository keeps what PostgreSQL keeps (every lot,
hold and entry) and hands out what ``SqlAccountRepository`` loads: live lots and active holds,
the spent lots of the payments asked about, the charged jobs asked about. Locks are not
modelled (one task at a time); what only PostgreSQL can show stays in the integration tests.
The referral repository knows a programme with no referrers (codes are unknown): the referral
rules themselves are tested in test_referral_rules.py and against PostgreSQL.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from itertools import count

from domain import Account, Entry, EntryKind, Hold, HoldStatus, Lot
from domain.dunning import AttemptKind, DunningCase
from domain.notifications import Notice
from domain.referrals import Party, Referral, ReferralStatus
from messages import Event
from service_layer.errors import EventConflict

CHARGES = (EntryKind.DEBITED, EntryKind.CAPTURED)


@dataclass
class StoredAccount:
    customer_id: str
    lots: list[Lot] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)
    overdraft: int = 0
    depleted_at: datetime | None = None
    frozen_since: datetime | None = None
    unfrozen_at: datetime | None = None


@dataclass
class FakeStore:
    """What the database holds, committed."""

    accounts: dict[str, StoredAccount] = field(default_factory=dict)
    entries: list[tuple[str, Entry]] = field(default_factory=list)
    processed: dict[str, str] = field(default_factory=dict)  # event id → fingerprint
    notifications: dict[str, tuple[Notice, datetime]] = field(default_factory=dict)  # key → (notice, queued at)
    cases: dict[str, DunningCase] = field(default_factory=dict)
    attempts: list[dict] = field(default_factory=list)
    profiles: dict[str, Party] = field(default_factory=dict)
    referrers: set[str] = field(default_factory=set)
    codes: dict[str, str] = field(default_factory=dict)
    referrals: list[Referral] = field(default_factory=list)
    ids: count = field(default_factory=lambda: count(1))
    commits: int = 0

    def entries_of(self, customer_id: str) -> list[Entry]:
        return [entry for owner, entry in self.entries if owner == customer_id]

    def notices(self) -> list[Notice]:
        return [notice for notice, _ in self.notifications.values()]


class FakeAccountRepository:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def lock_many(
        self,
        customer_ids: Sequence[str],
        job_ids: Mapping[str, Iterable[str]],
        payment_ids: Mapping[str, Iterable[str]] = {},
        wait_at_most: timedelta | None = None,
        create: Collection[str] | None = None,
    ) -> list[Account]:
        for customer_id in customer_ids:
            if customer_id not in self.store.accounts and (create is None or customer_id in create):
                self.store.accounts[customer_id] = StoredAccount(customer_id)
        return [
            self._load(customer_id, set(job_ids.get(customer_id, ())), set(payment_ids.get(customer_id, ())))
            for customer_id in sorted(set(customer_ids))
            if customer_id in self.store.accounts
        ]

    async def lock_available(self, customer_ids: Sequence[str]) -> list[Account]:
        return await self.lock_many(customer_ids, {}, create=())

    async def get(self, customer_id: str) -> Account | None:
        [account] = await self.lock_many([customer_id], {}, create=()) or [None]
        return account

    def _load(self, customer_id: str, job_ids: set[str], payment_ids: set[str]) -> Account:
        row = self.store.accounts[customer_id]
        charged = {e.job_id for e in self.store.entries_of(customer_id) if e.kind in CHARGES and e.job_id in job_ids}
        return Account(
            customer_id=customer_id,
            lots=[lot for lot in row.lots if lot.remaining > 0 or lot.payment_id in payment_ids],
            holds={hold.job_id: hold for hold in row.holds if hold.status is HoldStatus.ACTIVE},
            overdraft=row.overdraft,
            depleted_at=row.depleted_at,
            frozen_since=row.frozen_since,
            unfrozen_at=row.unfrozen_at,
            charged_jobs=charged,
        )

    async def save_many(self, accounts: Sequence[Account]) -> None:
        for account in accounts:
            row = self.store.accounts[account.customer_id]
            for item, stored in [
                *((lot, row.lots) for lot in account.changed_lots),
                *((hold, row.holds) for hold in account.changed_holds),
            ]:
                if item.id is None:
                    item.id = next(self.store.ids)
                    stored.append(item)
            if len({hold.job_id for hold in row.holds if hold.status is HoldStatus.ACTIVE}) != sum(
                h.status is HoldStatus.ACTIVE for h in row.holds
            ):
                raise AssertionError("two active holds for one job (uq_holds_active_job)")
            self.store.entries += [(account.customer_id, entry) for entry in account.new_entries]
            row.overdraft, row.depleted_at = account.overdraft, account.depleted_at
            row.frozen_since, row.unfrozen_at = account.frozen_since, account.unfrozen_at
            account.new_entries.clear()
            account.changed_lots.clear()
            account.changed_holds.clear()

    async def customers_with_due_lots(self, now: datetime, limit: int, exclude: Iterable[str] = ()) -> list[str]:
        due = [
            (lot.expires_at, row.customer_id)
            for row in self._unfrozen(exclude)
            for lot in row.lots
            if lot.remaining > 0 and lot.expires_at <= now
        ]
        return list(dict.fromkeys(customer_id for _, customer_id in sorted(due)[:limit]))

    async def customers_with_due_holds(self, now: datetime, limit: int, exclude: Iterable[str] = ()) -> list[str]:
        due = [
            (h.expires_at, row.customer_id)
            for row in self._unfrozen(exclude)
            for h in row.holds
            if h.status is HoldStatus.ACTIVE and h.expires_at <= now
        ]
        return list(dict.fromkeys(customer_id for _, customer_id in sorted(due)[:limit]))

    def _unfrozen(self, exclude: Iterable[str]) -> list[StoredAccount]:
        excluded = set(exclude)
        return [
            row for row in self.store.accounts.values() if row.frozen_since is None and row.customer_id not in excluded
        ]


class FakeEventLog:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def claim_new(self, events: Sequence[Event]) -> set[str]:
        new = set()
        for event in events:
            if event.event_id not in self.store.processed:
                self.store.processed[event.event_id] = event.fingerprint()
                new.add(event.event_id)
        return new

    async def claim(self, event: Event) -> bool:
        if await self.claim_new([event]):
            return True
        if self.store.processed[event.event_id] != event.fingerprint():
            raise EventConflict(
                f"event_id {event.event_id!r} was already applied with a different payload; refusing to apply this one"
            )
        return False

    async def seen(self, event_id: str) -> bool:
        return event_id in self.store.processed


class FakeNotificationOutbox:
    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def enqueue(self, notice: Notice, now: datetime) -> bool:
        return notice.key in await self.enqueue_many([(notice, now)])

    async def enqueue_many(self, queued: Sequence[tuple[Notice, datetime]]) -> set[str]:
        new = {notice.key for notice, _ in queued if notice.key not in self.store.notifications}
        for notice, at in queued:
            self.store.notifications.setdefault(notice.key, (notice, at))
        return new


class FakeDunningRepository:
    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.new_attempt_ids: list[int] = []

    async def get(self, invoice_id: str, *, for_update: bool = True) -> DunningCase | None:
        return self.store.cases.get(invoice_id)

    async def add(self, case: DunningCase) -> None:
        case.id = next(self.store.ids)
        self.store.cases[case.invoice_id] = case

    async def save(self, case: DunningCase) -> None:
        self.store.cases[case.invoice_id] = case

    async def cases_of(
        self, customer_id: str, *, open_only: bool = True, for_update: bool = False
    ) -> list[DunningCase]:
        return [
            case
            for case in self.store.cases.values()
            if case.customer_id == customer_id and (case.owes or not open_only)
        ]

    async def immediate_attempt_times(self, customer_id: str, since: datetime) -> list[datetime]:
        immediate = (AttemptKind.CUSTOMER, AttemptKind.PAYMENT_METHOD)
        return [
            a["at"]
            for a in self.store.attempts
            if a["customer_id"] == customer_id and a["kind"] in immediate and a["at"] >= since
        ]

    async def add_attempt(
        self,
        case: DunningCase,
        kind: AttemptKind,
        now: datetime,
        *,
        payment_method_id: str | None = None,
        not_before: datetime | None = None,
    ) -> int | None:
        if kind is AttemptKind.PAYMENT_METHOD and any(
            a["case"] == case.invoice_id and a["kind"] is kind and a["method"] == payment_method_id
            for a in self.store.attempts
        ):
            return None  # a card change sends two events: one charge
        attempt_id = next(self.store.ids)
        self.store.attempts.append(
            {
                "id": attempt_id,
                "case": case.invoice_id,
                "customer_id": case.customer_id,
                "kind": kind,
                "at": now,
                "method": payment_method_id,
                "not_before": not_before,
            }
        )
        self.new_attempt_ids.append(attempt_id)
        return attempt_id


class FakeReferralRepository:
    """A referral programme with no referrers: sign-ups are recorded, every code is unknown."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def record_profile(
        self,
        customer_id: str,
        email: str | None,
        phone: str | None,
        fingerprint: str | None,
        at: datetime,
        contact_email: str | None = None,
    ) -> None:
        self.store.profiles[customer_id] = Party(
            customer_id, email, phone, frozenset({fingerprint} if fingerprint else ())
        )

    async def add_referrer(self, details) -> bool:
        new = details.referrer_id not in self.store.referrers
        self.store.referrers.add(details.referrer_id)
        return new

    async def add_code(self, referrer_id: str, name_hint: str | None, code: str | None = None) -> str:
        code = code or f"CODE{next(self.store.ids)}"
        self.store.codes[code] = referrer_id
        return code

    async def code(self, code: str) -> None:
        return None  # no referrer's code is known (see the class)

    async def party(self, customer_id: str | None) -> Party:
        return self.store.profiles.get(customer_id or "", Party(customer_id))

    async def has_paid_before(self, customer_id: str, before: datetime, except_payment: str | None = None) -> bool:
        lots = self.store.accounts[customer_id].lots if customer_id in self.store.accounts else []
        return any(lot.payment_id and lot.payment_id != except_payment and lot.issued_at < before for lot in lots)

    async def referred_customers_with_fingerprint(self, fingerprints: frozenset[str], excluding: str) -> int:
        return 0

    async def attributed(self, customer_id: str, *, for_update: bool = True) -> Referral | None:
        return next(
            (
                r
                for r in self.store.referrals
                if r.referred_customer_id == customer_id and r.status is not ReferralStatus.REJECTED
            ),
            None,
        )

    async def by_qualifying_payment(self, payment_id: str) -> Referral | None:
        return None  # no referral ever qualifies without a referrer

    async def add(self, referral: Referral) -> None:
        self.store.referrals.append(replace(referral))


class FakeUnitOfWork:
    """A transaction over a FakeStore: changes are kept only if ``commit()`` is called."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    async def __aenter__(self) -> FakeUnitOfWork:
        self._working = copy.deepcopy(self.store)
        self.accounts = FakeAccountRepository(self._working)
        self.events = FakeEventLog(self._working)
        self.notifications = FakeNotificationOutbox(self._working)
        self.dunning = FakeDunningRepository(self._working)
        self.referrals = FakeReferralRepository(self._working)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._working = None

    async def commit(self) -> None:
        self._working.commits += 1
        self.store.__dict__.update(copy.deepcopy(self._working).__dict__)
