"""Reading Stripe objects. Stripe's shapes differ between API versions; each reader accepts
the older (``invoice.subscription``, ``line.price`` object, ``charge.invoice``) and the newer
(``parent.subscription_details``, ``line.pricing.price_details``) spelling."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from messages.events import MAX_AMOUNT_CENTS, MAX_CREDITS
from service_layer.ports import PaidInvoice

Obj = Mapping[str, Any]


def object_id(value: Any) -> str | None:
    """An id field that may be expanded into its object (None unless a plausible id)."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, str) and 0 < len(value) <= 255 and "\x00" not in value else None


def moment(epoch: Any) -> datetime | None:
    return datetime.fromtimestamp(epoch, UTC) if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def invoice_credits(invoice: Obj, plan_credits: Mapping[str, int]) -> int | None:
    """Credits an invoice buys: per line, the plan table's (else the price's ``credits`` metadata) × quantity.

    None when no line carries credits we know of, or the total is beyond what one payment
    may issue (the event is then parked for review).
    """
    lines = invoice.get("lines") or {}
    if lines.get("has_more"):
        return None  # the event does not carry every line: the total cannot be known from it
    total, known = 0, False
    for line in lines.get("data") or []:
        if not isinstance(line, Mapping) or _is_proration(line) or _is_credit_line(line):
            # Proration lines settle a plan change mid-period; credits come with each
            # period's own charge, so a change is credited from the next renewal on.
            continue
        per_unit = _credits_per_unit(line, plan_credits)
        if per_unit is None:
            continue
        quantity = line.get("quantity")
        quantity = quantity if isinstance(quantity, int) and quantity > 0 else 1
        total += per_unit * quantity
        known = True
    # Beyond what one event may issue is a misconfigured plan, not a purchase: parked for review.
    return total if known and 0 < total <= MAX_CREDITS else None


def _is_proration(line: Obj) -> bool:
    item = (
        ((line.get("parent") or {}).get("subscription_item_details") or {})
        if isinstance(line.get("parent"), Mapping)
        else {}
    )
    return bool(line.get("proration") or (isinstance(item, Mapping) and item.get("proration")))


def _is_credit_line(line: Obj) -> bool:
    amount = line.get("amount")
    return isinstance(amount, int) and amount < 0


def _credits_per_unit(line: Obj, plan_credits: Mapping[str, int]) -> int | None:
    price = line.get("price")
    price_id = object_id(price) or object_id(((line.get("pricing") or {}).get("price_details") or {}).get("price"))
    if price_id and price_id in plan_credits:
        return plan_credits[price_id]
    metadata = price.get("metadata") if isinstance(price, Mapping) else None
    raw = (metadata or {}).get("credits")
    if isinstance(raw, str) and raw.isdigit() and int(raw) > 0:
        return int(raw)
    return None


def subscription_of(invoice: Obj) -> str | None:
    return object_id(invoice.get("subscription")) or object_id(
        ((invoice.get("parent") or {}).get("subscription_details") or {}).get("subscription")
    )


def paid_invoice(
    invoice: Obj, customer_id: str, plan_credits: Mapping[str, int], fallback_time: datetime
) -> PaidInvoice:
    paid_at = moment((invoice.get("status_transitions") or {}).get("paid_at")) or fallback_time
    currency = invoice.get("currency")
    amount = invoice.get("amount_paid")
    invoice_id = object_id(invoice.get("id"))
    if invoice_id is None:
        raise ValueError("the invoice has no usable id")
    if isinstance(amount, int) and not 0 <= amount <= MAX_AMOUNT_CENTS:
        raise ValueError(f"amount_paid {amount} is out of range")
    return PaidInvoice(
        invoice_id=invoice_id,
        customer_id=customer_id,
        paid_at=paid_at,
        credits=invoice_credits(invoice, plan_credits),
        amount_cents=amount if isinstance(amount, int) and amount >= 0 else None,
        currency=currency.upper() if isinstance(currency, str) and len(currency) == 3 else None,
    )


def last_payment_error(invoice: Obj) -> tuple[str | None, str | None]:
    """(decline code, message) of the invoice's latest failed charge, from its expanded payments."""
    payments = (invoice.get("payments") or {}).get("data") if isinstance(invoice.get("payments"), Mapping) else None
    for entry in reversed(payments or []):
        intent = ((entry or {}).get("payment") or {}).get("payment_intent") if isinstance(entry, Mapping) else None
        error = intent.get("last_payment_error") if isinstance(intent, Mapping) else None
        if isinstance(error, Mapping):
            return _text(error.get("decline_code")) or _text(error.get("code")), _text(error.get("message"))
    return failure_of(invoice)


def failure_of(invoice: Obj) -> tuple[str | None, str | None]:
    """(decline code, message) of an invoice's failed payment, from whatever the payload carries.

    Stripe names the payment intent and charge by id in invoice events, so the decline code
    of Stripe's own first attempt is often unknown here; our first retry learns it.
    """
    intent = invoice.get("payment_intent")
    errors = [intent.get("last_payment_error")] if isinstance(intent, Mapping) else []
    errors += [invoice.get("last_payment_error"), invoice.get("last_finalization_error")]
    for error in errors:
        if isinstance(error, Mapping):
            code, message = _text(error.get("decline_code")) or _text(error.get("code")), _text(error.get("message"))
            if code or message:
                return code, message
    charge = invoice.get("charge")
    if isinstance(charge, Mapping):
        outcome = charge.get("outcome") if isinstance(charge.get("outcome"), Mapping) else {}
        return _text(outcome.get("reason")) or _text(charge.get("failure_code")), _text(charge.get("failure_message"))
    return None, None


def _text(value: Any, limit: int = 2000) -> str | None:
    return value[:limit] if isinstance(value, str) and value and "\x00" not in value else None


def https_or_none(url: Any) -> str | None:
    return url if isinstance(url, str) and url.startswith("https://") and len(url) <= 2000 else None
