"""Event schemas and the producer. Imports only pydantic, dramatiq and redis."""

from messages.events import (
    CreditsAdjusted,
    CreditsGifted,
    CustomerSignedUp,
    Event,
    InvoiceVoided,
    JobCancelled,
    JobCompleted,
    MembershipFrozen,
    MembershipUnfrozen,
    PaymentActionRequired,
    PaymentFailed,
    PaymentMethodUpdated,
    PaymentReversed,
    PaymentSucceeded,
    ReferralSubmitted,
    parse_event,
)
from messages.publisher import Publisher, PublishFailed
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE

__all__ = [
    "APPLY_EVENT_ACTOR",
    "CreditsAdjusted",
    "CreditsGifted",
    "CustomerSignedUp",
    "EVENTS_QUEUE",
    "EVENT_KWARG",
    "Event",
    "InvoiceVoided",
    "JobCancelled",
    "JobCompleted",
    "MembershipFrozen",
    "MembershipUnfrozen",
    "PaymentActionRequired",
    "PaymentFailed",
    "PaymentMethodUpdated",
    "PaymentReversed",
    "PaymentSucceeded",
    "PublishFailed",
    "Publisher",
    "ReferralSubmitted",
    "parse_event",
]
