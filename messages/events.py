"""Domain events as they travel on the wire: pydantic models, JSON, past tense.

Validation is strict and closed: unknown or missing fields, a naive datetime, a
non-positive credit amount or an unknown ``type`` are refused, never guessed at.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
    model_validator,
)

#: The most credits one event may carry (domain.limits.MAX_CREDITS_PER_EVENT: this package
#: cannot import the domain, a test keeps the two equal).
MAX_CREDITS = 1_000_000
#: A payment's amount in the currency's minor unit: 10^12 (ten billion dollars) fits any real
#: payment and stays far inside the 64-bit column.
MAX_AMOUNT_CENTS = 1_000_000_000_000

#: No NUL characters: PostgreSQL text cannot hold them, so they would fail on every retry.
NO_NUL = r"^[^\x00]*$"
EventId = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)]
CustomerId = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)]
ExternalId = Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)]
PositiveCredits = Annotated[int, Field(gt=0, le=MAX_CREDITS)]
#: As typed: case, spaces and hyphens do not matter when it is matched.
ReferralCode = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9\- ]+$")]


def _as_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


#: Timezone-aware (a naive datetime is refused) and normalised to UTC.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_as_utc)]


class Event(BaseModel):
    """Fields every event carries. ``event_id`` is its idempotency key."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    event_id: EventId
    occurred_at: UtcDatetime
    customer_id: CustomerId

    def fingerprint(self) -> str:
        """SHA-256 of the canonical payload: equal for equal events however they were spelled."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class JobCompleted(Event):
    type: Literal["job.completed"] = "job.completed"
    job_id: ExternalId
    credits: PositiveCredits = 1


class JobCancelled(Event):
    type: Literal["job.cancelled"] = "job.cancelled"
    job_id: ExternalId


class PaymentSucceeded(Event):
    type: Literal["payment.succeeded"] = "payment.succeeded"
    payment_id: ExternalId
    credits: PositiveCredits
    amount_cents: Annotated[int, Field(ge=0, le=MAX_AMOUNT_CENTS)] | None = None
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] | None = None


class CreditsAdjusted(Event):
    type: Literal["credits.adjusted"] = "credits.adjusted"
    credits: Annotated[int, Field(ge=-MAX_CREDITS, le=MAX_CREDITS)]
    reason: Annotated[str, Field(min_length=1, max_length=500, pattern=NO_NUL)]
    actor: Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)]

    @field_validator("credits")
    @classmethod
    def _changes_balance(cls, credits: int) -> int:
        if credits == 0:
            raise ValueError("credits must not be zero: an adjustment has to change the balance")
        return credits


OptionalText = Annotated[str, Field(max_length=2000, pattern=NO_NUL)] | None
HttpsUrl = Annotated[str, Field(max_length=2000, pattern=r"^https://[^\x00\s]+$")] | None


class PaymentFailed(Event):
    """A charge for an invoice failed. Opens (or updates) the invoice's dunning case."""

    type: Literal["payment.failed"] = "payment.failed"
    invoice_id: ExternalId
    decline_code: Annotated[str, Field(max_length=100, pattern=NO_NUL)] | None = None
    failure_message: OptionalText = None
    #: Where the customer can pay the invoice themselves (Stripe's hosted invoice page).
    hosted_invoice_url: HttpsUrl = None
    subscription_id: ExternalId | None = None


class PaymentActionRequired(Event):
    """The bank wants the customer to authenticate the invoice's payment: not a retryable failure."""

    type: Literal["payment.action_required"] = "payment.action_required"
    invoice_id: ExternalId
    hosted_invoice_url: HttpsUrl = None
    subscription_id: ExternalId | None = None


class PaymentMethodUpdated(Event):
    """The customer has a new default payment method: unpaid invoices are charged at once."""

    type: Literal["payment_method.updated"] = "payment_method.updated"
    payment_method_id: ExternalId | None = None


class InvoiceVoided(Event):
    """The invoice was voided or written off at the provider: nothing is owed for it any more."""

    type: Literal["invoice.voided"] = "invoice.voided"
    invoice_id: ExternalId
    reason: Literal["voided", "uncollectible"] = "voided"


class PaymentReversed(Event):
    """A payment was refunded or disputed: take back the credits it issued.

    ``total_credits_reversed`` is cumulative over the payment's reversals (a second partial
    refund states the new total), so a replayed or reordered report never takes twice.
    """

    type: Literal["payment.reversed"] = "payment.reversed"
    payment_id: ExternalId
    reason: Literal["refund", "dispute"]
    total_credits_reversed: PositiveCredits


class CustomerSignedUp(Event):
    """A new customer. A referral code given at sign-up attributes them to its referrer."""

    type: Literal["customer.signed_up"] = "customer.signed_up"
    email: Annotated[str, Field(min_length=3, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")]
    phone: Annotated[str, Field(min_length=3, max_length=40, pattern=r"^[0-9+() .\-]+$")] | None = None
    referral_code: ReferralCode | None = None
    #: The card's fingerprint (Stripe's `card.fingerprint`): the same card, whoever holds it.
    payment_fingerprint: Annotated[str, Field(min_length=1, max_length=255, pattern=NO_NUL)] | None = None


class ReferralSubmitted(Event):
    """A referral code entered for a customer after sign-up. ``customer_id`` is the referred
    customer; producers may send ``referred_customer_id`` instead (the same thing)."""

    type: Literal["referral.submitted"] = "referral.submitted"
    referral_code: ReferralCode
    referred_customer_id: CustomerId
    customer_id: CustomerId | None = None  # type: ignore[assignment]  # filled from referred_customer_id

    @model_validator(mode="after")
    def _one_customer(self) -> ReferralSubmitted:
        if self.customer_id is None:
            object.__setattr__(self, "customer_id", self.referred_customer_id)
        elif self.customer_id != self.referred_customer_id:
            raise ValueError("customer_id and referred_customer_id name the same customer; they differ")
        return self


class MembershipFrozen(Event):
    """The customer paused their membership: nothing expires and nothing can be booked until it is unfrozen."""

    type: Literal["membership.frozen"] = "membership.frozen"


class MembershipUnfrozen(Event):
    """The pause is over: every unexpired lot's expiry moves by the time the membership was frozen."""

    type: Literal["membership.unfrozen"] = "membership.unfrozen"


class CreditsGifted(Event):
    """``customer_id`` gives ``credits`` to ``to_customer_id``: oldest first, keeping their expiry dates."""

    type: Literal["credits.gifted"] = "credits.gifted"
    to_customer_id: CustomerId
    credits: PositiveCredits

    @model_validator(mode="after")
    def _two_customers(self) -> CreditsGifted:
        if self.to_customer_id == self.customer_id:
            raise ValueError("a customer cannot gift credits to themselves")
        return self


#: Every event type, once: the wire union and the registry are both made from it.
EVENT_MODELS: tuple[type[Event], ...] = (
    JobCompleted,
    JobCancelled,
    PaymentSucceeded,
    CreditsAdjusted,
    PaymentFailed,
    PaymentActionRequired,
    PaymentMethodUpdated,
    PaymentReversed,
    InvoiceVoided,
    CustomerSignedUp,
    ReferralSubmitted,
    MembershipFrozen,
    MembershipUnfrozen,
    CreditsGifted,
)
# Union over the tuple of models (no `|` spelling exists for a tuple of types).
AnyEvent = Annotated[Union[EVENT_MODELS], Field(discriminator="type")]  # noqa: UP007

_EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(AnyEvent)


def parse_event(raw: str | bytes) -> Event:
    """Decode one event from its JSON text. Raises pydantic.ValidationError on anything off."""
    return _EVENT_ADAPTER.validate_json(raw)


EVENT_TYPES: dict[str, type[Event]] = {model.model_fields["type"].default: model for model in EVENT_MODELS}
