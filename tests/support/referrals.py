"""Referral helpers: the app in-process with its referral rules, a stub Stripe Connect, the story's dates."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from infra.clock import FixedClock
from infra.payouts import ManualGateway
from infra.settings import Settings
from messages import (
    CustomerSignedUp,
    Event,
    PaymentReversed,
    PaymentSucceeded,
)
from service_layer import handlers, payouts
from service_layer.payouts import PayoutFailed, PayoutOrder, PayoutRun, Sent
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import ROOT, WorkerProcesses, wait_until

FRONT_TOKEN = "front-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
FRONT = {"Authorization": f"Bearer {FRONT_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GATEWAYS = {"stripe_connect": "stripe_connect", "cash_app": "manual", "manual": "manual"}
REFERRAL_CSV_COLUMNS = [
    "id",
    "referred_customer_id",
    "referrer_id",
    "code",
    "status",
    "reason",
    "flags",
    "reward_cents",
    "qualifying_payment_id",
    "submitted_at",
    "approve_after",
    "payout_id",
]
PAYOUT_CSV_COLUMNS = [
    "id",
    "payee_id",
    "payee_name",
    "payout_address",
    "method",
    "period",
    "amount_cents",
    "currency",
    "status",
    "external_reference",
    "created_at",
    "paid_at",
]
VELOCITY_LIMIT = 3


def at(month: int, day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


@dataclass
class Api:
    http: httpx.AsyncClient
    clock: FixedClock
    settings: Settings
    db: object

    async def apply(self, event: Event) -> None:
        await handlers.apply_event(
            event,
            SqlUnitOfWork(self.db),
            self.settings.policy,
            self.settings.dunning,
            referral_rules=self.settings.referrals,
        )

    async def sign_up(
        self,
        customer_id: str,
        moment: datetime,
        code: str | None = None,
        *,
        email: str | None = None,
        phone: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        await self.apply(
            CustomerSignedUp(
                event_id=f"signup-{customer_id}",
                occurred_at=moment,
                customer_id=customer_id,
                email=email or f"{customer_id}@{customer_id}.example.com",
                phone=phone,
                referral_code=code,
                payment_fingerprint=fingerprint,
            )
        )

    async def pay(self, customer_id: str, moment: datetime) -> None:
        await self.apply(
            PaymentSucceeded(
                event_id=f"paid-{customer_id}",
                occurred_at=moment,
                customer_id=customer_id,
                payment_id=f"pay-{customer_id}",
                credits=10,
            )
        )

    async def refund(self, customer_id: str, moment: datetime) -> None:
        await self.apply(
            PaymentReversed(
                event_id=f"refund-{customer_id}",
                occurred_at=moment,
                customer_id=customer_id,
                payment_id=f"pay-{customer_id}",
                reason="refund",
                total_credits_reversed=10,
            )
        )

    async def register(self, referrer_id: str, kind: str, **body) -> str:
        response = await self.http.post(
            "/api/admin/referrers", json={"referrer_id": referrer_id, "kind": kind, **body}, headers=ADMIN
        )
        assert response.status_code == 201, response.text
        return response.json()["code"]

    async def referrals(self, **params) -> dict:
        response = await self.http.get("/api/admin/referrals", params=params, headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()

    async def referral_of(self, customer_id: str) -> dict:
        """The customer's referral: the attributed one if any, else the latest rejected submission."""
        found = [
            r for r in (await self.referrals(limit=10_000))["referrals"] if r["referred_customer_id"] == customer_id
        ]
        assert found, f"no referral of {customer_id}"
        return next((r for r in found if r["status"] != "rejected"), found[-1])

    async def payouts(self, **params) -> dict:
        response = await self.http.get("/api/admin/payouts", params=params, headers=ADMIN)
        assert response.status_code == 200, response.text
        return response.json()

    async def summary(self, referrer_id: str) -> dict:
        response = await self.http.get(f"/api/referrers/{referrer_id}/summary", headers=FRONT)
        assert response.status_code == 200, response.text
        return response.json()

    def new_uow(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.db)


@dataclass
class StubConnect:
    """Stands in for Stripe Connect: pays, except payees listed in ``failing``."""

    failing: set[str] = field(default_factory=set)
    orders: list[PayoutOrder] = field(default_factory=list)
    name: str = "stripe_connect"

    async def send(self, order: PayoutOrder) -> Sent:
        self.orders.append(order)
        if order.payee_id in self.failing:
            raise PayoutFailed("APIError: An unknown error occurred")
        return Sent("paid", f"tr_stub_{order.payout_id}")


async def pay_referrals(api: Api, now: datetime, connect: StubConnect | None = None) -> PayoutRun:
    gateways = {"manual": ManualGateway(), "stripe_connect": connect or StubConnect()}
    return await payouts.pay_referrals(api.new_uow, gateways, GATEWAYS, now, api.settings.referrals)


FRIDAY = at(10, 16, 14)  # Friday Oct 16, 10:00 in New York
WEEK = "week-2026-10-16"


async def pay(
    api: Api, customer_id: str, moment: datetime, *, payment_id: str | None = None, amount_cents: int | None = 4900
) -> None:
    payment_id = payment_id or f"pay-{customer_id}"
    await api.apply(
        PaymentSucceeded(
            event_id=f"paid-{payment_id}",
            occurred_at=moment,
            customer_id=customer_id,
            payment_id=payment_id,
            credits=10,
            amount_cents=amount_cents,
            currency="USD" if amount_cents is not None else None,
        )
    )


async def referred_and_paid(api: Api, code: str, customers: list[str], signed_up: datetime) -> None:
    for customer in customers:
        await api.sign_up(customer, signed_up, code)
        await pay(api, customer, signed_up + timedelta(hours=1))


CREDITS_CLI = str(Path(sys.executable).with_name("credits"))
ENQUEUED = re.compile(r"enqueued pay_referrals as message (?P<id>[0-9a-f-]{36})")


async def pay_referrals_as_of(env: dict[str, str], workers: WorkerProcesses, moment: datetime) -> dict:
    """`credits run pay_referrals --as-of <moment>`, then wait for that message's `referrals_paid` line."""
    done = await asyncio.to_thread(
        subprocess.run,
        [CREDITS_CLI, "run", "pay_referrals", "--as-of", moment.isoformat()],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    message_id = ENQUEUED.search(done.stderr)["id"]

    def finished() -> list[dict]:
        records = [r for r in workers.records() if r.get("message_id") == message_id]
        failures = [
            r
            for r in records
            if r.get("event") in ("message_dead_lettered",) or r.get("level") in ("error", "critical")
        ]
        assert not failures, f"pay_referrals as of {moment} failed: {failures}\n{workers.log()[-4000:]}"
        return [r for r in records if r.get("event") == "referrals_paid"]

    await asyncio.to_thread(wait_until, lambda: bool(finished()), 30, 0.05, f"pay_referrals as of {moment.isoformat()}")
    [line] = finished()
    assert line["as_of"] == moment.isoformat()
    return line
