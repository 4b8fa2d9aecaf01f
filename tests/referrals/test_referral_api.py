"""The referral routes on the in-process app (httpx over ASGI, a movable clock), PostgreSQL.

Data is set up through the service layer on the same database: producer events with
`handlers.apply_event(..., referral_rules=settings.referrals)`, payouts with
`service_layer.payouts` and a manual gateway plus a stub Stripe Connect gateway. The story
is dated in October and November 2026 (New York on EDT until 2026-11-01, then EST).
"""

from __future__ import annotations

import csv
import io
import re
from datetime import datetime

import httpx
import pytest

from api.app import create_app
from domain.referrals import CODE_PATTERN
from infra.clock import FixedClock
from infra.db.referrals import payout_key
from infra.settings import load_settings
from messages import (
    ReferralSubmitted,
)
from service_layer import payouts
from service_layer.payouts import PayoutRun
from tests.support.referrals import (
    ADMIN,
    ADMIN_TOKEN,
    FRONT,
    FRONT_TOKEN,
    GATEWAYS,
    PAYOUT_CSV_COLUMNS,
    REFERRAL_CSV_COLUMNS,
    VELOCITY_LIMIT,
    Api,
    StubConnect,
    at,
    pay_referrals,
)


@pytest.fixture
async def api(db, pg_url):
    settings = load_settings(
        database_url=pg_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONT_TOKEN,
        referral_velocity_limit=VELOCITY_LIMIT,
        event_max_age_days=36500,
    )
    clock = FixedClock(at(10, 1, 12))
    app = create_app(settings, clock=clock, db=db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http:
        yield Api(http, clock, settings, db)


# ---------------------------------------------------------------- referrers and codes


async def test_admin_registers_referrers_and_manages_their_codes(api):
    response = await api.http.post(
        "/api/admin/referrers",
        json={
            "referrer_id": "partner-acme",
            "kind": "partner",
            "name": "Acme Corp",
            "email": "Partners@Acme.example",
            "payout_method": "stripe_connect",
            "stripe_account_id": "acct_acme1",
        },
        headers=ADMIN,
    )
    assert response.status_code == 201, response.text
    first = response.json()["code"]
    assert response.json()["referrer_id"] == "partner-acme"
    assert re.fullmatch(r"ACMECORP-[A-HJ-NP-Z2-9]{5}", first) and CODE_PATTERN.match(first)

    duplicate = await api.http.post(
        "/api/admin/referrers", json={"referrer_id": "partner-acme", "kind": "employee"}, headers=ADMIN
    )
    assert duplicate.status_code == 409
    assert "partner-acme" in duplicate.json()["detail"]
    for bad in (
        {"referrer_id": "aff-1", "kind": "affiliate"},
        {"referrer_id": "aff-1", "kind": "partner", "stripe_account_id": "not-an-account"},
        {"referrer_id": "aff-1", "kind": "partner", "commission": 5},
        {"kind": "partner"},
    ):
        assert (await api.http.post("/api/admin/referrers", json=bad, headers=ADMIN)).status_code == 422, bad
    jo = await api.register("emp-jo", "employee", name="Jo")

    # A code of one's own: matched case-insensitively, unique across referrers.
    added = await api.http.post("/api/admin/referrers/partner-acme/codes", json={"code": "acme-fall"}, headers=ADMIN)
    assert (added.status_code, added.json()) == (201, {"referrer_id": "partner-acme", "code": "ACME-FALL"})
    for taken in ("ACME-FALL", "Acme-Fall", jo.lower()):
        assert (
            await api.http.post("/api/admin/referrers/emp-jo/codes", json={"code": taken}, headers=ADMIN)
        ).status_code == 409, taken
    random_code = await api.http.post("/api/admin/referrers/partner-acme/codes", json={}, headers=ADMIN)
    assert random_code.status_code == 201 and random_code.json()["code"].startswith("ACMECORP-")
    assert (await api.http.post("/api/admin/referrers/nobody/codes", json={}, headers=ADMIN)).status_code == 404
    assert (
        await api.http.post("/api/admin/referrers/emp-jo/codes", json={"code": "no spaces"}, headers=ADMIN)
    ).status_code == 422

    # A deactivated code: a referral with it is rejected, with the reason.
    api.clock.move_to(at(10, 2, 9))
    assert (await api.http.post("/api/admin/referral-codes/acme-fall/deactivate", headers=ADMIN)).status_code == 204
    assert (await api.http.post("/api/admin/referral-codes/NOPE-2345/deactivate", headers=ADMIN)).status_code == 404
    assert (await api.http.post("/api/admin/referral-codes/ACME-FALL/pause", headers=ADMIN)).status_code == 422
    codes = {c["code"]: c["active"] for c in (await api.summary("partner-acme"))["codes"]}
    assert codes == {first: True, "ACME-FALL": False, random_code.json()["code"]: True}

    await api.sign_up("cust-late", at(10, 2, 10), "acme-fall")
    [rejected] = (await api.referrals(status="rejected"))["referrals"]
    assert (rejected["referred_customer_id"], rejected["referrer_id"], rejected["code"], rejected["reason"]) == (
        "cust-late",
        "partner-acme",
        "ACME-FALL",
        "the referral code is no longer active",
    )
    assert [(h["status"], h["reason"]) for h in rejected["history"]] == [
        ("rejected", "the referral code is no longer active")
    ]

    # The same customer may still be referred with a working code (lower case is fine); an unknown code is rejected.
    await api.apply(
        ReferralSubmitted(
            event_id="submit-late",
            occurred_at=at(10, 2, 11),
            referral_code=first.lower(),
            referred_customer_id="cust-late",
        )
    )
    await api.apply(
        ReferralSubmitted(
            event_id="submit-ghost",
            occurred_at=at(10, 2, 11),
            referral_code="GHOST-2345",
            referred_customer_id="cust-ghost",
        )
    )
    stands = await api.referral_of("cust-late")
    assert (stands["status"], stands["referrer_id"], stands["code"]) == ("awaiting_payment", "partner-acme", first)
    ghost = await api.referral_of("cust-ghost")
    assert (ghost["status"], ghost["referrer_id"], ghost["reason"]) == ("rejected", None, "unknown referral code")

    # Reactivated, the code works again.
    assert (await api.http.post("/api/admin/referral-codes/ACME-FALL/activate", headers=ADMIN)).status_code == 204
    await api.sign_up("cust-fall", at(10, 3, 10), "ACME-FALL")
    assert (await api.referral_of("cust-fall"))["status"] == "awaiting_payment"

    # How a referrer is paid can change.
    patched = await api.http.patch(
        "/api/admin/referrers/emp-jo",
        json={"payout_method": "cash_app", "same_day": True, "payout_address": "$jo"},
        headers=ADMIN,
    )
    assert patched.status_code == 204
    assert (
        await api.http.patch("/api/admin/referrers/nobody", json={"same_day": True}, headers=ADMIN)
    ).status_code == 404
    api.clock.move_to(at(10, 7, 16))  # a Wednesday
    assert (await api.summary("emp-jo"))["next_payout_date"] == "2026-10-07"
    assert (await api.summary("partner-acme"))["next_payout_date"] == "2026-10-09"


# ---------------------------------------------------------------- rewards


async def test_referrals_are_listed_with_filters_totals_history_and_as_csv(api):
    partner = await api.register("partner-p", "partner", name="Pat")
    employee = await api.register("emp-e", "employee", name="Eve")
    await api.sign_up("cust-c", at(10, 1, 9), email="carla@example.com")
    customer_code = (await api.summary("cust-c"))["codes"][0]["code"]

    await api.sign_up("a1", at(10, 1, 13), partner)
    await api.pay("a1", at(10, 1, 14))
    await api.sign_up("a2", at(10, 2, 13), employee)
    await api.pay("a2", at(10, 2, 14))
    await api.sign_up("a3", at(10, 3, 13), employee)  # never pays
    await api.sign_up("a4", at(10, 4, 13), customer_code)
    await api.pay("a4", at(10, 4, 14))
    await api.refund("a4", at(10, 5, 9))
    await api.apply(
        ReferralSubmitted(
            event_id="submit-a5", occurred_at=at(10, 5, 13), referral_code="NOSUCH-2345", referred_customer_id="a5"
        )
    )

    everything = await api.referrals()
    assert [r["referred_customer_id"] for r in everything["referrals"]] == ["a1", "a2", "a3", "a4", "a5"]
    assert everything["total"] == 5
    by_customer = {r["referred_customer_id"]: r for r in everything["referrals"]}
    assert {c: (r["status"], r["referrer_id"], r["reward_cents"]) for c, r in by_customer.items()} == {
        "a1": ("pending", "partner-p", 5000),
        "a2": ("pending", "emp-e", 1000),
        "a3": ("awaiting_payment", "emp-e", None),
        "a4": ("voided", "cust-c", 2000),
        "a5": ("rejected", None, None),
    }
    assert datetime.fromisoformat(by_customer["a1"]["approve_after"]) == at(10, 15, 14)
    assert [(h["status"], h["reason"]) for h in by_customer["a4"]["history"]] == [
        ("awaiting_payment", None),
        ("pending", "first payment pay-a4; held until 2026-10-18"),
        ("voided", "qualifying payment pay-a4 refunded"),
    ]
    assert [datetime.fromisoformat(h["at"]) for h in by_customer["a4"]["history"]] == [
        at(10, 4, 13),
        at(10, 4, 14),
        at(10, 5, 9),
    ]

    pending = await api.referrals(status="pending")
    assert (
        [r["referred_customer_id"] for r in pending["referrals"]],
        pending["total"],
        pending["total_reward_cents"],
    ) == (["a1", "a2"], 2, 6000)
    employee_view = await api.referrals(payee="emp-e")
    assert ([r["referred_customer_id"] for r in employee_view["referrals"]], employee_view["total_reward_cents"]) == (
        ["a2", "a3"],
        1000,
    )
    window = await api.referrals(since=at(10, 2).isoformat(), until=at(10, 4).isoformat())
    assert [r["referred_customer_id"] for r in window["referrals"]] == ["a2", "a3"]
    # Offsets are honoured: 09:30 in New York on Oct 3 is 13:30 UTC, after a3 was submitted.
    later = await api.referrals(since="2026-10-03T09:30:00-04:00")
    assert [r["referred_customer_id"] for r in later["referrals"]] == ["a4", "a5"]
    page = await api.referrals(limit=2, offset=1)
    assert (page["total"], [r["referred_customer_id"] for r in page["referrals"]]) == (5, ["a2", "a3"])
    for bad in ({"status": "lost"}, {"since": "2026-10-02T00:00:00"}, {"format": "xml"}, {"limit": 0}):
        assert (await api.http.get("/api/admin/referrals", params=bad, headers=ADMIN)).status_code == 422, bad

    exported = await api.http.get("/api/admin/referrals", params={"format": "csv", "payee": "emp-e"}, headers=ADMIN)
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    assert 'filename="referrals.csv"' in exported.headers["content-disposition"]
    reader = csv.DictReader(io.StringIO(exported.text))
    assert reader.fieldnames == REFERRAL_CSV_COLUMNS
    rows = list(reader)
    assert [(r["referred_customer_id"], r["status"], r["reward_cents"], r["referrer_id"]) for r in rows] == [
        ("a2", "pending", "1000", "emp-e"),
        ("a3", "awaiting_payment", "", "emp-e"),
    ]
    assert rows[0]["id"] == str(by_customer["a2"]["id"]) and rows[0]["qualifying_payment_id"] == "pay-a2"
    assert datetime.fromisoformat(rows[0]["submitted_at"]) == at(10, 2, 13)
    full = list(
        csv.DictReader(
            io.StringIO((await api.http.get("/api/admin/referrals", params={"format": "csv"}, headers=ADMIN)).text)
        )
    )
    assert len(full) == 5
    assert [(r["referrer_id"], r["reason"]) for r in full if r["referred_customer_id"] == "a5"] == [
        ("", "unknown referral code")
    ]


async def test_flagged_referrals_wait_for_an_admin_who_approves_or_rejects_them(api):
    partner = await api.register("partner-v", "partner", name="Vic")
    employee = await api.register("emp-f", "employee", name="Fay")
    # Velocity: the fourth referral within 24 hours (limit 3) is suspicious, and so is the fifth.
    for n, hour in enumerate((8, 9, 10, 11, 12), start=1):
        await api.sign_up(f"v{n}", at(10, 1, hour), partner)
    # The same card as another referred customer (of another referrer: the employee).
    await api.sign_up("g1", at(10, 1, 8), employee, fingerprint="fp_shared")
    await api.sign_up("g2", at(10, 1, 9), partner, fingerprint="fp_shared")
    for customer in ("v1", "v2", "v3", "v4", "v5", "g1", "g2"):
        await api.pay(customer, at(10, 1, 14))

    # The rules are judged again when the first payment qualifies a referral, with everything
    # known by then: g2 (dated 09:00, recorded after v3) counts in v3's window, and g1, whose card
    # g2 shares, is flagged too.
    flagged = await api.referrals(status="flagged")
    assert {r["referred_customer_id"]: r["flags"] for r in flagged["referrals"]} == {
        "v3": ["velocity: 4 referrals within 24 h"],
        "v4": ["velocity: 5 referrals within 24 h"],
        "v5": ["velocity: 6 referrals within 24 h"],
        "g1": ["payment card shared with another customer"],
        "g2": ["payment card shared with another customer"],
    }
    assert flagged["total_reward_cents"] == 4 * 5000 + 1000
    v4 = await api.referral_of("v4")
    assert [(h["status"], h["reason"]) for h in v4["history"]] == [
        ("awaiting_payment", "velocity: 4 referrals within 24 h"),
        ("flagged", "velocity: 5 referrals within 24 h"),
    ]

    # Approved during the hold: pending until it ends.
    api.clock.move_to(at(10, 3, 10))
    approved = await api.http.post(f"/api/admin/referrals/{v4['id']}/approve", json={"admin": "alice"}, headers=ADMIN)
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert (body["id"], body["status"], body["flags"], body["approve_after"]) == (
        v4["id"],
        "pending",
        [],
        v4["approve_after"],
    )
    assert (
        body["history"][-1]["status"],
        body["history"][-1]["reason"],
        datetime.fromisoformat(body["history"][-1]["at"]),
    ) == ("pending", "approved by alice", at(10, 3, 10))

    # Rejected with a reason.
    g2 = await api.referral_of("g2")
    rejected = await api.http.post(
        f"/api/admin/referrals/{g2['id']}/reject", json={"admin": "bob", "reason": "same card as g1"}, headers=ADMIN
    )
    assert rejected.status_code == 200, rejected.text
    assert (rejected.json()["status"], rejected.json()["reason"], rejected.json()["history"][-1]["reason"]) == (
        "rejected",
        "same card as g1",
        "rejected by bob: same card as g1",
    )

    # Only a flagged one can be approved by hand.
    v1 = await api.referral_of("v1")
    refused = await api.http.post(f"/api/admin/referrals/{v1['id']}/approve", json={"admin": "alice"}, headers=ADMIN)
    assert refused.status_code == 409
    assert refused.json()["detail"] == "only a flagged reward can be approved by hand; this one is pending"
    assert (
        await api.http.post(f"/api/admin/referrals/{v4['id']}/approve", json={"admin": "alice"}, headers=ADMIN)
    ).status_code == 409
    assert (
        await api.http.post(f"/api/admin/referrals/{g2['id']}/approve", json={"admin": "alice"}, headers=ADMIN)
    ).status_code == 409
    assert (
        await api.http.post("/api/admin/referrals/999999/approve", json={"admin": "alice"}, headers=ADMIN)
    ).status_code == 404
    assert (await api.http.post(f"/api/admin/referrals/{v1['id']}/approve", json={}, headers=ADMIN)).status_code == 422
    assert (
        await api.http.post(f"/api/admin/referrals/{v1['id']}/promote", json={"admin": "alice"}, headers=ADMIN)
    ).status_code in (404, 405, 422)

    # The hold ends: the approved one is released with the others; the rejected one stays rejected.
    run = await pay_referrals(api, at(10, 15, 15))  # a Thursday: released, nothing paid
    assert (run.released, run.created) == (3, [])
    statuses = {r["referred_customer_id"]: r["status"] for r in (await api.referrals())["referrals"]}
    assert statuses == {
        "v1": "approved",
        "v2": "approved",
        "v3": "flagged",
        "v4": "approved",
        "v5": "flagged",
        "g1": "flagged",
        "g2": "rejected",
    }

    # Approved after the hold is over: payable at once.
    api.clock.move_to(at(10, 16, 9))
    v5 = await api.referral_of("v5")
    late = await api.http.post(f"/api/admin/referrals/{v5['id']}/approve", json={"admin": "alice"}, headers=ADMIN)
    assert late.json()["status"] == "approved"
    assert [h["status"] for h in late.json()["history"]][-3:] == ["flagged", "pending", "approved"]


# ---------------------------------------------------------------- payouts


async def test_payouts_are_listed_with_filters_and_csv_and_exported_ones_take_a_reference(api):
    p = await api.register(
        "partner-p", "partner", name="Pat", payout_method="stripe_connect", stripe_account_id="acct_pat1"
    )
    q = await api.register(
        "partner-q", "partner", name="Quin", payout_method="stripe_connect", stripe_account_id="acct_quin1"
    )
    e = await api.register("emp-e", "employee", name="Eve", payout_method="manual", payout_address="eve@bank.example")
    s = await api.register(
        "cash-s", "employee", name="Sol", payout_method="cash_app", same_day=True, payout_address="$solcash"
    )
    for customer, code in (("p1", p), ("q1", q), ("e1", e), ("s1", s)):
        await api.sign_up(customer, at(10, 1, 13), code)
        await api.pay(customer, at(10, 1, 14))
    await api.sign_up("e2", at(10, 8, 13), e)
    await api.pay("e2", at(10, 8, 14))

    connect = StubConnect(failing={"partner-q"})
    run = await pay_referrals(api, at(10, 16, 14), connect)  # Friday
    assert (run.released, len(run.created), run.sent) == (4, 4, {"paid": 1, "exported": 2})
    assert [o.idempotency_key for o in sorted(connect.orders, key=lambda o: o.payee_id)] == [
        payout_key("partner-p", "week-2026-10-16"),
        payout_key("partner-q", "week-2026-10-16"),
    ]
    # The next Friday's payout made but not sent yet (a run that stopped between the two steps).
    await payouts.release_rewards(api.new_uow, at(10, 23, 14))
    await payouts.make_payouts(api.new_uow, GATEWAYS, at(10, 23, 14), api.settings.referrals, PayoutRun())

    everything = await api.payouts()
    assert (everything["total"], everything["total_cents"]) == (5, 5000 + 5000 + 1000 + 1000 + 1000)
    by_key = {(r["payee_id"], r["period"]): r for r in everything["payouts"]}
    assert {k: (r["status"], r["amount_cents"], r["method"], r["gateway"]) for k, r in by_key.items()} == {
        ("partner-p", "week-2026-10-16"): ("paid", 5000, "stripe_connect", "stripe_connect"),
        ("partner-q", "week-2026-10-16"): ("failed", 5000, "stripe_connect", "stripe_connect"),
        ("emp-e", "week-2026-10-16"): ("exported", 1000, "manual", "manual"),
        ("cash-s", "day-2026-10-16-1"): ("exported", 1000, "cash_app", "manual"),
        ("emp-e", "week-2026-10-23"): ("pending", 1000, "manual", "manual"),
    }
    paid_p = by_key[("partner-p", "week-2026-10-16")]
    assert (paid_p["external_reference"], paid_p["payee_name"], paid_p["attempts"], paid_p["currency"]) == (
        f"tr_stub_{paid_p['id']}",
        "Pat",
        1,
        "USD",
    )
    failed_q = by_key[("partner-q", "week-2026-10-16")]
    assert (failed_q["last_error"], failed_q["paid_at"], failed_q["external_reference"]) == (
        "APIError: An unknown error occurred",
        None,
        None,
    )

    assert [(r["payee_id"], r["status"]) for r in (await api.payouts(status="failed"))["payouts"]] == [
        ("partner-q", "failed")
    ]
    exported = await api.payouts(status="exported")
    assert ({r["payee_id"] for r in exported["payouts"]}, exported["total"], exported["total_cents"]) == (
        {"emp-e", "cash-s"},
        2,
        2000,
    )
    assert [(r["period"], r["status"]) for r in (await api.payouts(payee="emp-e"))["payouts"]] == [
        ("week-2026-10-16", "exported"),
        ("week-2026-10-23", "pending"),
    ]
    assert [r["period"] for r in (await api.payouts(since=at(10, 20).isoformat()))["payouts"]] == ["week-2026-10-23"]
    assert (await api.payouts(until=at(10, 20).isoformat()))["total"] == 4
    for bad in ({"status": "sent"}, {"until": "2026-10-20"}, {"format": "pdf"}):
        assert (await api.http.get("/api/admin/payouts", params=bad, headers=ADMIN)).status_code == 422, bad

    sheet = await api.http.get("/api/admin/payouts", params={"status": "exported", "format": "csv"}, headers=ADMIN)
    assert (
        sheet.headers["content-type"].startswith("text/csv")
        and 'filename="payouts.csv"' in sheet.headers["content-disposition"]
    )
    reader = csv.DictReader(io.StringIO(sheet.text))
    assert reader.fieldnames == PAYOUT_CSV_COLUMNS
    lines = {r["payee_id"]: r for r in reader}
    assert {
        k: (
            r["payee_name"],
            r["payout_address"],
            r["method"],
            r["period"],
            r["amount_cents"],
            r["currency"],
            r["status"],
            r["external_reference"],
        )
        for k, r in lines.items()
    } == {
        "emp-e": ("Eve", "eve@bank.example", "manual", "week-2026-10-16", "1000", "USD", "exported", ""),
        "cash-s": ("Sol", "$solcash", "cash_app", "day-2026-10-16-1", "1000", "USD", "exported", ""),
    }

    # Operations paid the exported ones by hand.
    api.clock.move_to(at(10, 16, 18))
    for payee in ("emp-e", "cash-s"):
        response = await api.http.post(
            f"/api/admin/payouts/{lines[payee]['id']}/reference",
            json={"external_reference": f"manual-{payee}"},
            headers=ADMIN,
        )
        assert response.status_code == 204, response.text
    settled = {r["payee_id"]: r for r in (await api.payouts(status="paid"))["payouts"]}
    assert {
        k: (r["external_reference"], datetime.fromisoformat(r["paid_at"]) if k != "partner-p" else None)
        for k, r in settled.items()
    } == {
        "partner-p": (paid_p["external_reference"], None),
        "emp-e": ("manual-emp-e", at(10, 16, 18)),
        "cash-s": ("manual-cash-s", at(10, 16, 18)),
    }
    assert {r["referred_customer_id"]: r["status"] for r in (await api.referrals())["referrals"]} == {
        "p1": "paid",
        "q1": "in_payout",
        "e1": "paid",
        "s1": "paid",
        "e2": "in_payout",
    }

    # Only an exported payout takes a reference.
    pending_e = by_key[("emp-e", "week-2026-10-23")]["id"]
    for payout_id in (pending_e, failed_q["id"], paid_p["id"], int(lines["emp-e"]["id"])):
        response = await api.http.post(
            f"/api/admin/payouts/{payout_id}/reference", json={"external_reference": "r-1"}, headers=ADMIN
        )
        assert response.status_code == 409, payout_id
    assert (
        await api.http.post("/api/admin/payouts/999999/reference", json={"external_reference": "r-1"}, headers=ADMIN)
    ).status_code == 404
    assert (await api.http.post(f"/api/admin/payouts/{pending_e}/reference", json={}, headers=ADMIN)).status_code == 422
    assert (await api.payouts(payee="emp-e", status="paid"))["total"] == 1


# ---------------------------------------------------------------- the referrer's own view


async def test_a_referrer_sees_codes_counts_paid_to_date_clawbacks_and_the_next_payout_day(api):
    await api.sign_up("cust-c", at(10, 1, 9), email="Carla.Diaz@gmail.com")
    first = (await api.summary("cust-c"))["codes"][0]["code"]
    assert CODE_PATTERN.match(first) and "CARLA" not in first  # a customer's shared code does not reveal them
    second = (
        await api.http.post("/api/admin/referrers/cust-c/codes", json={"code": "CARLA-2026"}, headers=ADMIN)
    ).json()["code"]
    s = await api.register(
        "cash-s", "employee", name="Sol", payout_method="cash_app", same_day=True, payout_address="$solcash"
    )

    await api.sign_up("c-a", at(10, 1, 13), first)
    await api.sign_up("c-b", at(10, 1, 13, 30), second)
    await api.sign_up(
        "c-self", at(10, 1, 14), first, email="carladiaz+promo@googlemail.com"
    )  # herself, spelled differently
    for customer in ("c-a", "c-b"):
        await api.pay(customer, at(10, 1, 15))
    run = await pay_referrals(api, at(10, 16, 14))
    assert run.sent == {"exported": 1}
    [payout] = (await api.payouts(payee="cust-c"))["payouts"]
    api.clock.move_to(at(10, 16, 15))
    assert (
        await api.http.post(
            f"/api/admin/payouts/{payout['id']}/reference", json={"external_reference": "ach-1"}, headers=ADMIN
        )
    ).status_code == 204
    await api.sign_up("c-c", at(10, 9, 13), first)
    await api.pay("c-c", at(10, 9, 14))
    await api.sign_up("c-d", at(10, 10, 13), second)
    await api.refund("c-a", at(10, 20, 9))  # after payout: a clawback

    self_referral = await api.referral_of("c-self")
    assert (self_referral["status"], self_referral["reason"]) == ("rejected", "self-referral: same email address")

    api.clock.move_to(at(11, 3, 15))  # Tuesday
    summary = await api.summary("cust-c")
    assert {k: v for k, v in summary.items() if k != "codes"} == {
        "referrer_id": "cust-c",
        "kind": "customer",
        "referrals_by_status": {"paid": 2, "pending": 1, "awaiting_payment": 1, "rejected": 1},
        "paid_to_date_cents": 4000,
        "upcoming_cents": 0,
        "clawbacks_pending_cents": 2000,
        "next_payout_date": "2026-11-06",
    }
    assert [(c["code"], c["active"]) for c in summary["codes"]] == [(first, True), (second, True)]

    # The payout day is New York's: Friday 22:00 there is Saturday 03:00 UTC, still that Friday.
    api.clock.move_to(at(11, 7, 3))
    assert (await api.summary("cust-c"))["next_payout_date"] == "2026-11-06"
    assert (await api.summary("cash-s"))["next_payout_date"] == "2026-11-06"
    api.clock.move_to(at(11, 7, 12))  # Saturday in New York too
    assert (await api.summary("cust-c"))["next_payout_date"] == "2026-11-13"
    assert (await api.summary("cash-s"))["next_payout_date"] == "2026-11-07"
    api.clock.move_to(at(11, 6, 4, 30))  # Friday in UTC, Thursday 23:30 in New York
    assert (await api.summary("cash-s"))["next_payout_date"] == "2026-11-05"
    empty = await api.summary("cash-s")
    assert (empty["codes"][0]["code"], empty["referrals_by_status"], empty["paid_to_date_cents"]) == (s, {}, 0)


# ---------------------------------------------------------------- tokens and unknown ids


async def test_each_route_takes_only_its_own_token_and_unknown_ids_are_404(api):
    await api.register("emp-e", "employee", name="Eve")
    admin_routes = [
        ("POST", "/api/admin/referrers", {"referrer_id": "x-1", "kind": "employee"}),
        ("PATCH", "/api/admin/referrers/emp-e", {"same_day": True}),
        ("POST", "/api/admin/referrers/emp-e/codes", {}),
        ("POST", "/api/admin/referral-codes/ANY-2345/deactivate", None),
        ("GET", "/api/admin/referrals", None),
        ("GET", "/api/admin/referrals?format=csv", None),
        ("POST", "/api/admin/referrals/1/approve", {"admin": "a"}),
        ("POST", "/api/admin/referrals/1/reject", {"admin": "a", "reason": "r"}),
        ("GET", "/api/admin/payouts", None),
        ("POST", "/api/admin/payouts/1/reference", {"external_reference": "r"}),
    ]
    for method, path, body in admin_routes:
        for headers in (FRONT, {}, {"Authorization": "Bearer " + "x" * 40}):
            response = await api.http.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert response.headers["www-authenticate"] == "Bearer"
    for headers in (ADMIN, {}):
        assert (await api.http.get("/api/referrers/emp-e/summary", headers=headers)).status_code == 401
    assert (await api.http.get("/api/referrers/emp-e/summary", headers=FRONT)).status_code == 200
    # Nothing was changed by the refused requests.
    assert (await api.referrals())["total"] == 0
    assert len((await api.summary("emp-e"))["codes"]) == 1

    assert (await api.http.get("/api/referrers/nobody/summary", headers=FRONT)).status_code == 404
    for method, path, body in (
        ("PATCH", "/api/admin/referrers/nobody", {"same_day": True}),
        ("POST", "/api/admin/referrers/nobody/codes", {}),
        ("POST", "/api/admin/referral-codes/NOPE-2345/activate", None),
        ("POST", "/api/admin/referrals/424242/approve", {"admin": "a"}),
        ("POST", "/api/admin/referrals/424242/reject", {"admin": "a", "reason": "r"}),
        ("POST", "/api/admin/payouts/424242/reference", {"external_reference": "r"}),
    ):
        response = await api.http.request(method, path, json=body, headers=ADMIN)
        assert response.status_code == 404, (method, path, response.text)


# ---------------------------------------------------------------- events out of order


async def test_a_payment_applied_before_the_sign_up_that_referred_the_customer_still_qualifies_the_referral(api):
    """The sign-up (10:00) and the first payment (10:05) reach the workers in the other order,
    as happens when the sign-up is retried or another worker thread takes the payment first."""
    code = await api.register("partner-o", "partner", name="Ora")
    await api.pay("late-signup", at(10, 1, 10, 5))
    await api.sign_up("late-signup", at(10, 1, 10), code)
    referral = await api.referral_of("late-signup")
    assert referral["status"] != "rejected", referral  # the payment came after the referral: it counts
    assert (referral["status"], referral["reward_cents"], referral["qualifying_payment_id"]) == (
        "pending",
        5000,
        "pay-late-signup",
    ), (
        "the customer paid after being referred, but the payment was applied first: the referral stays awaiting_payment until some later payment"
    )


async def test_a_first_payment_dated_before_the_referral_but_applied_after_it_does_not_qualify_it(api):
    """The referral code was entered at 12:00; the customer's first payment, at 11:00, reaches
    the workers only afterwards. They had paid before being referred: rejected, never rewarded."""
    code = await api.register("partner-o", "partner", name="Ora")
    await api.sign_up("early-payer", at(10, 1, 10))
    await api.apply(
        ReferralSubmitted(
            event_id="submit-early", occurred_at=at(10, 1, 12), referral_code=code, referred_customer_id="early-payer"
        )
    )
    assert (await api.referral_of("early-payer"))["status"] == "awaiting_payment"
    await api.pay("early-payer", at(10, 1, 11))
    referral = await api.referral_of("early-payer")
    assert (referral["status"], referral["reason"]) == (
        "rejected",
        "the customer had already paid before being referred",
    ), referral
