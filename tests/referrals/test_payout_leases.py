"""Payouts are sent in leases: a crash leaves at most one lease of payouts whose fate is
unknown, and each of them is checked with the provider before it is ever sent again.

Against the real PostgreSQL, with the real Stripe Connect gateway (the SDK) talking to the
local fake Stripe (tests/fake_stripe.py), and the manual gateway. The crash is a
``BaseException`` raised from inside the gateway, as a killed process would stop: after the
lease's transaction committed, before its outcomes were recorded. Payouts are made for the
Friday of ``test_referral_review_fixes`` (Oct 16, 10:00 in New York).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import event, select

from api.app import create_app
from infra.clock import FixedClock
from infra.db.tables import payouts as payouts_table
from infra.db.tables import referrals as referrals_table
from infra.payouts import ManualGateway
from infra.settings import load_settings
from infra.stripe.transfers import StripeConnectGateway
from service_layer import payouts
from service_layer.payouts import PayoutOrder, PayoutRun, Sent
from tests.support.referrals import ADMIN_TOKEN, FRIDAY, FRONT_TOKEN, GATEWAYS, WEEK, Api, at, referred_and_paid

LEASE = 3  # payouts per lease in these tests (PAYOUTS_PER_LEASE is 100)
STARTED = at(10, 16, 14, 5)  # the wall clock of the run that crashes


class Crash(BaseException):
    """The process dies: nothing after this point runs (not an ``Exception``: no handler records it)."""


class CrashingGateway:
    """Passes orders to ``gateway``; on order number ``crash_on`` the provider acts, then the process dies."""

    def __init__(self, gateway, crash_on: int, seen: Callable[[PayoutOrder], object] | None = None) -> None:
        self.gateway, self.crash_on, self.seen = gateway, crash_on, seen
        self.name = gateway.name
        self.orders: list[PayoutOrder] = []

    async def send(self, order: PayoutOrder) -> Sent:
        self.orders.append(order)
        if self.seen is not None:
            await self.seen(order)
        sent = await self.gateway.send(order)
        if len(self.orders) == self.crash_on:
            raise Crash(f"killed after the provider took payout {order.payout_id}")
        return sent


@asynccontextmanager
async def serving(db, pg_url: str, fake_stripe):
    settings = load_settings(
        database_url=pg_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONT_TOKEN,
        event_max_age_days=36500,
        stripe_api_key="sk_test_leases",
        stripe_api_base=fake_stripe.url,
        stripe_timeout_seconds=2,
    )
    clock = FixedClock(at(10, 1, 12))
    app = create_app(settings, clock=clock, db=db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http:
        yield Api(http, clock, settings, db)


@pytest.fixture
async def api(db, pg_url, fake_stripe):
    async with serving(db, pg_url, fake_stripe) as served:
        yield served


@pytest.fixture
def small_leases(monkeypatch) -> None:
    monkeypatch.setattr(payouts, "PAYOUTS_PER_LEASE", LEASE)


async def payees(api: Api, count: int, method: str) -> list[str]:
    """``count`` partners paid by ``method``, each with one 5000 reward payable on FRIDAY."""
    ids = [f"partner-{n}" for n in range(1, count + 1)]
    for n, payee in enumerate(ids, start=1):
        extra = (
            {"stripe_account_id": f"acct_lease{n}"}
            if method == "stripe_connect"
            else {"payout_address": f"{payee}@bank.example"}
        )
        code = await api.register(payee, "partner", name=f"P{n}", payout_method=method, **extra)
        await referred_and_paid(api, code, [f"{payee}-referred"], at(10, 1, 13))
    return ids


async def payout_rows(db) -> dict[str, object]:
    async with db.connect() as connection:
        return {
            row.payee_id: row for row in await connection.execute(select(payouts_table).order_by(payouts_table.c.id))
        }


async def reward_statuses(db) -> dict[str, str]:
    async with db.connect() as connection:
        return {row.referrer_id: row.status for row in await connection.execute(select(referrals_table))}


async def run(api: Api, gateways: dict, wall: datetime, now: datetime = FRIDAY) -> PayoutRun:
    return await payouts.pay_referrals(
        api.new_uow, gateways, GATEWAYS, now, api.settings.referrals, wall_clock=lambda: wall
    )


def requests(fake_stripe, method: str) -> list:
    return [r for r in fake_stripe.requests if r.method == method and r.path == "/v1/transfers"]


async def test_a_crash_between_the_lease_and_its_record_leaves_one_lease_to_check_and_nobody_is_paid_twice(
    api, fake_stripe, small_leases
):
    ids = await payees(api, 5, "stripe_connect")
    connect = StripeConnectGateway(api.settings)
    leased_when_first_sent: list[dict] = []

    async def lease_committed(order: PayoutOrder) -> None:
        # Seen from another connection: the whole lease is marked tried before the provider hears of any of it.
        if not leased_when_first_sent:
            leased_when_first_sent.append(
                {p: (r.attempts, r.leased_until) for p, r in (await payout_rows(api.db)).items()}
            )

    # The provider makes the second transfer, and the process dies before hearing the answer.
    crashing = CrashingGateway(connect, crash_on=2, seen=lease_committed)
    with pytest.raises(Crash):
        await run(api, {"stripe_connect": crashing, "manual": ManualGateway()}, STARTED)

    lease_end = STARTED + payouts.SEND_LEASE
    assert leased_when_first_sent == [{p: ((1, lease_end) if p in ids[:LEASE] else (0, None)) for p in ids}]
    rows = await payout_rows(api.db)
    assert (
        {p: (r.status, r.attempts, r.leased_until) for p, r in rows.items()}
        == {
            **{p: ("pending", 1, lease_end) for p in ids[:LEASE]},  # tried, fate unknown: at most one lease
            **{p: ("pending", 0, None) for p in ids[LEASE:]},
        }
    )
    assert [t["transfer_group"] for t in fake_stripe.transfers] == [rows[p].idempotency_key for p in ids[:2]]
    assert [o.attempts for o in crashing.orders] == [0, 0]

    # Another run while the lease holds: the leased payouts are left alone, the others are sent (no lookups).
    during = await run(api, {"stripe_connect": StripeConnectGateway(api.settings)}, STARTED + timedelta(minutes=5))
    assert (during.created, during.sent, during.failed) == ([], {"paid": 2}, [])
    assert requests(fake_stripe, "GET") == []
    rows = await payout_rows(api.db)
    assert {p: rows[p].status for p in ids} == {
        **dict.fromkeys(ids[:LEASE], "pending"),
        **dict.fromkeys(ids[LEASE:], "paid"),
    }

    # After the lease: each payout of the crashed lease is checked with Stripe by its transfer group first.
    checked = CrashingGateway(StripeConnectGateway(api.settings), crash_on=0)
    after = await run(api, {"stripe_connect": checked}, lease_end + timedelta(minutes=1))
    assert (after.created, after.sent, after.failed) == ([], {"paid": LEASE}, [])
    assert [(o.payee_id, o.attempts) for o in checked.orders] == [(p, 1) for p in ids[:LEASE]]
    assert len(requests(fake_stripe, "GET")) == LEASE
    rows = await payout_rows(api.db)
    by_group = {t["transfer_group"]: t for t in fake_stripe.transfers}
    assert len(fake_stripe.transfers) == len(by_group) == 5  # one transfer per payout, ever
    assert len(requests(fake_stripe, "POST")) == 5  # the two found were not made again
    assert {p: (r.status, r.external_reference, r.amount_cents) for p, r in rows.items()} == {
        p: ("paid", by_group[rows[p].idempotency_key]["id"], 5000) for p in ids
    }
    assert {p: rows[p].attempts for p in ids} == {**dict.fromkeys(ids[:LEASE], 2), **dict.fromkeys(ids[LEASE:], 1)}
    assert await reward_statuses(api.db) == dict.fromkeys(ids, "paid")

    final = await run(api, {"stripe_connect": StripeConnectGateway(api.settings)}, lease_end + timedelta(hours=1))
    assert (final.sent, len(fake_stripe.transfers)) == ({}, 5)


async def test_a_crash_mid_lease_with_the_manual_gateway_exports_each_payout_once_when_the_lease_ends(
    api, small_leases
):
    ids = await payees(api, 4, "manual")
    manual = CrashingGateway(ManualGateway(), crash_on=1)
    with pytest.raises(Crash):
        await run(api, {"manual": manual}, STARTED)
    rows = await payout_rows(api.db)
    assert [(rows[p].status, rows[p].attempts) for p in ids] == [("pending", 1)] * LEASE + [("pending", 0)]

    # A refund now claws back rather than withdraws: the payout may have reached operations.
    await api.refund(f"{ids[0]}-referred", at(10, 16, 15))
    assert (await payout_rows(api.db))[ids[0]].amount_cents == 5000

    again = CrashingGateway(ManualGateway(), crash_on=0)
    after = await run(api, {"manual": again}, STARTED + payouts.SEND_LEASE + timedelta(seconds=1))
    assert (after.sent, after.failed) == ({"exported": 4}, [])
    assert sorted((o.payee_id, o.attempts) for o in again.orders) == sorted(
        [(p, 1) for p in ids[:LEASE]] + [(ids[LEASE], 0)]
    )
    rows = await payout_rows(api.db)
    assert {p: (r.status, r.period, r.leased_until) for p, r in rows.items()} == dict.fromkeys(
        ids, ("exported", WEEK, None)
    )
    assert await reward_statuses(api.db) == dict.fromkeys(ids, "in_payout")


# ---------------------------------------------------------------- set-based: statements do not grow with payees


class Statements:
    """Counts the SQL statements the engine sends while active."""

    def __init__(self, db) -> None:
        self.engine, self.count, self.active = db.engine.sync_engine, 0, False
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, *_args: object) -> None:
        self.count += self.active

    async def during(self, work) -> int:
        self.count, self.active = 0, True
        try:
            await work
        finally:
            self.active = False
        return self.count

    def close(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._seen)


async def test_making_and_sending_payouts_costs_the_same_statements_for_3_payees_as_for_30(api):
    """Within one chunk (1,000 payees) and one lease (100 payouts), the statements are a
    constant: one per kind of row, not one per payee."""
    small = [f"partner-a{n:02}" for n in range(3)]
    large = [f"partner-b{n:02}" for n in range(30)]
    for payees_of_week, paid_at in ((small, at(10, 1, 13)), (large, at(10, 8, 13))):  # payable Oct 16, and Oct 23
        for payee in payees_of_week:
            code = await api.register(
                payee, "partner", name=payee, payout_method="manual", payout_address=f"{payee}@bank.example"
            )
            await referred_and_paid(api, code, [f"{payee}-1", f"{payee}-2"], paid_at)
    rules, counter = api.settings.referrals, Statements(api.db)
    try:
        counts = []
        for friday, expected in ((FRIDAY, small), (at(10, 23, 14), large)):
            await payouts.release_rewards(api.new_uow, friday)
            made, sent = PayoutRun(), PayoutRun()
            making = await counter.during(payouts.make_payouts(api.new_uow, GATEWAYS, friday, rules, made))
            sending = await counter.during(
                payouts.send_payouts(api.new_uow, {"manual": ManualGateway()}, lambda friday=friday: friday, sent)
            )
            assert (len(made.created), sent.sent, sent.failed) == (len(expected), {"exported": len(expected)}, [])
            counts.append((making, sending))
    finally:
        counter.close()
    assert counts[0] == counts[1], counts
    rows = await payout_rows(api.db)
    assert {p: (rows[p].amount_cents, rows[p].status, rows[p].attempts) for p in small + large} == dict.fromkeys(
        small + large, (10000, "exported", 1)
    )
