"""What each customer notification says, and its key: at most one message per key, ever."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class NotificationKind(StrEnum):
    CREDITS_EXPIRING = "credits_expiring"
    PAYMENT_FAILED = "payment_failed"
    CREDITS_DEPLETED = "credits_depleted"
    CREDITS_RESTORED = "credits_restored"


@dataclass(frozen=True)
class Notice:
    kind: NotificationKind
    key: str
    customer_id: str
    subject: str
    body: str


def _day(moment: datetime) -> str:
    return f"{moment:%B} {moment.day}, {moment.year}"


def credits_expiring(customer_id: str, lot_id: int, credits: int, expires_at: datetime) -> Notice:
    """Once per lot and expiry date (a freeze moves the date: then it is warned again)."""
    plural = "credit" if credits == 1 else "credits"
    return Notice(
        NotificationKind.CREDITS_EXPIRING,
        f"credits_expiring:{lot_id}:{expires_at.isoformat()}",
        customer_id,
        f"{credits} {plural} expire on {_day(expires_at)}",
        f"You have {credits} {plural} that will expire on {_day(expires_at)} (UTC). Book a session before then to use them.",
    )


def payment_failed(customer_id: str, invoice_id: str, reason: str | None, next_retry_at: datetime | None) -> Notice:
    """Once per unpaid invoice: its payment failed (later retries are in the login notice)."""
    retry = f" We will try again on {_day(next_retry_at)}." if next_retry_at else ""
    why = f" The bank said: {reason}." if reason else ""
    return Notice(
        NotificationKind.PAYMENT_FAILED,
        f"payment_failed:{invoice_id}",
        customer_id,
        "Your payment did not go through",
        f"We could not collect your membership payment.{why}{retry} You can update your payment method or retry the payment when you sign in.",
    )


def credits_depleted(customer_id: str, depleted_at: datetime) -> Notice:
    """Once per depletion: the customer has run out of credits."""
    return Notice(
        NotificationKind.CREDITS_DEPLETED,
        f"credits_depleted:{customer_id}:{depleted_at.isoformat()}",
        customer_id,
        "You are out of credits",
        f"Your credit balance ran out on {_day(depleted_at)}. Your credits come back with your next payment.",
    )


def credits_restored(customer_id: str, depleted_at: datetime, restored_at: datetime, balance: int) -> Notice:
    """Once per depletion that ended: credits are back."""
    plural = "credit" if balance == 1 else "credits"
    return Notice(
        NotificationKind.CREDITS_RESTORED,
        f"credits_restored:{customer_id}:{depleted_at.isoformat()}",
        customer_id,
        "Your credits are back",
        f"Good news: you have {balance} {plural} again as of {_day(restored_at)}. You can book your next session now.",
    )
