"""Referral payouts end to end: producer events over real Redis, real `dramatiq` worker
processes, PostgreSQL, Stripe Connect transfers against a local fake Stripe.

The story is set in October and November 2026 (in the past: `credits run pay_referrals
--as-of` refuses the future). Admin and referrer routes are served by uvicorn in this
process so that their clock can be moved with the story; the periodic job is run as an
operator would, `credits run pay_referrals --as-of <moment>`, and each run is waited for
through the worker's own `referrals_paid` log line (by message id).

Fridays in the story: Oct 9, 16, 23 (New York on EDT, UTC-4), Nov 6 (after the
2026-11-01 change to EST, UTC-5).
"""

from __future__ import annotations

import csv
import io
import json
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from api.app import create_app
from infra.clock import FixedClock
from infra.db.referrals import payout_key
from infra.db.tables import (
    payout_items,
    payouts,
    referral_clawbacks,
    referral_history,
    referrals,
)
from infra.settings import load_settings
from messages import CustomerSignedUp, PaymentReversed, PaymentSucceeded, Publisher
from tests.support import InProcessServer, eventually
from tests.support.fake_stripe import FakeStripe
from tests.support.referrals import pay_referrals_as_of

pytestmark = pytest.mark.slow

FRONT_TOKEN = "front-" + uuid.uuid4().hex
ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
FRONT = {"Authorization": f"Bearer {FRONT_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CREDITS_CLI = str(Path(sys.executable).with_name("credits"))
GATEWAYS = {"stripe_connect": "stripe_connect", "cash_app": "manual", "manual": "manual"}
MINIMUM_CENTS = 1500


def at(month: int, day: int, hour: int = 12, minute: int = 0) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=UTC)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def payout_env(stripe_env) -> dict[str, str]:
    return {
        **stripe_env,
        "PAYOUT_GATEWAYS": json.dumps(GATEWAYS),
        "PAYOUT_MINIMUM_CENTS": str(MINIMUM_CENTS),
    }


@pytest.fixture
def publisher(redis_url):
    publisher = Publisher.from_url(redis_url)
    yield publisher
    publisher.close()


def app_settings(pg_url: str, redis_url: str):
    return load_settings(
        database_url=pg_url,
        redis_url=redis_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONT_TOKEN,
        payout_minimum_cents=MINIMUM_CENTS,
        event_max_age_days=36500,
    )


# ---------------------------------------------------------------- helpers


def signed_up(customer_id: str, moment: datetime, code: str | None = None) -> CustomerSignedUp:
    # A domain of their own each: no two referred customers have near-identical addresses.
    return CustomerSignedUp(
        event_id=f"signup-{customer_id}",
        occurred_at=moment,
        customer_id=customer_id,
        email=f"{customer_id}@{customer_id}.example.com",
        referral_code=code,
    )


def paid(customer_id: str, moment: datetime) -> PaymentSucceeded:
    return PaymentSucceeded(
        event_id=f"paid-{customer_id}",
        occurred_at=moment,
        customer_id=customer_id,
        payment_id=f"pay-{customer_id}",
        credits=10,
        amount_cents=4900,
        currency="USD",
    )


def refunded(customer_id: str, moment: datetime) -> PaymentReversed:
    return PaymentReversed(
        event_id=f"refund-{customer_id}",
        occurred_at=moment,
        customer_id=customer_id,
        payment_id=f"pay-{customer_id}",
        reason="refund",
        total_credits_reversed=10,
    )


async def referral_rows(db) -> dict[str, object]:
    async with db.connect() as connection:
        return {r.referred_customer_id: r for r in await connection.execute(select(referrals).order_by(referrals.c.id))}


async def history_of(db, referral_id: int) -> list[tuple[str, str | None]]:
    async with db.connect() as connection:
        rows = await connection.execute(
            select(referral_history)
            .where(referral_history.c.referral_id == referral_id)
            .order_by(referral_history.c.id)
        )
        return [(r.status, r.reason) for r in rows]


async def payout_rows(db) -> list:
    async with db.connect() as connection:
        return list(await connection.execute(select(payouts).order_by(payouts.c.id)))


async def payout_of(db, payee_id: str, period: str):
    async with db.connect() as connection:
        return (
            await connection.execute(select(payouts).where(payouts.c.payee_id == payee_id, payouts.c.period == period))
        ).one()


async def items_of(db, payout_id: int) -> list:
    async with db.connect() as connection:
        return list(
            await connection.execute(
                select(payout_items).where(payout_items.c.payout_id == payout_id).order_by(payout_items.c.id)
            )
        )


async def statuses(db, expected: dict[str, str]) -> bool:
    rows = await referral_rows(db)
    return all(c in rows and rows[c].status == s for c, s in expected.items())


def transfer_posts(fake: FakeStripe) -> list:
    return [r for r in fake.requests if r.method == "POST" and r.path == "/v1/transfers"]


async def register(http: httpx.AsyncClient, **body) -> str:
    response = await http.post("/api/admin/referrers", json=body, headers=ADMIN)
    assert response.status_code == 201, response.text
    assert response.json()["referrer_id"] == body["referrer_id"]
    return response.json()["code"]


async def record_reference(http: httpx.AsyncClient, payout_id: int, reference: str) -> None:
    response = await http.post(
        f"/api/admin/payouts/{payout_id}/reference", json={"external_reference": reference}, headers=ADMIN
    )
    assert response.status_code == 204, response.text


# ---------------------------------------------------------------- the story


async def test_referral_rewards_are_held_released_and_paid_weekly_once_per_payee(
    db, pg_url, redis_url, payout_env, fake_stripe, start_workers, publisher
):
    clock = FixedClock(at(10, 1, 12))
    workers = start_workers(processes=1, threads=2, env=payout_env)
    async with (
        InProcessServer(create_app(app_settings(pg_url, redis_url), clock=clock)) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as http,
    ):
        # ---- the payees: a partner paid by Stripe Connect, an employee paid by hand, a Cash App same-day payee, a customer
        acme = await register(
            http,
            referrer_id="partner-acme",
            kind="partner",
            name="Acme",
            payout_method="stripe_connect",
            stripe_account_id="acct_acme123",
        )
        jo = await register(
            http,
            referrer_id="emp-jo",
            kind="employee",
            name="Jo",
            payout_method="manual",
            payout_address="jo@bank.example",
        )
        sam = await register(
            http,
            referrer_id="cash-sam",
            kind="employee",
            name="Sam",
            payout_method="cash_app",
            same_day=True,
            payout_address="$samcash",
        )
        publisher.publish(
            CustomerSignedUp(
                event_id="signup-cust-ref",
                occurred_at=at(10, 1, 12),
                customer_id="cust-ref",
                email="Ref.Erin@gmail.com",
            )
        )

        async def has_summary() -> bool:
            return (await http.get("/api/referrers/cust-ref/summary", headers=FRONT)).status_code == 200

        await eventually(has_summary, message="the customer to become a referrer")
        [ref_code] = [
            c["code"] for c in (await http.get("/api/referrers/cust-ref/summary", headers=FRONT)).json()["codes"]
        ]

        # ---- referred customers sign up with the codes, then pay
        signups = {
            "r-p1": (acme, at(10, 1, 13)),
            "r-p2": (acme, at(10, 1, 13)),
            "r-e1": (jo, at(10, 1, 13)),
            "r-s1": (sam, at(10, 1, 13)),
            "r-c1": (ref_code, at(10, 1, 13)),
            "r-c2": (ref_code, at(10, 1, 13)),
            "r-p3": (acme, at(10, 8, 13)),
            "r-e2": (jo, at(10, 8, 13)),
            "r-c3": (ref_code.lower(), at(10, 8, 13)),
            "r-c4": (ref_code, at(10, 8, 13)),
            "r-p4": (acme, at(10, 22, 13)),
        }
        for customer, (code, moment) in signups.items():
            publisher.publish(signed_up(customer, moment, code))
        await eventually(
            lambda: statuses(db, {c: "awaiting_payment" for c in signups}), message="every referral to be attributed"
        )
        for customer, (_, moment) in signups.items():
            publisher.publish(paid(customer, moment.replace(hour=14)))
        await eventually(lambda: statuses(db, {c: "pending" for c in signups}), message="every referral to qualify")
        rows = await referral_rows(db)
        assert {c: rows[c].referrer_id for c in signups} == {
            "r-p1": "partner-acme",
            "r-p2": "partner-acme",
            "r-e1": "emp-jo",
            "r-s1": "cash-sam",
            "r-c1": "cust-ref",
            "r-c2": "cust-ref",
            "r-p3": "partner-acme",
            "r-e2": "emp-jo",
            "r-c3": "cust-ref",
            "r-c4": "cust-ref",
            "r-p4": "partner-acme",
        }
        assert {c: rows[c].reward_cents for c in ("r-p1", "r-e1", "r-s1", "r-c1")} == {
            "r-p1": 5000,
            "r-e1": 1000,
            "r-s1": 1000,
            "r-c1": 2000,
        }
        assert rows["r-p1"].approve_after == at(10, 15, 14)

        # ---- a refund before any payout voids the reward
        publisher.publish(refunded("r-p2", at(10, 5, 12)))
        await eventually(lambda: statuses(db, {"r-p2": "voided"}), message="the refunded reward to be voided")

        # ---- a Friday inside the hold: nothing is released, nothing is paid
        run = await pay_referrals_as_of(payout_env, workers, at(10, 9, 15))
        assert (run["released"], run["payouts_created"]) == (0, 0)
        assert await payout_rows(db) == []

        # ---- Thursday after the hold: released; only the same-day payee is paid, that day
        run = await pay_referrals_as_of(payout_env, workers, at(10, 15, 15))
        assert (run["released"], run["payouts_created"]) == (5, 1)
        assert await statuses(
            db,
            {
                "r-p1": "approved",
                "r-e1": "approved",
                "r-c1": "approved",
                "r-c2": "approved",
                "r-s1": "in_payout",
                "r-p3": "pending",
            },
        )
        [sam_payout] = await payout_rows(db)
        assert (
            sam_payout.payee_id,
            sam_payout.period,
            sam_payout.amount_cents,
            sam_payout.gateway,
            sam_payout.status,
        ) == ("cash-sam", "day-2026-10-15-1", 1000, "manual", "exported")
        assert transfer_posts(fake_stripe) == []

        clock.move_to(at(10, 15, 16))
        export = await http.get("/api/admin/payouts", params={"status": "exported", "format": "csv"}, headers=ADMIN)
        assert export.status_code == 200 and export.headers["content-type"].startswith("text/csv")
        [line] = list(csv.DictReader(io.StringIO(export.text)))
        assert (
            line["id"],
            line["payee_id"],
            line["payout_address"],
            line["method"],
            line["period"],
            line["amount_cents"],
        ) == (str(sam_payout.id), "cash-sam", "$samcash", "cash_app", "day-2026-10-15-1", "1000")
        await record_reference(http, sam_payout.id, "cashapp-0001")
        sam_payout = await payout_of(db, "cash-sam", "day-2026-10-15-1")
        assert (sam_payout.status, sam_payout.external_reference, sam_payout.paid_at) == (
            "paid",
            "cashapp-0001",
            at(10, 15, 16),
        )
        assert await statuses(db, {"r-s1": "paid"})
        summary = (await http.get("/api/referrers/cash-sam/summary", headers=FRONT)).json()
        assert (summary["paid_to_date_cents"], summary["next_payout_date"]) == (1000, "2026-10-15")

        # ---- Friday (10:00 in New York): one payout per payee; the employee's 1000 is under the minimum
        friday = at(10, 16, 14)
        run = await pay_referrals_as_of(payout_env, workers, friday)
        assert (run["released"], run["payouts_created"], run["held_back"], run["sent"], run["failed"]) == (
            0,
            2,
            1,
            {"paid": 1, "exported": 1},
            [],
        )
        acme_1 = await payout_of(db, "partner-acme", "week-2026-10-16")
        ref_1 = await payout_of(db, "cust-ref", "week-2026-10-16")
        assert (acme_1.amount_cents, acme_1.gateway, acme_1.status, acme_1.idempotency_key) == (
            5000,
            "stripe_connect",
            "paid",
            payout_key("partner-acme", "week-2026-10-16"),
        )
        assert (ref_1.amount_cents, ref_1.gateway, ref_1.status) == (4000, "manual", "exported")
        assert len(await payout_rows(db)) == 3  # and none for emp-jo
        assert await statuses(
            db, {"r-e1": "approved", "r-p1": "paid", "r-p2": "voided", "r-c1": "in_payout", "r-c2": "in_payout"}
        )
        [transfer] = fake_stripe.transfers
        assert (transfer["amount"], transfer["currency"], transfer["destination"], transfer["transfer_group"]) == (
            5000,
            "usd",
            "acct_acme123",
            acme_1.idempotency_key,
        )
        assert transfer["metadata"] == {
            "payout_id": str(acme_1.id),
            "payee_id": "partner-acme",
            "period": "week-2026-10-16",
        }
        assert [r.idempotency_key for r in transfer_posts(fake_stripe)] == [acme_1.idempotency_key]
        assert acme_1.external_reference == transfer["id"]

        # ---- the same batch again, later that Friday: nobody is paid twice
        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 21))
        assert (run["released"], run["payouts_created"], run["sent"]) == (0, 0, {})
        assert len(transfer_posts(fake_stripe)) == 1 and len(fake_stripe.transfers) == 1
        assert len(await payout_rows(db)) == 3
        assert (await payout_of(db, "partner-acme", "week-2026-10-16")).attempts == 1
        assert (await payout_of(db, "cust-ref", "week-2026-10-16")).status == "exported"

        clock.move_to(at(10, 16, 22))
        await record_reference(http, ref_1.id, "ach-ref-1")
        assert await statuses(db, {"r-c1": "paid", "r-c2": "paid"})
        again = await http.post(
            f"/api/admin/payouts/{ref_1.id}/reference", json={"external_reference": "ach-ref-1-again"}, headers=ADMIN
        )
        assert again.status_code == 409

        # ---- a refund after payout: a clawback, taken from the next payout
        publisher.publish(refunded("r-c1", at(10, 20, 12)))

        async def clawback_recorded() -> bool:
            async with db.connect() as connection:
                return (await connection.execute(select(referral_clawbacks))).first() is not None

        await eventually(clawback_recorded, message="the clawback")
        rows = await referral_rows(db)
        assert rows["r-c1"].status == "paid"
        assert (await history_of(db, rows["r-c1"].id))[-1] == (
            "paid",
            "qualifying payment pay-r-c1 refunded: 2000 clawed back from the next payout",
        )
        clock.move_to(at(10, 20, 13))
        summary = (await http.get("/api/referrers/cust-ref/summary", headers=FRONT)).json()
        assert (summary["paid_to_date_cents"], summary["clawbacks_pending_cents"], summary["next_payout_date"]) == (
            4000,
            2000,
            "2026-10-23",
        )

        # ---- the next Friday: the held-back employee adds up; the customer's payout is reduced
        run = await pay_referrals_as_of(payout_env, workers, at(10, 23, 14))
        assert (run["released"], run["payouts_created"], run["held_back"]) == (4, 3, 0)
        acme_2 = await payout_of(db, "partner-acme", "week-2026-10-23")
        jo_2 = await payout_of(db, "emp-jo", "week-2026-10-23")
        ref_2 = await payout_of(db, "cust-ref", "week-2026-10-23")
        assert [(p.amount_cents, p.status) for p in (acme_2, jo_2, ref_2)] == [
            (5000, "paid"),
            (2000, "exported"),
            (2000, "exported"),
        ]
        rows = await referral_rows(db)
        assert {(i.referral_id, i.clawback_id, i.amount_cents) for i in await items_of(db, ref_2.id)} == {
            (rows["r-c3"].id, None, 2000),
            (rows["r-c4"].id, None, 2000),
            (None, 1, -2000),
        }
        assert {i.referral_id for i in await items_of(db, jo_2.id)} == {rows["r-e1"].id, rows["r-e2"].id}
        async with db.connect() as connection:
            [claw] = list(await connection.execute(select(referral_clawbacks)))
        assert (claw.referral_id, claw.payee_id, claw.amount_cents, claw.payout_id) == (
            rows["r-c1"].id,
            "cust-ref",
            2000,
            ref_2.id,
        )
        clock.move_to(at(10, 23, 15))
        summary = (await http.get("/api/referrers/cust-ref/summary", headers=FRONT)).json()
        assert (summary["clawbacks_pending_cents"], summary["upcoming_cents"]) == (0, 4000)

        # ---- after the change to EST: Thursday 23:30 in New York (Friday in UTC) is not a payout day
        run = await pay_referrals_as_of(payout_env, workers, at(11, 6, 4, 30))
        assert (run["released"], run["payouts_created"]) == (1, 0)
        assert await statuses(db, {"r-p4": "approved"})
        # ... Friday 23:30 in New York (Saturday 04:30 UTC) is, and the period is that Friday's
        run = await pay_referrals_as_of(payout_env, workers, at(11, 7, 4, 30))
        assert (run["released"], run["payouts_created"], run["sent"]) == (0, 1, {"paid": 1})
        acme_3 = await payout_of(db, "partner-acme", "week-2026-11-06")
        assert (acme_3.amount_cents, acme_3.status) == (5000, "paid")

        # ---- the books: one transfer per Stripe Connect payout, every reward paid at most once
        assert [t["transfer_group"] for t in fake_stripe.transfers] == [
            acme_1.idempotency_key,
            acme_2.idempotency_key,
            acme_3.idempotency_key,
        ]
        assert len(transfer_posts(fake_stripe)) == 3
        rows = await referral_rows(db)
        assert rows["r-p2"].payout_id is None and rows["r-p2"].status == "voided"
        assert "paid" not in [s for s, _ in await history_of(db, rows["r-p2"].id)]
        listing = (await http.get("/api/admin/payouts", params={"payee": "partner-acme"}, headers=ADMIN)).json()
        assert (listing["total"], listing["total_cents"]) == (3, 15000)
        assert {p["status"] for p in listing["payouts"]} == {"paid"}
        everyone = (await http.get("/api/admin/payouts", headers=ADMIN)).json()
        assert (everyone["total"], everyone["total_cents"]) == (7, 1000 + 5000 + 4000 + 5000 + 2000 + 2000 + 5000)


# ---------------------------------------------------------------- failed and lost transfers


async def _one_partner_reward_per_friday(http, db, publisher) -> None:
    """partner-zen (Stripe Connect): a 5000 reward payable on Friday Oct 16, another on Friday Oct 23."""
    code = await register(
        http,
        referrer_id="partner-zen",
        kind="partner",
        name="Zen",
        payout_method="stripe_connect",
        stripe_account_id="acct_zen456",
    )
    publisher.publish(signed_up("z-1", at(10, 1, 13), code))
    publisher.publish(signed_up("z-2", at(10, 8, 13), code))
    await eventually(
        lambda: statuses(db, {"z-1": "awaiting_payment", "z-2": "awaiting_payment"}), message="the referrals"
    )
    publisher.publish(paid("z-1", at(10, 1, 14)))
    publisher.publish(paid("z-2", at(10, 8, 14)))
    await eventually(lambda: statuses(db, {"z-1": "pending", "z-2": "pending"}), message="the rewards to qualify")


async def test_a_transfer_whose_answer_was_lost_is_found_by_its_transfer_group_not_made_twice(
    db, pg_url, redis_url, payout_env, fake_stripe, start_workers, publisher
):
    clock = FixedClock(at(10, 1, 12))
    workers = start_workers(processes=1, threads=2, env=payout_env)
    async with (
        InProcessServer(create_app(app_settings(pg_url, redis_url), clock=clock)) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as http,
    ):
        await _one_partner_reward_per_friday(http, db, publisher)

        # Stripe makes the transfer, but answers after the client's 1 s timeout.
        fake_stripe.transfer_script.append("timeout")
        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 14))
        payout = await payout_of(db, "partner-zen", "week-2026-10-16")
        assert run["failed"] == [payout.id]
        assert (payout.status, payout.attempts, payout.paid_at) == ("failed", 1, None)
        assert "APIConnectionError" in payout.last_error
        assert len(fake_stripe.transfers) == 1  # it went through

        clock.move_to(at(10, 16, 14, 30))
        listed = (await http.get("/api/admin/payouts", params={"status": "failed"}, headers=ADMIN)).json()
        assert [(p["id"], p["status"], p["last_error"]) for p in listed["payouts"]] == [
            (payout.id, "failed", payout.last_error)
        ]
        assert await statuses(db, {"z-1": "in_payout"})

        # The next run asks Stripe for the payout's transfer group first: found, recorded, not made again.
        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 15))
        assert run["sent"] == {"paid": 1}
        payout = await payout_of(db, "partner-zen", "week-2026-10-16")
        [transfer] = fake_stripe.transfers
        assert (payout.status, payout.external_reference, payout.attempts, payout.last_error) == (
            "paid",
            transfer["id"],
            2,
            None,
        )
        assert len(transfer_posts(fake_stripe)) == 1
        lookups = [r for r in fake_stripe.requests if r.method == "GET" and r.path == "/v1/transfers"]
        assert len(lookups) == 1
        assert await statuses(db, {"z-1": "paid"})

        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 16))
        assert run["sent"] == {} and len(transfer_posts(fake_stripe)) == 1


async def test_a_failed_transfer_stays_failed_and_visible_then_the_next_run_pays_it_once(
    db, pg_url, redis_url, payout_env, fake_stripe, start_workers, publisher
):
    clock = FixedClock(at(10, 1, 12))
    workers = start_workers(processes=1, threads=2, env=payout_env)
    async with (
        InProcessServer(create_app(app_settings(pg_url, redis_url), clock=clock)) as server,
        httpx.AsyncClient(base_url=server.base_url, timeout=10) as http,
    ):
        await _one_partner_reward_per_friday(http, db, publisher)

        # Stripe answers 500: no transfer is made.
        fake_stripe.transfer_script.append("server_error")
        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 14))
        payout = await payout_of(db, "partner-zen", "week-2026-10-16")
        assert run["failed"] == [payout.id]
        assert (payout.status, payout.paid_at, payout.external_reference) == ("failed", None, None)
        assert "APIError" in payout.last_error
        assert fake_stripe.transfers == []
        assert await statuses(db, {"z-1": "in_payout"})

        clock.move_to(at(10, 16, 14, 30))
        listed = (
            await http.get("/api/admin/payouts", params={"status": "failed", "payee": "partner-zen"}, headers=ADMIN)
        ).json()
        assert (listed["total"], listed["total_cents"]) == (1, 5000)
        assert listed["payouts"][0]["last_error"] == payout.last_error
        assert (await http.get("/api/admin/payouts", params={"status": "paid"}, headers=ADMIN)).json()["total"] == 0
        # A failed Stripe payout is not for operations to settle by hand.
        assert (
            await http.post(
                f"/api/admin/payouts/{payout.id}/reference", json={"external_reference": "x"}, headers=ADMIN
            )
        ).status_code == 409

        # The next run (an hour later) tries again and pays it: one transfer.
        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 15))
        payout = await payout_of(db, "partner-zen", "week-2026-10-16")
        assert payout.status == "paid", (
            f"the retried transfer failed again: {payout.last_error!r}; Stripe replays the saved 500 for the reused idempotency key {payout.idempotency_key!r}"
        )
        [transfer] = fake_stripe.transfers
        assert (transfer["transfer_group"], payout.external_reference) == (payout.idempotency_key, transfer["id"])
        assert await statuses(db, {"z-1": "paid"})

        run = await pay_referrals_as_of(payout_env, workers, at(10, 16, 16))
        assert run["sent"] == {} and len(fake_stripe.transfers) == 1
