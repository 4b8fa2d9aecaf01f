"""The Stripe relay: a verified Stripe event becomes the domain events the ledger consumes.

Each delivery is recorded by Stripe's event id in the same transaction as its translation;
the domain events are published before that transaction commits. So a redelivery does
nothing, and a failure anywhere before the commit answers 5xx and Stripe delivers again
(republishing the same event ids, which the ledger applies once). An event for a Stripe
customer (or a payment) we do not know is parked for review, never dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from infra.stripe.invoices import failure_of, https_or_none, moment, object_id, paid_invoice, subscription_of
from infra.stripe.webhooks import StripeEvent
from messages import (
    Event,
    InvoiceVoided,
    PaymentActionRequired,
    PaymentFailed,
    PaymentMethodUpdated,
    PaymentReversed,
    PaymentSucceeded,
)
from service_layer.ports import UnitOfWork, UnitOfWorkFactory

log = structlog.get_logger("credits.webhooks")
Publish = Callable[[Event], Awaitable[None]]

#: Metadata key on a Stripe customer naming our customer id (set when the front end creates it).
CUSTOMER_ID_METADATA = "customer_id"

RELAYED, IGNORED, PARKED, DUPLICATE = "relayed", "ignored", "parked", "duplicate"


@dataclass
class Translation:
    outcome: str
    detail: str | None = None
    events: list[Event] = field(default_factory=list)
    #: A Stripe customer linked by this event: its parked events can now be relayed.
    linked_stripe_customer: str | None = None


@dataclass(frozen=True)
class Receipt:
    outcome: str
    detail: str | None = None
    published: int = 0
    linked_stripe_customer: str | None = None


async def receive(
    uow: UnitOfWork, event: StripeEvent, publish: Publish, plan_credits: Mapping[str, int], now: datetime
) -> Receipt:
    """Record, translate and publish one verified delivery."""
    async with uow:
        obj = event.data.object
        stripe_customer = _stripe_customer(event.type, obj)
        if not await uow.stripe.record_event(
            event.id, event.type, moment(event.created), stripe_customer, event.model_dump(mode="json"), now
        ):
            return Receipt(DUPLICATE, "already received")
        translation = await translate(uow, event, plan_credits)
        await uow.stripe.set_outcome(event.id, translation.outcome, translation.detail, now)
        for domain_event in translation.events:
            await publish(domain_event)
        await uow.commit()
    _log(event, translation)
    return Receipt(translation.outcome, translation.detail, len(translation.events), translation.linked_stripe_customer)


async def relay_parked(
    new_uow: UnitOfWorkFactory,
    publish: Publish,
    plan_credits: Mapping[str, int],
    now: datetime,
    stripe_customer_id: str | None = None,
    limit: int = 500,
) -> list[Receipt]:
    """Translate parked events again (after a customer was linked, or the plan table fixed)."""
    receipts = []
    async with new_uow() as uow:
        rows = await uow.stripe.parked_events(stripe_customer_id, limit)
    for row in rows:
        async with new_uow() as uow:
            [current] = await uow.stripe.parked_events(
                row.stripe_customer_id, 1, for_update=True, event_id=row.event_id
            ) or [None]
            if current is None:
                continue  # relayed meanwhile by another run
            event = StripeEvent.model_validate(current.payload)
            translation = await translate(uow, event, plan_credits)
            await uow.stripe.set_outcome(event.id, translation.outcome, translation.detail, now)
            for domain_event in translation.events:
                await publish(domain_event)
            await uow.commit()
        _log(event, translation, replayed=True)
        receipts.append(Receipt(translation.outcome, translation.detail, len(translation.events)))
    return receipts


async def translate(uow: UnitOfWork, event: StripeEvent, plan_credits: Mapping[str, int]) -> Translation:
    obj = event.data.object
    handler = _HANDLERS.get(event.type)
    if handler is None:
        return Translation(IGNORED, f"{event.type} is not used")
    try:
        return await handler(uow, event, obj, plan_credits)
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # pydantic's ValidationError is a ValueError
        # Signed, so from Stripe, yet not what we can read: keep it for review rather than
        # answer 5xx and have Stripe redeliver the same thing for three days.
        return Translation(PARKED, f"unreadable {event.type} object: {type(error).__name__}: {str(error)[:500]}")


# ---------------------------------------------------------------- one function per Stripe event type


async def _customer_changed(uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]) -> Translation:
    stripe_customer = obj.get("id")
    ours = _text((obj.get("metadata") or {}).get(CUSTOMER_ID_METADATA))
    linked = None
    if ours and isinstance(stripe_customer, str):
        existing = await uow.stripe.customer_for(stripe_customer)
        if existing is None:
            linked_to = await uow.stripe.map_customer(stripe_customer, ours)
            if linked_to != ours:
                return Translation(PARKED, f"customer {ours!r} is already linked to another Stripe customer")
            linked = stripe_customer
        elif existing != ours:
            log.warning(
                "stripe_customer_metadata_disagrees", stripe_customer_id=stripe_customer, linked=existing, metadata=ours
            )
    previous = event.data.previous_attributes or {}
    method_changed = "default_payment_method" in (previous.get("invoice_settings") or {})
    new_method = object_id((obj.get("invoice_settings") or {}).get("default_payment_method"))
    if event.type == "customer.updated" and method_changed and new_method:
        translation = await _for_customer(
            uow,
            event,
            stripe_customer,
            lambda customer_id: PaymentMethodUpdated(**_envelope(event, customer_id), payment_method_id=new_method),
        )
        translation.linked_stripe_customer = linked
        return translation
    return Translation(
        RELAYED if linked else IGNORED,
        f"linked to customer {ours!r}" if linked else "no change we use",
        linked_stripe_customer=linked,
    )


async def _payment_method_attached(
    uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]
) -> Translation:
    return await _for_customer(
        uow,
        event,
        object_id(obj.get("customer")),
        lambda customer_id: PaymentMethodUpdated(
            **_envelope(event, customer_id), payment_method_id=_text(obj.get("id"))
        ),
    )


async def _invoice_paid(uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]) -> Translation:
    customer_id = await _customer_of(uow, obj)
    if customer_id is None:
        return _unknown_customer(obj)
    paid = paid_invoice(obj, customer_id, plan, moment(event.created))
    await uow.stripe.record_payment(
        paid.invoice_id,
        customer_id,
        payment_intent_id=object_id(obj.get("payment_intent")),
        charge_id=object_id(obj.get("charge")),
        amount_paid=paid.amount_cents,
        currency=paid.currency,
        credits=paid.credits,
        paid_at=paid.paid_at,
    )
    if paid.credits is None:
        return Translation(
            PARKED,
            "no credits known for the invoice's prices (or over 1,000,000): add them to STRIPE_PLAN_CREDITS or give the price `credits` metadata, then relay the parked events",
        )
    return Translation(
        RELAYED,
        None,
        [
            PaymentSucceeded(
                **_envelope(event, customer_id, paid.paid_at),
                payment_id=paid.invoice_id,
                credits=paid.credits,
                amount_cents=paid.amount_cents,
                currency=paid.currency,
            )
        ],
    )


async def _invoice_payment_paid(uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]) -> Translation:
    """Newer API versions name an invoice's charge only here: remember it, for refunds and disputes."""
    invoice_id = object_id(obj.get("invoice"))
    payment = obj.get("payment") or {}
    if invoice_id is None:
        return Translation(IGNORED, "invoice payment without an invoice")
    await uow.stripe.record_payment(
        invoice_id,
        None,
        payment_intent_id=object_id(payment.get("payment_intent")),
        charge_id=object_id(payment.get("charge")),
    )
    return Translation(RELAYED, "recorded the invoice's payment")


async def _invoice_payment_failed(
    uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]
) -> Translation:
    decline_code, message = failure_of(obj)
    return await _for_customer(
        uow,
        event,
        object_id(obj.get("customer")),
        lambda customer_id: PaymentFailed(
            **_envelope(event, customer_id),
            invoice_id=obj["id"],
            decline_code=decline_code[:100] if decline_code else None,
            failure_message=message,
            hosted_invoice_url=https_or_none(obj.get("hosted_invoice_url")),
            subscription_id=subscription_of(obj),
        ),
    )


async def _invoice_action_required(
    uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]
) -> Translation:
    return await _for_customer(
        uow,
        event,
        object_id(obj.get("customer")),
        lambda customer_id: PaymentActionRequired(
            **_envelope(event, customer_id),
            invoice_id=obj["id"],
            hosted_invoice_url=https_or_none(obj.get("hosted_invoice_url")),
            subscription_id=subscription_of(obj),
        ),
    )


async def _invoice_voided(uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]) -> Translation:
    reason = "uncollectible" if event.type == "invoice.marked_uncollectible" else "voided"
    return await _for_customer(
        uow,
        event,
        object_id(obj.get("customer")),
        lambda customer_id: InvoiceVoided(**_envelope(event, customer_id), invoice_id=obj["id"], reason=reason),
    )


async def _charge_refunded(uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]) -> Translation:
    payment = await uow.stripe.payment_for(
        invoice_id=object_id(obj.get("invoice")),
        charge_id=object_id(obj.get("id")),
        payment_intent_id=object_id(obj.get("payment_intent")),
    )
    if payment is not None:
        payment = await uow.stripe.note_reversal(payment.invoice_id, refunded=obj.get("amount_refunded"))
    return _reversal(event, payment, "refund", obj.get("amount"))


async def _dispute_created(uow: UnitOfWork, event: StripeEvent, obj: dict, plan: Mapping[str, int]) -> Translation:
    payment = await uow.stripe.payment_for(
        charge_id=object_id(obj.get("charge")), payment_intent_id=object_id(obj.get("payment_intent"))
    )
    if payment is not None:
        payment = await uow.stripe.note_reversal(payment.invoice_id, disputed=obj.get("amount"))
    return _reversal(event, payment, "dispute", None)


_HANDLERS = {
    "customer.created": _customer_changed,
    "customer.updated": _customer_changed,
    "payment_method.attached": _payment_method_attached,
    "invoice.paid": _invoice_paid,
    "invoice_payment.paid": _invoice_payment_paid,
    "invoice.payment_failed": _invoice_payment_failed,
    "invoice.payment_action_required": _invoice_action_required,
    "invoice.voided": _invoice_voided,
    "invoice.marked_uncollectible": _invoice_voided,
    "charge.refunded": _charge_refunded,
    "charge.dispute.created": _dispute_created,
}
HANDLED_EVENT_TYPES = tuple(_HANDLERS)


# ---------------------------------------------------------------- helpers


def _reversal(event: StripeEvent, payment, reason: str, charge_amount: Any) -> Translation:
    """Take back the credits for everything refunded and disputed so far (both count: a dispute
    of what a partial refund left takes the rest)."""
    if payment is None or payment.customer_id is None:
        return Translation(
            PARKED, "no paid invoice known for this charge: relay the parked events once its invoice.paid has arrived"
        )
    if not payment.credits:
        # Its credits are not known yet (its invoice.paid is parked): wait with it, in order.
        return Translation(
            PARKED,
            f"the credits of invoice {payment.invoice_id} are not known yet: relay the parked events once its invoice.paid is relayed",
        )
    paid = payment.amount_paid or (charge_amount if isinstance(charge_amount, int) else None)
    total = _proportion(payment.credits, (payment.amount_refunded or 0) + (payment.amount_disputed or 0), paid)
    if total == 0:
        return Translation(IGNORED, f"the {reason} amount takes back no whole credit")
    return Translation(
        RELAYED,
        None,
        [
            PaymentReversed(
                **_envelope(event, payment.customer_id),
                payment_id=payment.invoice_id,
                reason=reason,
                total_credits_reversed=total,
            )
        ],
    )


def _proportion(credits: int, amount: Any, of: int | None) -> int:
    """Credits in proportion to the amount refunded or disputed, rounded half up; all of them without amounts."""
    if not isinstance(amount, int) or not of or amount >= of:
        return credits
    return min(credits, (2 * credits * max(amount, 0) + of) // (2 * of))


async def _for_customer(
    uow: UnitOfWork, event: StripeEvent, stripe_customer: str | None, build: Callable[[str], Event]
) -> Translation:
    customer_id = await uow.stripe.customer_for(stripe_customer) if stripe_customer else None
    if customer_id is None:
        return _unknown_customer({"customer": stripe_customer})
    return Translation(RELAYED, None, [build(customer_id)])


async def _customer_of(uow: UnitOfWork, obj: dict) -> str | None:
    stripe_customer = object_id(obj.get("customer"))
    return await uow.stripe.customer_for(stripe_customer) if stripe_customer else None


def _unknown_customer(obj: dict) -> Translation:
    stripe_customer = object_id(obj.get("customer"))
    return Translation(
        PARKED,
        f"unknown Stripe customer {stripe_customer!r}: link it to a customer (PUT /api/admin/stripe-customers/{stripe_customer})",
    )


def _stripe_customer(event_type: str, obj: dict) -> str | None:
    if event_type.startswith("customer.") and obj.get("object") == "customer":
        return object_id(obj.get("id"))
    return object_id(obj.get("customer"))


def _envelope(event: StripeEvent, customer_id: str, occurred_at: datetime | None = None) -> dict:
    return {
        "event_id": f"stripe:{event.id}",
        "occurred_at": occurred_at or moment(event.created),
        "customer_id": customer_id,
    }


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and len(value) <= 255 and "\x00" not in value else None


def _log(event: StripeEvent, translation: Translation, replayed: bool = False) -> None:
    log.info(
        "stripe_event_" + translation.outcome,
        stripe_event_id=event.id,
        stripe_event_type=event.type,
        detail=translation.detail,
        published=[e.type for e in translation.events],
        replayed=replayed,
    )
