"""The service layer's ports: what a use case needs from storage and from the payment provider.

Use cases are written against these Protocols only; ``infra`` provides the PostgreSQL
adapters (``SqlUnitOfWork`` and its repositories) and ``tests/support/fake_ledger.py`` in-memory
ones, so the handlers' rules are tested without a database as well as with one.
Rows that only infra and the read models look into (attempts, payouts) are typed ``Any``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from domain import Account
from domain.dunning import AttemptKind, AttemptOutcome, DunningCase
from domain.notifications import Notice
from domain.referrals import Change, Referral, ReferrerDetails
from messages import Event


class AccountRepository(Protocol):
    async def lock_many(
        self,
        customer_ids: Sequence[str],
        job_ids: Mapping[str, Iterable[str]],
        payment_ids: Mapping[str, Iterable[str]] = {},
        wait_at_most: timedelta | None = None,
        create: Collection[str] | None = None,
    ) -> list[Account]:
        """Create-or-lock in id order and load live state; a missing id not in ``create`` (None: all) is skipped."""
        ...

    async def lock_available(self, customer_ids: Sequence[str]) -> list[Account]: ...
    async def get(self, customer_id: str) -> Account | None: ...
    async def save_many(self, accounts: Sequence[Account]) -> None: ...
    async def customers_with_due_lots(self, now: datetime, limit: int, exclude: Iterable[str] = ()) -> list[str]: ...
    async def customers_with_due_holds(self, now: datetime, limit: int, exclude: Iterable[str] = ()) -> list[str]: ...


class EventLog(Protocol):
    async def claim_new(self, events: Sequence[Event]) -> set[str]: ...
    async def claim(self, event: Event) -> bool: ...
    async def seen(self, event_id: str) -> bool: ...


class NotificationOutbox(Protocol):
    async def enqueue(self, notice: Notice, now: datetime) -> bool: ...
    async def enqueue_many(self, queued: Sequence[tuple[Notice, datetime]]) -> set[str]: ...
    async def claim(self, now: datetime, lease: timedelta, limit: int) -> list: ...
    async def finish(
        self,
        notification_id: int,
        status: str,
        now: datetime,
        error: str | None = None,
        retry_at: datetime | None = None,
        refused: bool = False,
    ) -> None: ...
    async def abandon_stale(self, now: datetime) -> int: ...
    async def lots_expiring(self, now: datetime, until: datetime, limit: int) -> list: ...
    async def mark_warned(self, lots: Sequence[tuple[int, datetime]], now: datetime) -> None: ...


class DunningRepository(Protocol):
    #: Attempts requested in this unit of work: the worker enqueues their charges after commit.
    new_attempt_ids: list[int]

    async def get(self, invoice_id: str, *, for_update: bool = True) -> DunningCase | None: ...
    async def get_by_id(self, case_id: int) -> DunningCase | None: ...
    async def cases_of(
        self, customer_id: str, *, open_only: bool = True, for_update: bool = False
    ) -> list[DunningCase]: ...
    async def add(self, case: DunningCase) -> None: ...
    async def save(self, case: DunningCase) -> None: ...
    async def lock_due(self, now: datetime, limit: int) -> list[DunningCase]: ...
    async def lock_stopped_before(self, first_failed_before: datetime, limit: int) -> list[DunningCase]: ...
    async def lock_to_cancel(self, limit: int) -> list[DunningCase]: ...
    async def add_attempt(
        self,
        case: DunningCase,
        kind: AttemptKind,
        now: datetime,
        *,
        payment_method_id: str | None = None,
        not_before: datetime | None = None,
    ) -> int | None: ...
    async def immediate_attempt_times(self, customer_id: str, since: datetime) -> list[datetime]: ...
    async def claim_attempts(
        self, now: datetime, lease: timedelta, limit: int, attempt_ids: list[int] | None = None
    ) -> list[Any]: ...
    async def finish_attempt(
        self,
        attempt_id: int,
        now: datetime,
        outcome: AttemptOutcome,
        decline_code: str | None = None,
        message: str | None = None,
    ) -> bool: ...
    async def postpone_attempt(self, attempt_id: int, until: datetime, message: str) -> None: ...


class StripeRepository(Protocol):
    async def record_event(
        self,
        event_id: str,
        type_: str,
        created_at: datetime,
        stripe_customer_id: str | None,
        payload: dict,
        now: datetime,
    ) -> bool: ...
    async def set_outcome(
        self, event_id: str, outcome: str, detail: str | None, now: datetime | None = None
    ) -> None: ...
    async def parked_events(
        self,
        stripe_customer_id: str | None = None,
        limit: int = 100,
        *,
        for_update: bool = False,
        event_id: str | None = None,
    ) -> list: ...
    async def customer_for(self, stripe_customer_id: str) -> str | None: ...
    async def map_customer(self, stripe_customer_id: str, customer_id: str) -> str: ...
    async def record_payment(self, invoice_id: str, customer_id: str | None, **known: object) -> None: ...
    async def note_reversal(
        self, invoice_id: str, *, refunded: int | None = None, disputed: int | None = None
    ) -> Any: ...
    async def payment_for(
        self, *, invoice_id: str | None = None, charge_id: str | None = None, payment_intent_id: str | None = None
    ) -> Any: ...


class ReferralRepository(Protocol):
    """Referral programme storage: what the event handlers, the admin tools and the payouts use."""

    async def record_profile(
        self,
        customer_id: str,
        email: str | None,
        phone: str | None,
        fingerprint: str | None,
        at: datetime,
        contact_email: str | None = None,
    ) -> None: ...
    async def party(self, customer_id: str | None) -> Any: ...
    async def add_referrer(self, details: ReferrerDetails) -> bool: ...
    async def update_referrer(self, referrer_id: str, **values: object) -> bool: ...
    async def referrer_row(self, referrer_id: str) -> Any: ...
    async def referrer(self, referrer_id: str) -> Any: ...
    async def add_code(self, referrer_id: str, name_hint: str | None, code: str | None = None) -> str: ...
    async def code(self, code: str) -> Any: ...
    async def set_code_active(self, code: str, active: bool, at: datetime) -> bool: ...
    async def attributed(self, customer_id: str, *, for_update: bool = True) -> Referral | None: ...
    async def by_id(self, referral_id: int, *, for_update: bool = True) -> Referral | None: ...
    async def by_qualifying_payment(self, payment_id: str) -> Referral | None: ...
    async def add(self, referral: Referral) -> None: ...
    async def save(self, referral: Referral, new_changes: Iterable[Change]) -> None: ...
    async def save_many(self, changed: Sequence[tuple[Referral, Sequence[Change]]]) -> None: ...
    async def lock_referrer(self, referrer_id: str) -> None: ...
    async def prior_referrals(self, referrer_id: str, excluding: str | None = None) -> list[Any]: ...
    async def referred_customers_with_fingerprint(self, fingerprints: frozenset[str], excluding: str) -> int: ...
    async def has_paid_before(self, customer_id: str, before: datetime, except_payment: str | None = None) -> bool: ...
    async def first_payment_since(self, customer_id: str, since: datetime) -> Any: ...
    async def lock_due_for_release(self, now: datetime, limit: int) -> list[Referral]: ...
    async def has_clawback(self, referral_id: int) -> bool: ...
    async def add_clawback(self, referral: Referral, amount_cents: int, at: datetime) -> None: ...
    async def payable(self, payee_ids: list[str] | None = None) -> list[Any]: ...
    async def create_payout(
        self, payable: Any, period: str, method: str, gateway: str, currency: str, now: datetime
    ) -> int | None: ...
    async def last_period_number(self, payee_id: str, period_prefix: str) -> int: ...
    async def lock_payouts_to_send(
        self,
        limit: int,
        payout_ids: list[int] | None = None,
        *,
        now: datetime,
        run_started: datetime,
        after: tuple[datetime, int] | None = None,
    ) -> list: ...
    async def payout(self, payout_id: int, *, for_update: bool = True) -> Any: ...
    async def set_payout(self, payout_id: int, **values: object) -> None: ...
    async def withdraw_from_unsent_payout(self, referral: Referral) -> bool: ...
    async def referrals_in_payout(self, payout_id: int) -> list[Referral]: ...


class UnitOfWork(Protocol):
    """One transaction and its repositories: nothing is written unless ``commit()`` is called."""

    accounts: AccountRepository
    events: EventLog
    dunning: DunningRepository
    stripe: StripeRepository
    referrals: ReferralRepository
    notifications: NotificationOutbox

    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def commit(self) -> None: ...


#: What every use case that runs several transactions takes: a fresh unit of work per call.
UnitOfWorkFactory = Callable[[], UnitOfWork]


# ---------------------------------------------------------------- the provider port


@dataclass(frozen=True)
class PaidInvoice:
    """What a successful charge tells the ledger: enough to issue the payment's credits."""

    invoice_id: str
    customer_id: str
    paid_at: datetime
    #: None when the invoice's prices carry no credits we know of (then nothing is issued
    #: here, and the invoice.paid webhook is parked for review with the reason).
    credits: int | None
    amount_cents: int | None = None
    currency: str | None = None


@dataclass(frozen=True)
class ChargeResult:
    outcome: AttemptOutcome
    decline_code: str | None = None
    message: str | None = None
    paid: PaidInvoice | None = None


class ProviderUnavailable(Exception):
    """The provider could not be reached or failed on its side: try the same charge again later."""


class PaymentProvider(Protocol):
    async def pay_invoice(
        self,
        invoice_id: str,
        customer_id: str,
        idempotency_key: str,
        *,
        check_first: bool = False,
        payment_method_id: str | None = None,
        heed_last_decline: bool = True,
    ) -> ChargeResult:
        """Charge an open invoice (with ``payment_method_id`` if given, else its default).

        ``check_first``: read the invoice before charging — a previous try failed on the
        provider's side and may have paid it all the same, or this is the first retry and the
        provider's own first charge may have been a hard decline, which must not be retried
        (when ``heed_last_decline``).
        """
        ...

    async def cancel_subscription(self, subscription_id: str, idempotency_key: str) -> None: ...
