"""The HTTP API's request and response bodies (the referral and ledger routes keep theirs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from messages.events import MAX_CREDITS, NO_NUL

# The admin reports answer the read models' own rows: one definition of each.
from service_layer.views import DepletedCustomer, UnpaidInvoice

Identifier = Annotated[str, Path(min_length=1, max_length=255, pattern=NO_NUL)]


# ---------------------------------------------------------------- schemas


class LotOut(BaseModel):
    remaining: int
    issued_at: datetime
    expires_at: datetime


class HoldOut(BaseModel):
    job_id: str
    credits: int
    placed_at: datetime
    expires_at: datetime


class CreditsOut(BaseModel):
    customer_id: str
    balance: int
    available: int
    holds: list[HoldOut]
    lots: list[LotOut]
    credits_depleted_at: datetime | None
    frozen_since: datetime | None
    can_schedule: bool


class HoldIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    credits: int = Field(1, gt=0, le=MAX_CREDITS)


class DunningReportOut(BaseModel):
    total: int
    limit: int
    offset: int
    next_offset: int | None
    invoices: list[UnpaidInvoice]


class AdjustmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    credits: int = Field(ge=-MAX_CREDITS, le=MAX_CREDITS)
    reason: str = Field(min_length=1, max_length=500, pattern=NO_NUL)
    admin: str = Field(min_length=1, max_length=255, pattern=NO_NUL)
    #: The same key on a retry applies the adjustment once (a timeout, a double click).
    idempotency_key: str | None = Field(None, min_length=8, max_length=100, pattern=r"^[A-Za-z0-9_\-]+$")


class AdjustmentOut(BaseModel):
    customer_id: str
    credits: int
    outcome: str


class MonthOut(BaseModel):
    month: str
    issued: int
    used: int
    expired: int
    reversed: int
    adjusted_down: int
    outstanding: int
    breakage_rate: float | None


class UpcomingOut(BaseModel):
    month: str
    credits: int


class AnalyticsOut(BaseModel):
    months: list[MonthOut]
    upcoming_expirations: list[UpcomingOut]
    totals: dict[str, int]
    breakage_rate: float | None


class LoginBannerAction(BaseModel):
    type: Literal["update_payment_method", "retry_payment"]
    #: update_payment_method: the provider's hosted invoice page or billing portal.
    url: str | None = None
    #: retry_payment: the request the front end makes.
    method: str | None = None
    path: str | None = None


class LoginBannerOut(BaseModel):
    kind: Literal["none", "no_credits", "payment_failed", "action_required"]
    message: str
    next_retry_at: datetime | None = None
    attempts_left: int | None = None
    failure_reason: str | None = None
    decline_code: str | None = None
    actions: list[LoginBannerAction]


class RetryAcceptedOut(BaseModel):
    attempts: int


class StripeCustomerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    customer_id: str = Field(min_length=1, max_length=255, pattern=NO_NUL)


class StripeCustomerOut(BaseModel):
    stripe_customer_id: str
    customer_id: str
    parked_events_relayed: int


class ParkedEventOut(BaseModel):
    event_id: str
    type: str
    stripe_customer_id: str | None
    received_at: datetime
    detail: str | None


class WebhookReceiptOut(BaseModel):
    outcome: str
    detail: str | None = None


class CreditsReportOut(BaseModel):
    days: int
    as_of: datetime
    total: int
    limit: int
    offset: int
    next_offset: int | None
    customers: list[DepletedCustomer]


class CountOut(BaseModel):
    count: int
