"""Referrals: who referred whom, whether it counts, and the reward's way to a payout.

Pure rules: the caller gathers what they need (the code, both parties' contact details,
the referrer's recent referrals) and passes the moment explicitly.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from rapidfuzz.distance import Levenshtein


class ReferrerKind(StrEnum):
    CUSTOMER = "customer"
    EMPLOYEE = "employee"
    PARTNER = "partner"


class ReferralStatus(StrEnum):
    AWAITING_PAYMENT = "awaiting_payment"  # attributed; the referred customer has not paid yet
    PENDING = "pending"  # qualified; held for refunds and chargebacks
    APPROVED = "approved"  # payable
    IN_PAYOUT = "in_payout"  # snapshotted into a payout being paid
    PAID = "paid"
    REJECTED = "rejected"
    FLAGGED = "flagged"  # qualified, but an admin must approve it first
    VOIDED = "voided"  # its qualifying payment was refunded or disputed before payout

    @property
    def is_unpaid_reward(self) -> bool:
        return self in (
            ReferralStatus.PENDING,
            ReferralStatus.APPROVED,
            ReferralStatus.FLAGGED,
            ReferralStatus.AWAITING_PAYMENT,
        )


# ---------------------------------------------------------------- normalising who someone is

_GMAIL = {"gmail.com", "googlemail.com"}


def normalize_email(email: str | None) -> str | None:
    """One spelling per mailbox: case, +tags, and Gmail's ignored dots (and googlemail.com)."""
    if not email or "@" not in email:
        return None
    local, _, domain = email.strip().lower().rpartition("@")
    local = local.split("+", 1)[0]
    if domain in _GMAIL:
        local, domain = local.replace(".", ""), "gmail.com"
    return f"{local}@{domain}" if local and domain else None


def normalize_phone(phone: str | None) -> str | None:
    """Digits only; a 10-digit North American number gets its country code 1."""
    if not phone:
        return None
    digits = re.sub(r"\D", "", phone)
    if digits.startswith("00"):
        digits = digits[2:]
    if len(digits) == 10:
        digits = "1" + digits
    return digits if len(digits) >= 7 else None


def nearly_identical_emails(a: str, b: str) -> bool:
    """Normalised addresses one edit apart in the local part, same domain: jane1@x / jane2@x."""
    local_a, _, domain_a = a.partition("@")
    local_b, _, domain_b = b.partition("@")
    return (
        a != b
        and domain_a == domain_b
        and min(len(local_a), len(local_b)) >= 4
        and Levenshtein.distance(local_a, local_b) <= 1
    )


# ---------------------------------------------------------------- codes

#: No 0/O, 1/I/L: a code read aloud or from a flyer is typed right.
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_PATTERN = re.compile(rf"^[A-Z]{{0,8}}-?[{CODE_ALPHABET}]{{4,8}}$")


def new_code(name_hint: str | None = None, length: int = 5) -> str:
    """A human-friendly code such as ``JANE-7K3PQ``: a readable prefix and random characters."""
    prefix = re.sub(r"[^A-Z]", "", (name_hint or "").upper())[:8]
    body = "".join(secrets.choice(CODE_ALPHABET) for _ in range(length))
    return f"{prefix}-{body}" if prefix else body


def normalize_code(code: str) -> str:
    return code.strip().upper()


def code_lookup_key(code: str) -> str:
    """How a typed code is matched: case, spaces and hyphens do not matter (JANE7K3PQ = jane-7k3pq)."""
    return re.sub(r"[^A-Z0-9]", "", code.upper())


# ---------------------------------------------------------------- who is who


@dataclass(frozen=True)
class Party:
    """What identifies a person for the self-referral rules (normalised)."""

    customer_id: str | None
    email: str | None = None
    phone: str | None = None
    payment_fingerprints: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Referrer:
    referrer_id: str
    kind: ReferrerKind
    party: Party
    payout_method: str = "manual"
    same_day: bool = False  # opted into same-day (Cash App) payouts


@dataclass(frozen=True)
class ReferrerDetails:
    """A referrer as registered: who they are and how they are paid (emails and phones normalised)."""

    referrer_id: str
    kind: ReferrerKind
    name: str | None = None
    email: str | None = None
    phone: str | None = None
    payout_method: str = "manual"
    same_day: bool = False
    stripe_account_id: str | None = None
    payout_address: str | None = None


@dataclass(frozen=True)
class FraudRules:
    velocity_limit: int = 5  # referrals from one referrer within the window before it is suspicious
    velocity_window: timedelta = timedelta(hours=24)


@dataclass(frozen=True)
class PriorReferral:
    """One of the referrer's earlier referrals, as the fraud rules see it."""

    referred_customer_id: str
    submitted_at: datetime
    email: str | None
    payment_fingerprints: frozenset[str]


@dataclass(frozen=True)
class Verdict:
    status: ReferralStatus  # AWAITING_PAYMENT, or REJECTED
    reason: str | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReferralFacts:
    """What is known about a referral when it is judged."""

    referrer: Referrer | None  # None: the code is unknown
    code_active: bool
    referred: Party
    already_referred: bool = False
    paid_before: bool = False
    prior: Iterable[PriorReferral] = ()
    other_customers_with_fingerprint: int = 0


def judge_referral(facts: ReferralFacts, at: datetime, rules: FraudRules) -> Verdict:
    """Whether a referral stands (and what is suspicious about it), or why it is rejected."""
    referrer, referred = facts.referrer, facts.referred
    if referrer is None:
        return Verdict(ReferralStatus.REJECTED, "unknown referral code")
    if not facts.code_active:
        return Verdict(ReferralStatus.REJECTED, "the referral code is no longer active")
    if facts.already_referred:
        return Verdict(ReferralStatus.REJECTED, "the customer already has a referrer")
    reason = _self_referral(referrer.party, referred)
    if reason:
        return Verdict(ReferralStatus.REJECTED, f"self-referral: {reason}")
    if facts.paid_before:
        return Verdict(ReferralStatus.REJECTED, "the customer had already paid before being referred")
    prior = list(facts.prior)
    flags = []
    recent = [p for p in prior if at - rules.velocity_window < p.submitted_at <= at]
    if len(recent) + 1 > rules.velocity_limit:
        flags.append(f"velocity: {len(recent) + 1} referrals within {_hours(rules.velocity_window)} h")
    if referred.email and referrer.party.email and nearly_identical_emails(referrer.party.email, referred.email):
        flags.append("near-identical email to the referrer's own")
    if referred.email:
        if any(p.email == referred.email for p in prior):
            flags.append("near-identical email: the same mailbox as another referral of this referrer")
        similar = sorted({p.email for p in prior if p.email and nearly_identical_emails(p.email, referred.email)})
        if similar:
            flags.append(f"near-identical email to another referral of this referrer ({similar[0]})")
    shared = {fp for p in prior for fp in p.payment_fingerprints} & referred.payment_fingerprints
    if shared or facts.other_customers_with_fingerprint > 0:
        flags.append("payment card shared with another customer")
    return Verdict(ReferralStatus.AWAITING_PAYMENT, None, tuple(flags))


def _self_referral(referrer: Party, referred: Party) -> str | None:
    if referrer.customer_id is not None and referrer.customer_id == referred.customer_id:
        return "the referrer is the customer"
    if referrer.email and referrer.email == referred.email:
        return "same email address"
    if referrer.phone and referrer.phone == referred.phone:
        return "same phone number"
    if referrer.payment_fingerprints & referred.payment_fingerprints:
        return "same payment card"
    return None


def _hours(window: timedelta) -> int:
    return int(window.total_seconds() // 3600)


# ---------------------------------------------------------------- the reward


@dataclass(frozen=True)
class Change:
    status: ReferralStatus
    at: datetime
    reason: str | None = None


class ReferralRuleError(Exception):
    """A change the referral's state does not allow (an admin approving a paid reward, say)."""


@dataclass(eq=False)
class Referral:
    referred_customer_id: str
    referrer_id: str | None  # None: the code was unknown (a rejected submission)
    code: str | None
    submitted_at: datetime
    status: ReferralStatus
    reason: str | None = None
    flags: tuple[str, ...] = ()
    reward_cents: int | None = None
    qualifying_payment_id: str | None = None
    approve_after: datetime | None = None
    payout_id: int | None = None
    id: int | None = None
    history: list[Change] = field(default_factory=list)

    @classmethod
    def submitted(
        cls, referred_customer_id: str, referrer_id: str | None, code: str | None, at: datetime, verdict: Verdict
    ) -> Referral:
        referral = cls(referred_customer_id, referrer_id, code, at, verdict.status, verdict.reason, verdict.flags)
        referral.history.append(Change(verdict.status, at, verdict.reason or ("; ".join(verdict.flags) or None)))
        return referral

    def qualify(self, payment_id: str, paid_at: datetime, reward_cents: int, hold: timedelta) -> bool:
        """The referred customer's first payment succeeded: the reward is earned, held for ``hold``."""
        if self.status is not ReferralStatus.AWAITING_PAYMENT:
            return False
        self.qualifying_payment_id = payment_id
        self.reward_cents = reward_cents
        self.approve_after = paid_at + hold
        if self.flags:
            self._move(ReferralStatus.FLAGGED, paid_at, "; ".join(self.flags))
        else:
            self._move(
                ReferralStatus.PENDING, paid_at, f"first payment {payment_id}; held until {self.approve_after:%Y-%m-%d}"
            )
        return True

    def release(self, now: datetime) -> bool:
        """A pending reward whose hold is over becomes payable."""
        if self.status is ReferralStatus.PENDING and self.approve_after is not None and now >= self.approve_after:
            self._move(ReferralStatus.APPROVED, now, "hold period over")
            return True
        return False

    def admin_approve(self, now: datetime, admin: str) -> None:
        if self.status is not ReferralStatus.FLAGGED:
            raise ReferralRuleError(f"only a flagged reward can be approved by hand; this one is {self.status.value}")
        self.flags = ()
        # The hold still covers refunds and chargebacks.
        self._move(ReferralStatus.PENDING, now, f"approved by {admin}")
        self.release(now)

    def admin_reject(self, now: datetime, admin: str, reason: str) -> None:
        if self.status not in (
            ReferralStatus.FLAGGED,
            ReferralStatus.PENDING,
            ReferralStatus.APPROVED,
            ReferralStatus.AWAITING_PAYMENT,
        ):
            raise ReferralRuleError(f"a {self.status.value} reward cannot be rejected")
        self.reason = reason
        self._move(ReferralStatus.REJECTED, now, f"rejected by {admin}: {reason}")

    def payment_reversed(self, now: datetime, why: str) -> int:
        """The qualifying payment was refunded or disputed. Returns the amount to claw back
        from the payee's next payout (0 when the reward was not paid out yet: it is voided)."""
        if self.status.is_unpaid_reward:
            self._move(ReferralStatus.VOIDED, now, why)
            return 0
        if self.status in (ReferralStatus.IN_PAYOUT, ReferralStatus.PAID):
            self.history.append(
                Change(self.status, now, f"{why}: {self.reward_cents} clawed back from the next payout")
            )
            return self.reward_cents or 0
        return 0

    def withdrawn_from_payout(self, now: datetime, why: str) -> None:
        """The qualifying payment was reversed while the reward's payout was still unsent: void it."""
        if self.status is not ReferralStatus.IN_PAYOUT:
            raise ReferralRuleError(f"a {self.status.value} reward is in no payout")
        self.payout_id = None
        self._move(ReferralStatus.VOIDED, now, f"{why}: taken out of its unsent payout")

    def into_payout(self, payout_id: int, now: datetime) -> None:
        if self.status is not ReferralStatus.APPROVED:
            raise ReferralRuleError(f"a {self.status.value} reward cannot be paid out")
        self.payout_id = payout_id
        self._move(ReferralStatus.IN_PAYOUT, now, f"payout {payout_id}")

    def paid(self, now: datetime) -> None:
        if self.status is ReferralStatus.IN_PAYOUT:
            self._move(ReferralStatus.PAID, now, f"payout {self.payout_id} paid")

    def _move(self, status: ReferralStatus, at: datetime, reason: str | None) -> None:
        self.status = status
        self.history.append(Change(status, at, reason))


# ---------------------------------------------------------------- the payout calendar


@dataclass(frozen=True)
class PayoutCalendar:
    """Weekly payouts on Fridays in the business's time zone."""

    timezone: ZoneInfo
    weekday: int = 4  # Friday

    def local_date(self, moment: datetime) -> date:
        return moment.astimezone(self.timezone).date()

    def is_payout_day(self, moment: datetime) -> bool:
        return self.local_date(moment).weekday() == self.weekday

    def next_payout_day(self, moment: datetime) -> date:
        today = self.local_date(moment)
        return today + timedelta(days=(self.weekday - today.weekday()) % 7)

    def weekly_period(self, moment: datetime) -> str:
        """The payout's unique period key: one payout per payee per Friday."""
        return f"week-{self.next_payout_day(moment).isoformat()}"

    def same_day_period(self, moment: datetime) -> str:
        return f"day-{self.local_date(moment).isoformat()}"


def _default_rewards() -> dict[ReferrerKind, int]:
    return {ReferrerKind.CUSTOMER: 2_000, ReferrerKind.EMPLOYEE: 1_000, ReferrerKind.PARTNER: 5_000}


@dataclass(frozen=True)
class ReferralRules:
    #: Reward per qualified referral, in cents, by the referrer's kind.
    rewards_cents: dict[ReferrerKind, int] = field(default_factory=_default_rewards)
    #: A qualified reward waits this long for refunds and chargebacks before it is payable.
    hold: timedelta = timedelta(days=14)
    fraud: FraudRules = FraudRules()
    currency: str = "USD"
    #: Weekly payouts below this are held back until they add up.
    minimum_payout_cents: int = 1_000
    calendar: PayoutCalendar = field(default_factory=lambda: PayoutCalendar(ZoneInfo("America/New_York")))
