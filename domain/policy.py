"""The membership policy: how long credits live and how much rolls over."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from dateutil.relativedelta import relativedelta


def add_months(moment: datetime, months: int) -> datetime:
    """Calendar-month arithmetic that clamps to the month's end (Jan 31 + 1 month = Feb 28)."""
    return moment + relativedelta(months=months)


@dataclass(frozen=True)
class CreditPolicy:
    credit_expiration_months: int = 12
    allow_unlimited_rollover: bool = True
    rollover_cap: int | None = None
    hold_ttl_days: int = 30

    def __post_init__(self) -> None:
        if self.credit_expiration_months < 1:
            raise ValueError("credit_expiration_months must be at least 1")
        if self.hold_ttl_days < 1:
            raise ValueError("hold_ttl_days must be at least 1")
        if not self.allow_unlimited_rollover and (self.rollover_cap is None or self.rollover_cap < 0):
            raise ValueError("rollover_cap (>= 0) is required when allow_unlimited_rollover is false")

    def expiry_for(self, issued_at: datetime) -> datetime:
        return add_months(issued_at, self.credit_expiration_months)

    def hold_expiry_for(self, placed_at: datetime) -> datetime:
        return placed_at + timedelta(days=self.hold_ttl_days)

    @property
    def carry_limit(self) -> int | None:
        """Most credits that may carry into a new payment issuance; None means no limit."""
        return None if self.allow_unlimited_rollover else self.rollover_cap
