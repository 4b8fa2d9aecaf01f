"""Verifying a Stripe webhook delivery and reading its envelope."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import stripe
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class WebhookRejected(Exception):
    """The delivery is not a genuine, fresh, well-formed Stripe event: answer 400."""


class StripeEventData(BaseModel):
    model_config = ConfigDict(extra="allow")
    object: dict[str, Any]
    previous_attributes: dict[str, Any] | None = None


class StripeEvent(BaseModel):
    """The envelope of a Stripe event; the object inside is read field by field where used."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=4, max_length=255, pattern=r"^evt_[A-Za-z0-9_]+$")
    type: str = Field(min_length=1, max_length=255, pattern=r"^[a-z_.]+$")
    created: int = Field(gt=0, lt=4_102_444_800)  # before 2100: a readable moment
    livemode: bool = False
    data: StripeEventData


def verify(payload: bytes, signature_header: str | None, secrets: Sequence[str], tolerance_seconds: int) -> StripeEvent:
    """The event, if ``payload`` is signed by one of ``secrets`` within the tolerance; else WebhookRejected.

    Several secrets are tried in turn so that a secret can be rotated without downtime.
    """
    if not signature_header:
        raise WebhookRejected("missing Stripe-Signature header")
    if not signature_header.isascii() or len(signature_header) > 4_096:
        raise WebhookRejected("malformed Stripe-Signature header")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected("body is not UTF-8") from None
    reasons = []
    for secret in secrets:
        try:
            stripe.WebhookSignature.verify_header(text, signature_header, secret, tolerance_seconds)
            break
        except stripe.SignatureVerificationError as error:
            reasons.append(_reason(str(error._message or error)))
    else:
        # The most telling reason: a stale timestamp says more than "no match" would.
        raise WebhookRejected(
            next((r for r in reasons if "timestamp" in r), reasons[0] if reasons else "no secret configured")
        )
    # The SDK refuses old timestamps only; one far ahead is as suspect as one long past.
    stamps = [part[2:] for part in signature_header.split(",") if part.startswith("t=")]
    if stamps and stamps[0].isdigit() and int(stamps[0]) > time.time() + tolerance_seconds:
        raise WebhookRejected("timestamp outside the tolerance (dated in the future)")
    try:
        return StripeEvent.model_validate_json(text)
    except ValidationError as error:
        # Where and what kind only: a message may quote the input.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['type']}" for e in error.errors(include_url=False, include_input=False)
        )
        raise WebhookRejected(f"malformed event: {problems}") from None


def _reason(message: str) -> str:
    lowered = message.lower()
    if "tolerance" in lowered:
        return "timestamp outside the tolerance (stale or replayed delivery)"
    if "unable to extract" in lowered:
        return "malformed Stripe-Signature header"
    if "no signatures found" in lowered:
        return "signature does not match (wrong secret or altered body)"
    return message
