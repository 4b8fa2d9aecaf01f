"""Dunning: what happens to an unpaid subscription invoice until it is paid or given up on.

A *case* opens at an invoice's first failed payment and follows one bounded retry
schedule counted from that first failure. Automatic retries stop at a hard decline
(only a new payment method can help) or when the customer must authenticate; the
customer's own "retry now" and a payment-method update charge at once without using
up a scheduled attempt. Payment at any point ends the case. Like the ledger, every
rule takes its moment explicitly and never reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


class DunningStatus(StrEnum):
    RETRYING = "retrying"  # scheduled retries ahead
    ACTION_REQUIRED = "action_required"  # the customer must authenticate the payment (3-D Secure)
    NEEDS_PAYMENT_METHOD = "needs_payment_method"  # hard decline: retrying the same card cannot help
    PAST_DUE = "past_due"  # the schedule is exhausted; membership past due
    RECOVERED = "recovered"  # paid
    CLOSED = "closed"  # the invoice was voided or written off at the provider

    @property
    def is_open(self) -> bool:
        return self not in (DunningStatus.RECOVERED, DunningStatus.CLOSED)


class AttemptKind(StrEnum):
    SCHEDULED = "scheduled"
    CUSTOMER = "customer"  # the customer's "retry now"
    PAYMENT_METHOD = "payment_method"  # a new default payment method


class AttemptOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    DECLINED = "declined"
    ACTION_REQUIRED = "action_required"
    #: The invoice no longer needs paying (voided or written off at the provider).
    CLOSED = "closed"


#: Decline codes that no retry of the same payment method can turn into a payment
#: (Stripe's decline-code reference: the card is lost, stolen, closed, wrong or the
#: authorisation was revoked). The customer has to give a new payment method.
HARD_DECLINE_CODES = frozenset(
    {
        "card_not_supported",
        "currency_not_supported",
        "do_not_try_again",
        "expired_card",
        "fraudulent",
        "incorrect_cvc",
        "incorrect_number",
        "incorrect_zip",
        "invalid_account",
        "invalid_cvc",
        "invalid_expiry_month",
        "invalid_expiry_year",
        "invalid_number",
        "lost_card",
        "merchant_blacklist",
        "new_account_information_available",
        "pickup_card",
        "restricted_card",
        "revocation_of_all_authorizations",
        "revocation_of_authorization",
        "security_violation",
        "service_not_allowed",
        "stolen_card",
        "stop_payment_order",
        "transaction_not_allowed",
    }
)


def is_hard_decline(decline_code: str | None) -> bool:
    return decline_code in HARD_DECLINE_CODES


@dataclass(frozen=True)
class RetrySchedule:
    """Days after the first failure on which the scheduled retries fall: 3-5 retries within 7-14 days."""

    days: tuple[int, ...] = (1, 3, 7, 14)

    def __post_init__(self) -> None:
        if not 3 <= len(self.days) <= 5:
            raise ValueError(f"the retry schedule needs 3 to 5 attempts, got {len(self.days)}")
        if self.days[0] < 1 or any(b <= a for a, b in zip(self.days, self.days[1:], strict=False)):
            raise ValueError(
                f"retry days must be whole days after the first failure, strictly increasing from 1: {self.days}"
            )
        if not 7 <= self.days[-1] <= 14:
            raise ValueError(f"the last retry must fall 7 to 14 days after the first failure, not {self.days[-1]}")

    @property
    def attempts(self) -> int:
        return len(self.days)

    def retry_at(
        self, first_failed_at: datetime, attempts_made: int, not_before: datetime | None = None
    ) -> datetime | None:
        """When the next scheduled retry is due, or None when the schedule is used up.

        ``not_before``: automatic charges of a card stay at least MIN_RETRY_GAP apart even when
        the schedule's dates are past (a failure reported late, a collector catching up).
        """
        if attempts_made >= len(self.days):
            return None
        due = first_failed_at + timedelta(days=self.days[attempts_made])
        return max(due, not_before) if not_before is not None else due

    def ends_at(self, first_failed_at: datetime) -> datetime:
        """The schedule's last day: a case still unpaid then is past due, whatever stopped it."""
        return first_failed_at + timedelta(days=self.days[-1])


#: Card networks penalise hammering a card: automatic retries are at least this far apart.
MIN_RETRY_GAP = timedelta(days=1)


@dataclass(frozen=True)
class RetryNowLimit:
    """How often a customer may make us charge at once ("retry now", a new payment method)."""

    max_attempts: int = 3
    window: timedelta = timedelta(hours=1)

    def retry_after(self, recent: list[datetime], now: datetime) -> timedelta | None:
        """None if one more immediate charge is allowed now; else how long until it is."""
        in_window = sorted(at for at in recent if at > now - self.window)
        if len(in_window) < self.max_attempts:
            return None
        return in_window[-self.max_attempts] + self.window - now


@dataclass(frozen=True)
class DunningRules:
    schedule: RetrySchedule = RetrySchedule()
    retry_now: RetryNowLimit = RetryNowLimit()


@dataclass(eq=False)
class DunningCase:
    """One unpaid invoice of one customer, from its first failed payment until it is settled."""

    customer_id: str
    invoice_id: str
    first_failed_at: datetime
    status: DunningStatus = DunningStatus.RETRYING
    attempts_made: int = 0  # scheduled attempts only
    next_retry_at: datetime | None = None
    last_failure_at: datetime | None = None
    last_decline_code: str | None = None
    last_failure_message: str | None = None
    hosted_invoice_url: str | None = None
    subscription_id: str | None = None
    closed_at: datetime | None = None
    subscription_cancelled_at: datetime | None = None
    id: int | None = None

    @classmethod
    def open(cls, customer_id: str, invoice_id: str, failed_at: datetime, schedule: RetrySchedule) -> DunningCase:
        return cls(customer_id, invoice_id, failed_at, next_retry_at=schedule.retry_at(failed_at, 0))

    # ---------------------------------------------------------------- reading

    def attempts_left(self, schedule: RetrySchedule) -> int:
        return max(schedule.attempts - self.attempts_made, 0) if self.status is DunningStatus.RETRYING else 0

    def is_due(self, now: datetime) -> bool:
        return self.status is DunningStatus.RETRYING and self.next_retry_at is not None and self.next_retry_at <= now

    @property
    def owes(self) -> bool:
        return self.status.is_open

    # ---------------------------------------------------------------- changing

    def payment_failed(
        self, at: datetime, decline_code: str | None, message: str | None, schedule: RetrySchedule
    ) -> None:
        """The provider reports a failed charge (its own, or the outcome of one of ours)."""
        if not self.owes:
            return  # paid or closed: a late failure report never reopens it
        if at < self.first_failed_at:
            # An earlier failure reported late: the schedule counts from the first one.
            self.first_failed_at = at
            if self.status is DunningStatus.RETRYING:
                self.next_retry_at = schedule.retry_at(at, self.attempts_made)
        if not self._is_latest_failure(at):
            return
        self._note_failure(at, decline_code, message)
        if is_hard_decline(decline_code):
            self._stop(DunningStatus.NEEDS_PAYMENT_METHOD)

    def action_required(self, at: datetime, message: str | None = None) -> None:
        """The bank wants the customer to authenticate: retrying without them would fail again."""
        if not self.owes or not self._is_latest_failure(at):
            return
        self._note_failure(
            at, "authentication_required", message or "the bank asks the customer to confirm this payment"
        )
        self._stop(DunningStatus.ACTION_REQUIRED)

    def attempt_failed(
        self,
        kind: AttemptKind,
        outcome: AttemptOutcome,
        at: datetime,
        decline_code: str | None,
        message: str | None,
        schedule: RetrySchedule,
    ) -> None:
        """One of our own charges was declined or needs authentication.

        Our own answer from the provider decides the state; only the failure *note* defers
        to a newer report. A soft decline never resumes retrying over a newer report that
        said retrying cannot help.
        """
        if not self.owes:
            return
        if kind is AttemptKind.SCHEDULED:
            self.attempts_made += 1
        latest = self._is_latest_failure(at)
        if outcome is AttemptOutcome.ACTION_REQUIRED:
            self._note_failure(
                at, "authentication_required", message or "the bank asks the customer to confirm this payment"
            )
            self._stop(DunningStatus.ACTION_REQUIRED)
            return
        self._note_failure(at, decline_code, message)
        if self.status is DunningStatus.PAST_DUE:
            return  # the schedule has ended: only payment or closing the invoice leaves past due
        if is_hard_decline(decline_code):
            self._stop(DunningStatus.NEEDS_PAYMENT_METHOD)
            return
        if self.status in (DunningStatus.NEEDS_PAYMENT_METHOD, DunningStatus.ACTION_REQUIRED) and (
            kind is AttemptKind.SCHEDULED or not latest
        ):
            return  # only a charge the customer asked for, answered after it, resumes the schedule
        # Soft decline: carry on with what is left of the schedule (also after a new
        # payment method that was soft-declined), or give up when it is used up.
        # Automatic charges keep their distance from the last one (and from a new card's decline
        # when retrying resumes); a customer's own retry leaves the schedule where it was.
        if kind is not AttemptKind.SCHEDULED and self.status is DunningStatus.RETRYING:
            return
        next_at = schedule.retry_at(self.first_failed_at, self.attempts_made, not_before=at + MIN_RETRY_GAP)
        if next_at is None:
            self._stop(DunningStatus.PAST_DUE)
        else:
            self.status = DunningStatus.RETRYING
            self.next_retry_at = next_at

    def schedule_ended(self, now: datetime, schedule: RetrySchedule) -> bool:
        """A case that stopped retrying (hard decline, authentication) and is still unpaid when
        the schedule ends is past due like an exhausted one. Returns whether it became so now."""
        if self.status in (
            DunningStatus.NEEDS_PAYMENT_METHOD,
            DunningStatus.ACTION_REQUIRED,
        ) and now >= schedule.ends_at(self.first_failed_at):
            self._stop(DunningStatus.PAST_DUE)
            return True
        return False

    def paid(self, at: datetime) -> bool:
        """The invoice is paid. Returns whether that closed the case now."""
        if not self.owes:
            return False
        self._stop(DunningStatus.RECOVERED)
        self.closed_at = at
        return True

    def close(self, at: datetime, reason: str) -> None:
        """The invoice was voided or written off: nothing is owed any more."""
        if self.owes:
            self._stop(DunningStatus.CLOSED)
            self.closed_at = at
            self.last_failure_message = reason

    def subscription_cancelled(self, at: datetime) -> None:
        self.subscription_cancelled_at = at

    # ---------------------------------------------------------------- internals

    def _is_latest_failure(self, at: datetime) -> bool:
        return self.last_failure_at is None or at >= self.last_failure_at

    def _note_failure(self, at: datetime, decline_code: str | None, message: str | None) -> None:
        if self._is_latest_failure(at):
            self.last_failure_at = at
            self.last_decline_code = decline_code
            self.last_failure_message = message

    def _stop(self, status: DunningStatus) -> None:
        # Past due is where the schedule ended: only payment or closing the invoice leaves it
        # (a later decline must not hide it from the report or the end action).
        if self.status is DunningStatus.PAST_DUE and status.is_open:
            return
        self.status = status
        self.next_retry_at = None
