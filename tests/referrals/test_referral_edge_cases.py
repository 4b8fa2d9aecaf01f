"""Referral edge cases against the real PostgreSQL: payout keys, rules judged again at
qualification, concurrent sign-ups, free payments, same-day payees, refunds, gateway errors, codes.

Events go through `handlers.apply_event` with the service's referral rules, payouts through
`service_layer.payouts`; the admin routes are served by the in-process app (httpx over ASGI).
Helpers come from tests/support/referrals.py. The story is dated October 2026: Fridays are Oct 9,
16, 23; New York is on EDT (UTC-4), so 14:00 UTC is 10:00 there, the same date.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from api.app import create_app
from infra.clock import FixedClock
from infra.db.referrals import payout_key
from infra.db.tables import (
    payout_items,
    referral_clawbacks,
    referral_codes,
    referral_history,
)
from infra.db.tables import payouts as payouts_table
from infra.db.tables import referrals as referrals_table
from infra.payouts import ManualGateway
from infra.settings import load_settings
from messages import ReferralSubmitted, parse_event
from service_layer import payouts
from service_layer import referrals as referral_cases
from service_layer.payouts import PayoutOrder, PayoutRun, Sent
from tests.support.referrals import (
    ADMIN,
    ADMIN_TOKEN,
    FRIDAY,
    FRONT_TOKEN,
    GATEWAYS,
    WEEK,
    Api,
    StubConnect,
    at,
    pay,
    referred_and_paid,
)

BIG = "99999999999999999999"  # more than a BIGINT holds


# ---------------------------------------------------------------- fixtures and helpers


@asynccontextmanager
async def serving(db, pg_url: str, velocity_limit: int):
    settings = load_settings(
        database_url=pg_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token=FRONT_TOKEN,
        referral_velocity_limit=velocity_limit,
        event_max_age_days=36500,
    )
    clock = FixedClock(at(10, 1, 12))
    app = create_app(settings, clock=clock, db=db)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http:
        yield Api(http, clock, settings, db)


@pytest.fixture
async def api(db, pg_url):
    """Velocity limit 10: no test here trips it by accident."""
    async with serving(db, pg_url, 10) as served:
        yield served


@pytest.fixture
async def strict_api(db, pg_url):
    """Velocity limit 2: the third referral of a referrer within 24 h is suspicious."""
    async with serving(db, pg_url, 2) as served:
        yield served


async def referral_row(db, customer_id: str):
    """The customer's attributed referral (else their latest submission)."""
    async with db.connect() as connection:
        rows = list(
            await connection.execute(
                select(referrals_table)
                .where(referrals_table.c.referred_customer_id == customer_id)
                .order_by(referrals_table.c.id)
            )
        )
    assert rows, f"no referral of {customer_id}"
    return next((r for r in rows if r.attributed), rows[-1])


async def history_of(db, referral_id: int) -> list[tuple[str, str | None]]:
    async with db.connect() as connection:
        rows = await connection.execute(
            select(referral_history)
            .where(referral_history.c.referral_id == referral_id)
            .order_by(referral_history.c.id)
        )
        return [(r.status, r.reason) for r in rows]


async def payout_rows(db, payee_id: str | None = None) -> list:
    query = select(payouts_table).order_by(payouts_table.c.id)
    if payee_id is not None:
        query = query.where(payouts_table.c.payee_id == payee_id)
    async with db.connect() as connection:
        return list(await connection.execute(query))


async def items_of(db, payout_id: int) -> list:
    async with db.connect() as connection:
        return list(
            await connection.execute(
                select(payout_items).where(payout_items.c.payout_id == payout_id).order_by(payout_items.c.id)
            )
        )


async def clawback_rows(db) -> list:
    async with db.connect() as connection:
        return list(await connection.execute(select(referral_clawbacks).order_by(referral_clawbacks.c.id)))


async def run_payouts(api: Api, now: datetime, connect=None) -> PayoutRun:
    gateways = {"manual": ManualGateway(), "stripe_connect": connect or StubConnect()}
    return await payouts.pay_referrals(api.new_uow, gateways, GATEWAYS, now, api.settings.referrals)


async def partner(api: Api, referrer_id: str, **body) -> str:
    return await api.register(
        referrer_id,
        "partner",
        name=body.pop("name", "P"),
        payout_method="stripe_connect",
        stripe_account_id="acct_" + referrer_id.replace("-", "")[:24],
        **body,
    )


# ---------------------------------------------------------------- 1. payout keys and one payee's trouble


async def test_a_payee_with_a_250_character_id_is_paid_under_a_short_key_and_the_other_payee_too(api):
    long_id = "partner-" + "x" * 242
    assert len(long_id) == 250
    long_code = await partner(api, long_id, name="Longname")
    short_code = await partner(api, "partner-short")
    await referred_and_paid(api, long_code, ["l-1"], at(10, 1, 13))
    await referred_and_paid(api, short_code, ["s-1"], at(10, 1, 13))

    connect = StubConnect()
    run = await run_payouts(api, FRIDAY, connect)
    assert (run.released, len(run.created), run.sent, run.failed) == (2, 2, {"paid": 2}, [])

    [long_payout] = await payout_rows(api.db, long_id)
    [short_payout] = await payout_rows(api.db, "partner-short")
    assert (long_payout.status, long_payout.amount_cents, long_payout.period) == ("paid", 5000, WEEK)
    assert (short_payout.status, short_payout.amount_cents) == ("paid", 5000)
    assert long_payout.idempotency_key == payout_key(long_id, WEEK)
    assert len(long_payout.idempotency_key) <= 255 and long_id not in long_payout.idempotency_key
    assert long_payout.idempotency_key != short_payout.idempotency_key
    assert sorted(len(o.idempotency_key) for o in connect.orders) == [len(payout_key("p", WEEK))] * 2
    assert {o.payee_id for o in connect.orders} == {long_id, "partner-short"}
    assert ((await referral_row(api.db, "l-1")).status, (await referral_row(api.db, "s-1")).status) == ("paid", "paid")


async def test_one_payee_whose_payout_cannot_be_made_does_not_hold_up_the_others(api, monkeypatch):
    bad_code = await partner(api, "partner-a-bad")  # first in the batch (payees are taken in id order)
    good_code = await partner(api, "partner-b-good")
    await referred_and_paid(api, bad_code, ["bad-1"], at(10, 1, 13))
    await referred_and_paid(api, good_code, ["good-1"], at(10, 1, 13))

    real = payouts._make_payouts
    tried: list[list[str]] = []

    async def failing_for_one(new_uow, method_gateways, now, rules, payee_ids, friday, run):
        tried.append(list(payee_ids))
        if "partner-a-bad" in payee_ids:
            raise RuntimeError("snapshot failed")
        await real(new_uow, method_gateways, now, rules, payee_ids, friday, run)

    monkeypatch.setattr(payouts, "_make_payouts", failing_for_one)
    connect = StubConnect()
    run = await run_payouts(api, FRIDAY, connect)
    # The chunk fails as a whole (nothing of it written), then each payee is made alone.
    assert tried == [["partner-a-bad", "partner-b-good"], ["partner-a-bad"], ["partner-b-good"]]
    assert (run.released, len(run.created), run.sent) == (2, 1, {"paid": 1})
    assert await payout_rows(api.db, "partner-a-bad") == []
    [good] = await payout_rows(api.db, "partner-b-good")
    assert (good.status, good.amount_cents) == ("paid", 5000)
    assert (await referral_row(api.db, "good-1")).status == "paid"
    bad = await referral_row(api.db, "bad-1")
    assert (bad.status, bad.payout_id) == ("approved", None)  # left for the next run

    # The trouble over, the next run pays the rest of the batch, and nobody twice.
    monkeypatch.setattr(payouts, "_make_payouts", real)
    run = await run_payouts(api, at(10, 16, 15), connect)
    assert (len(run.created), run.sent) == (1, {"paid": 1})
    [bad_payout] = await payout_rows(api.db, "partner-a-bad")
    assert (bad_payout.status, bad_payout.period) == ("paid", WEEK)
    assert [o.payee_id for o in connect.orders] == ["partner-b-good", "partner-a-bad"]


# ---------------------------------------------------------------- 2. rules judged again at qualification


async def test_a_referral_applied_before_the_referred_customers_sign_up_is_rejected_as_a_self_referral_at_qualification(
    api,
):
    await api.sign_up("alice", at(10, 1, 9), email="jane.doe@gmail.com", phone="555-123-4567")
    [alice_code] = [c["code"] for c in (await api.summary("alice"))["codes"]]

    # X entered alice's code at 10:00; that event is applied before X's sign-up (09:55) is.
    await api.apply(
        ReferralSubmitted(
            event_id="submit-x", occurred_at=at(10, 1, 10), referral_code=alice_code, referred_customer_id="cust-x"
        )
    )
    assert (await referral_row(api.db, "cust-x")).status == "awaiting_payment"  # nothing known of X yet
    await api.sign_up("cust-x", at(10, 1, 9, 55), email="JaneDoe+2@googlemail.com", phone="555-123-4567")
    await pay(api, "cust-x", at(10, 1, 11))

    referral = await referral_row(api.db, "cust-x")
    assert (referral.status, referral.referrer_id, referral.reward_cents) == ("rejected", "alice", None), referral
    assert referral.reason == "self-referral: same email address"
    assert (await history_of(api.db, referral.id))[-1] == (
        "rejected",
        "rejected by system: self-referral: same email address",
    )
    run = await run_payouts(api, at(10, 23, 14))
    assert (run.released, run.created) == (0, [])


async def test_a_card_fingerprint_seen_after_attribution_flags_the_referral_when_it_qualifies(api):
    p_code = await partner(api, "partner-p")
    q_code = await partner(api, "partner-q")
    await api.sign_up("y-early", at(10, 1, 10), p_code, fingerprint="fp_card_1")
    assert ((await referral_row(api.db, "y-early")).status, (await referral_row(api.db, "y-early")).flags) == (
        "awaiting_payment",
        [],
    )

    # Later, another referred customer (of another referrer) signs up with the same card.
    await api.sign_up("y-later", at(10, 1, 11), q_code, fingerprint="fp_card_1")
    assert (await referral_row(api.db, "y-later")).flags == ["payment card shared with another customer"]

    await pay(api, "y-early", at(10, 1, 12))
    referral = await referral_row(api.db, "y-early")
    assert (referral.status, referral.flags, referral.qualifying_payment_id) == (
        "flagged",
        ["payment card shared with another customer"],
        "pay-y-early",
    )
    assert (await history_of(api.db, referral.id))[-1] == ("flagged", "payment card shared with another customer")
    # Flagged: the hold ending does not make it payable.
    run = await run_payouts(api, at(10, 16, 14))
    assert (run.released, run.created) == (0, [])


# ---------------------------------------------------------------- 3. referrals of one referrer, concurrently


async def test_concurrent_sign_ups_with_one_code_are_judged_for_velocity_by_submission_time(strict_api):
    api = strict_api
    code = await partner(api, "partner-v")
    customers = [f"v-{n}" for n in range(1, 7)]
    submitted = {c: at(10, 1, 13, n) for n, c in enumerate(customers, start=1)}

    # All six at once, latest first: each its own unit of work (and database connection).
    await asyncio.gather(*(api.sign_up(c, submitted[c], code) for c in reversed(customers)))
    assert {c: (await referral_row(api.db, c)).status for c in customers} == dict.fromkeys(
        customers, "awaiting_payment"
    )
    await asyncio.gather(*(pay(api, c, submitted[c] + timedelta(hours=2)) for c in customers))

    rows = {c: await referral_row(api.db, c) for c in customers}
    assert {c: (r.status, r.flags) for c, r in rows.items()} == {
        "v-1": ("pending", []),
        "v-2": ("pending", []),
        **{f"v-{n}": ("flagged", [f"velocity: {n} referrals within 24 h"]) for n in range(3, 7)},
    }

    # None of the flagged ones is paid without an admin's review.
    run = await run_payouts(api, FRIDAY)
    assert (run.released, len(run.created), run.sent) == (2, 1, {"paid": 1})
    [payout] = await payout_rows(api.db, "partner-v")
    assert payout.amount_cents == 2 * 5000
    assert {i.referral_id for i in await items_of(api.db, payout.id)} == {rows["v-1"].id, rows["v-2"].id}
    assert {c: (await referral_row(api.db, c)).status for c in customers} == {
        "v-1": "paid",
        "v-2": "paid",
        **{f"v-{n}": "flagged" for n in range(3, 7)},
    }


# ---------------------------------------------------------------- 4. free payments


async def test_a_free_payment_does_not_qualify_a_referral_a_later_paid_one_does(api):
    code = await partner(api, "partner-f")
    await api.sign_up("free-1", at(10, 1, 10), code)
    await pay(api, "free-1", at(10, 1, 11), payment_id="pay-trial", amount_cents=0)
    referral = await referral_row(api.db, "free-1")
    assert (referral.status, referral.qualifying_payment_id, referral.reward_cents) == ("awaiting_payment", None, None)

    await pay(api, "free-1", at(10, 2, 11), payment_id="pay-first-invoice", amount_cents=4900)
    referral = await referral_row(api.db, "free-1")
    assert (referral.status, referral.qualifying_payment_id, referral.reward_cents, referral.approve_after) == (
        "pending",
        "pay-first-invoice",
        5000,
        at(10, 16, 11),
    )

    # A payment whose amount the producer does not state qualifies.
    await api.sign_up("free-2", at(10, 1, 10), code)
    await pay(api, "free-2", at(10, 1, 11), amount_cents=None)
    referral = await referral_row(api.db, "free-2")
    assert (referral.status, referral.qualifying_payment_id) == ("pending", "pay-free-2")


async def test_a_free_payment_applied_before_the_sign_up_does_not_qualify_the_referral(api):
    """BUG: the sign-up (10:00, with a code) is applied after the customer's free trial
    payment (10:05, amount 0). `submit_referral` looks up the first payment since the referral
    (`first_payment_since`) and qualifies with it, without its amount: the free payment earns
    the reward that a free payment applied in order would not."""
    code = await partner(api, "partner-f")
    await pay(api, "trial-first", at(10, 1, 10, 5), payment_id="pay-trial", amount_cents=0)
    await api.sign_up("trial-first", at(10, 1, 10), code)
    referral = await referral_row(api.db, "trial-first")
    assert (referral.status, referral.qualifying_payment_id) == ("awaiting_payment", None), (
        f"a free payment qualified the referral ({referral.status}, {referral.qualifying_payment_id}): "
        "service_layer/referrals.py submit_referral passes no amount for the payment found by first_payment_since"
    )
    await pay(api, "trial-first", at(10, 1, 11), payment_id="pay-first-invoice", amount_cents=4900)
    referral = await referral_row(api.db, "trial-first")
    assert (referral.status, referral.qualifying_payment_id) == ("pending", "pay-first-invoice")


# ---------------------------------------------------------------- 5. same-day payees


async def test_a_same_day_payee_is_paid_for_each_approval_of_the_day_and_never_twice(api):
    code = await api.register(
        "same-day-sam",
        "employee",
        name="Sam",
        payout_method="stripe_connect",
        stripe_account_id="acct_sam1",
        same_day=True,
    )
    await api.sign_up("morning", at(10, 1, 8), code)
    await pay(api, "morning", at(10, 1, 9))  # held until Oct 15, 09:00 UTC
    await api.sign_up("evening", at(10, 1, 16), code)
    await pay(api, "evening", at(10, 1, 17))  # held until Oct 15, 17:00 UTC

    connect = StubConnect()
    run = await run_payouts(api, at(10, 15, 10), connect)  # Thursday, 06:00 in New York
    assert (run.released, len(run.created), run.sent) == (1, 1, {"paid": 1})
    run = await run_payouts(api, at(10, 15, 18), connect)  # 14:00 in New York, the same day
    assert (run.released, len(run.created), run.sent) == (1, 1, {"paid": 1})
    for moment in (at(10, 15, 19), at(10, 15, 23), at(10, 16, 14)):  # reruns, then the Friday batch
        run = await run_payouts(api, moment, connect)
        assert (run.released, run.created, run.sent, run.failed) == (0, [], {}, [])
    await payouts.make_payouts(api.new_uow, GATEWAYS, at(10, 15, 20), api.settings.referrals, PayoutRun())

    morning, evening = await referral_row(api.db, "morning"), await referral_row(api.db, "evening")
    first, second = await payout_rows(api.db, "same-day-sam")
    assert [(p.period, p.status, p.amount_cents) for p in (first, second)] == [
        ("day-2026-10-15-1", "paid", 1000),
        ("day-2026-10-15-2", "paid", 1000),
    ]
    assert (morning.status, morning.payout_id, evening.status, evening.payout_id) == (
        "paid",
        first.id,
        "paid",
        second.id,
    )
    assert [[i.referral_id for i in await items_of(api.db, p.id)] for p in (first, second)] == [
        [morning.id],
        [evening.id],
    ]
    assert [(o.payout_id, o.period) for o in connect.orders] == [
        (first.id, "day-2026-10-15-1"),
        (second.id, "day-2026-10-15-2"),
    ]

    # One payout item per reward, ever: the database refuses a second.
    with pytest.raises(IntegrityError):
        async with api.db.begin() as connection:
            await connection.execute(
                insert(payout_items).values(payout_id=second.id, referral_id=morning.id, amount_cents=1000)
            )


async def test_a_same_day_approval_after_a_withdrawn_payout_is_still_paid_that_day(api):
    """BUG (minor): same-day periods are numbered by counting the day's payouts
    (`payouts_in_period(...) + 1`). A refund that takes the only reward out of an unsent
    payout deletes that payout, so the count drops and a later approval gets a period that
    still exists (`day-<date>-2`): `create_payout` finds it taken, `_make_payout` treats it as
    a rerun, and the approved reward is not paid that day (nor logged)."""
    code = await api.register(
        "same-day-sue",
        "employee",
        name="Sue",
        payout_method="stripe_connect",
        stripe_account_id="acct_sue1",
        same_day=True,
    )
    for customer, paid_at in (("sd-a", at(10, 1, 9)), ("sd-b", at(10, 1, 11)), ("sd-c", at(10, 1, 17))):
        await api.sign_up(customer, paid_at - timedelta(hours=1), code)
        await pay(api, customer, paid_at)
    rules = api.settings.referrals
    # Two runs that stopped between making and sending (a crash, a deploy): a's and b's payouts are unsent.
    for moment in (at(10, 15, 10), at(10, 15, 12)):
        await payouts.release_rewards(api.new_uow, moment)
        await payouts.make_payouts(api.new_uow, GATEWAYS, moment, rules, PayoutRun())
    assert [p.period for p in await payout_rows(api.db, "same-day-sue")] == ["day-2026-10-15-1", "day-2026-10-15-2"]
    await api.refund("sd-a", at(10, 15, 13))  # a's payout is withdrawn: day-…-1 goes
    assert [p.period for p in await payout_rows(api.db, "same-day-sue")] == ["day-2026-10-15-2"]

    connect = StubConnect()
    run = await run_payouts(api, at(10, 15, 18), connect)  # c was approved at 17:00
    c = await referral_row(api.db, "sd-c")
    assert (c.status, run.released) == ("paid", 1), (
        f"c's reward is {c.status}: its period was numbered day-2026-10-15-{1 + 1} (a count of the day's payouts), which is b's; "
        f"payouts now {[(p.period, p.status) for p in await payout_rows(api.db, 'same-day-sue')]}"
    )


# ---------------------------------------------------------------- 6. a refund of a reward in an unsent payout


async def test_a_refunded_reward_leaves_its_unsent_payout_but_is_clawed_back_once_the_payout_was_tried(api):
    p_code, q_code, r_code, t_code = [await partner(api, f"partner-{x}") for x in "pqrt"]
    await referred_and_paid(api, p_code, ["p-1", "p-2"], at(10, 1, 13))
    await referred_and_paid(api, q_code, ["q-1"], at(10, 1, 13))
    await referred_and_paid(api, r_code, ["r-1"], at(10, 1, 13))
    await referred_and_paid(api, t_code, ["t-1"], at(10, 1, 13))
    # The Friday run made the payouts and stopped before sending them.
    assert await payouts.release_rewards(api.new_uow, FRIDAY) == 5
    made = PayoutRun()
    await payouts.make_payouts(api.new_uow, GATEWAYS, FRIDAY, api.settings.referrals, made)
    assert len(made.created) == 4
    [p_payout] = await payout_rows(api.db, "partner-p")
    [q_payout] = await payout_rows(api.db, "partner-q")
    assert (p_payout.amount_cents, p_payout.status, p_payout.attempts, len(await items_of(api.db, p_payout.id))) == (
        10000,
        "pending",
        0,
        2,
    )

    # Refunds before anything was sent: the rewards come out of their payouts.
    await api.refund("p-1", at(10, 16, 15))
    await api.refund("q-1", at(10, 16, 15))
    p1, p2, q1 = [await referral_row(api.db, c) for c in ("p-1", "p-2", "q-1")]
    assert [(r.status, r.payout_id) for r in (p1, p2, q1)] == [
        ("voided", None),
        ("in_payout", p_payout.id),
        ("voided", None),
    ]
    assert (await history_of(api.db, p1.id))[-1] == (
        "voided",
        "qualifying payment pay-p-1 refunded: taken out of its unsent payout",
    )
    [p_payout] = await payout_rows(api.db, "partner-p")
    assert (p_payout.amount_cents, p_payout.status) == (5000, "pending")
    assert [(i.referral_id, i.amount_cents) for i in await items_of(api.db, p_payout.id)] == [(p2.id, 5000)]
    assert await payout_rows(api.db, "partner-q") == [] and await items_of(api.db, q_payout.id) == []
    assert await clawback_rows(api.db) == []

    # Sent: P's (reduced) and R's are paid, T's fails (tried).
    connect = StubConnect(failing={"partner-t"})
    run = PayoutRun()
    await payouts.send_payouts(
        api.new_uow, {"stripe_connect": connect, "manual": ManualGateway()}, lambda: datetime.now(FRIDAY.tzinfo), run
    )
    assert (run.sent, len(run.failed)) == ({"paid": 2}, 1)
    assert {o.payee_id: o.amount_cents for o in connect.orders} == {
        "partner-p": 5000,
        "partner-r": 5000,
        "partner-t": 5000,
    }

    # Refunds once the payout was sent, or tried: clawbacks, the payouts untouched.
    await api.refund("r-1", at(10, 16, 16))
    await api.refund("t-1", at(10, 16, 16))
    r1, t1 = await referral_row(api.db, "r-1"), await referral_row(api.db, "t-1")
    [r_payout] = await payout_rows(api.db, "partner-r")
    [t_payout] = await payout_rows(api.db, "partner-t")
    assert [(r.status, r.payout_id) for r in (r1, t1)] == [("paid", r_payout.id), ("in_payout", t_payout.id)]
    assert [(p.status, p.amount_cents, p.attempts) for p in (r_payout, t_payout)] == [
        ("paid", 5000, 1),
        ("failed", 5000, 1),
    ]
    assert (await history_of(api.db, r1.id))[-1] == (
        "paid",
        "qualifying payment pay-r-1 refunded: 5000 clawed back from the next payout",
    )
    assert [(c.referral_id, c.payee_id, c.amount_cents, c.payout_id) for c in await clawback_rows(api.db)] == [
        (r1.id, "partner-r", 5000, None),
        (t1.id, "partner-t", 5000, None),
    ]


# ---------------------------------------------------------------- 7. an unexpected gateway error


class ExplodingConnect:
    """A gateway with a bug: an unexpected exception (not PayoutFailed) for one payee."""

    name = "stripe_connect"

    def __init__(self) -> None:
        self.orders: list[PayoutOrder] = []

    async def send(self, order: PayoutOrder) -> Sent:
        self.orders.append(order)
        if order.payee_id == "partner-a-boom":
            raise RuntimeError("connection pool exploded")
        return Sent("paid", f"tr_ok_{order.payout_id}")


async def test_an_unexpected_gateway_error_fails_that_payout_visibly_and_the_others_are_still_sent(api):
    boom = await partner(api, "partner-a-boom")  # its payout is sent first
    ok = await partner(api, "partner-b-ok")
    manual = await api.register(
        "partner-c-manual", "partner", name="C", payout_method="manual", payout_address="c@bank.example"
    )
    for code, customer in ((boom, "boom-1"), (ok, "ok-1"), (manual, "manual-1")):
        await referred_and_paid(api, code, [customer], at(10, 1, 13))

    exploding = ExplodingConnect()
    run = await payouts.pay_referrals(
        api.new_uow, {"stripe_connect": exploding, "manual": ManualGateway()}, GATEWAYS, FRIDAY, api.settings.referrals
    )
    [boom_payout] = await payout_rows(api.db, "partner-a-boom")
    [ok_payout] = await payout_rows(api.db, "partner-b-ok")
    [manual_payout] = await payout_rows(api.db, "partner-c-manual")
    assert [o.payee_id for o in exploding.orders] == ["partner-a-boom", "partner-b-ok"]
    assert (run.failed, run.sent) == ([boom_payout.id], {"paid": 1, "exported": 1})
    assert (
        boom_payout.status,
        boom_payout.last_error,
        boom_payout.attempts,
        boom_payout.failures,
        boom_payout.leased_until,
        boom_payout.paid_at,
    ) == ("failed", "connection pool exploded", 1, 1, None, None)
    assert (ok_payout.status, ok_payout.external_reference) == ("paid", f"tr_ok_{ok_payout.id}")
    assert manual_payout.status == "exported"
    assert [(await referral_row(api.db, c)).status for c in ("boom-1", "ok-1", "manual-1")] == [
        "in_payout",
        "paid",
        "in_payout",
    ]
    listed = await api.payouts(status="failed")
    assert [(p["id"], p["last_error"]) for p in listed["payouts"]] == [(boom_payout.id, "connection pool exploded")]

    # The next run tries it again, under a fresh key.
    connect = StubConnect()
    run = await run_payouts(api, at(10, 16, 15), connect)
    [boom_payout] = await payout_rows(api.db, "partner-a-boom")
    assert (run.sent, boom_payout.status, boom_payout.attempts) == ({"paid": 1}, "paid", 2)
    assert [o.idempotency_key for o in connect.orders] == [f"{payout_key('partner-a-boom', WEEK)}:retry-1"]


# ---------------------------------------------------------------- 8. ids larger than a BIGINT


async def test_ids_and_offsets_larger_than_a_bigint_are_422_not_500(api):
    largest = str(2**63 - 1)
    requests = [
        ("POST", f"/api/admin/referrals/{BIG}/approve", {"admin": "alice"}),
        ("POST", f"/api/admin/referrals/{BIG}/reject", {"admin": "alice", "reason": "r"}),
        ("POST", f"/api/admin/payouts/{BIG}/reference", {"external_reference": "r-1"}),
        ("GET", f"/api/admin/referrals?offset={BIG}", None),
        ("GET", f"/api/admin/payouts?offset={BIG}", None),
        ("GET", f"/api/admin/referrals?offset={BIG}&format=csv", None),
    ]
    for method, path, body in requests:
        response = await api.http.request(method, path, json=body, headers=ADMIN)
        assert response.status_code == 422, (method, path, response.status_code, response.text)
    # The largest BIGINT is a well-formed id (no such row) and offset.
    assert (
        await api.http.post(f"/api/admin/referrals/{largest}/approve", json={"admin": "alice"}, headers=ADMIN)
    ).status_code == 404
    assert (
        await api.http.post(
            f"/api/admin/payouts/{largest}/reference", json={"external_reference": "r-1"}, headers=ADMIN
        )
    ).status_code == 404
    assert (await api.referrals(offset=largest))["referrals"] == []
    assert (await api.payouts(offset=largest))["payouts"] == []


# ---------------------------------------------------------------- 9. codes as typed


async def test_codes_are_matched_whatever_their_case_hyphens_and_spaces(api):
    await api.register("emp-jane", "employee", name="Jane")
    added = await api.http.post("/api/admin/referrers/emp-jane/codes", json={"code": "JANE-7K3PQ"}, headers=ADMIN)
    assert added.status_code == 201, added.text
    # Another code that reads the same is taken.
    other = await api.register("emp-jo", "employee", name="Jo")
    assert (
        await api.http.post("/api/admin/referrers/emp-jo/codes", json={"code": "JANE7K3PQ"}, headers=ADMIN)
    ).status_code == 409

    await api.sign_up("typed-1", at(10, 1, 10), "jane7k3pq")
    first = await referral_row(api.db, "typed-1")
    assert (first.status, first.referrer_id, first.code) == ("awaiting_payment", "emp-jane", "JANE-7K3PQ")
    async with api.new_uow() as uow:  # a code typed with spaces (the service layer takes it as typed)
        await referral_cases.submit_referral(uow, "typed-2", " jane 7k3 pq ", at(10, 1, 11), api.settings.referrals)
        await uow.commit()
    second = await referral_row(api.db, "typed-2")
    assert (second.status, second.referrer_id, second.code) == ("awaiting_payment", "emp-jane", "JANE-7K3PQ")
    await api.sign_up("typed-jo", at(10, 1, 11), other.lower().replace("-", ""))
    assert (await referral_row(api.db, "typed-jo")).referrer_id == "emp-jo"

    # Deactivated by its typed form: a referral with it is refused; activated again (with a space), it works.
    api.clock.move_to(at(10, 2, 9))
    assert (await api.http.post("/api/admin/referral-codes/jane7k3pq/deactivate", headers=ADMIN)).status_code == 204
    async with api.db.connect() as connection:
        row = (await connection.execute(select(referral_codes).where(referral_codes.c.code == "JANE-7K3PQ"))).one()
    assert (row.active, row.deactivated_at) == (False, at(10, 2, 9))
    await api.sign_up("typed-3", at(10, 2, 10), "Jane-7k3pq")
    third = await referral_row(api.db, "typed-3")
    assert (third.status, third.reason, third.code) == (
        "rejected",
        "the referral code is no longer active",
        "JANE-7K3PQ",
    )
    assert (await api.http.post("/api/admin/referral-codes/jane 7K3PQ/activate", headers=ADMIN)).status_code == 204
    await api.sign_up("typed-4", at(10, 2, 11), "JANE7K3PQ")
    assert (await referral_row(api.db, "typed-4")).status == "awaiting_payment"
    codes = {c["code"]: c["active"] for c in (await api.summary("emp-jane"))["codes"]}
    assert codes["JANE-7K3PQ"] is True


async def test_a_sign_up_whose_code_was_typed_with_a_space_is_not_refused(api):
    """BUG: the lookup ignores spaces, but CustomerSignedUp (and ReferralSubmitted) allow only
    `[A-Za-z0-9-]` in `referral_code` (messages/events.py). A sign-up with `JANE 7K3PQ` is an
    invalid event: the worker rejects it, and the customer's whole sign-up (profile, referrer
    row, own code) is lost along with the referral."""
    await api.register("emp-jane", "employee", name="Jane")
    assert (
        await api.http.post("/api/admin/referrers/emp-jane/codes", json={"code": "JANE-7K3PQ"}, headers=ADMIN)
    ).status_code == 201
    raw = json.dumps(
        {
            "type": "customer.signed_up",
            "event_id": "signup-spaced",
            "occurred_at": at(10, 1, 10).isoformat(),
            "customer_id": "spaced",
            "email": "spaced@spaced.example.com",
            "referral_code": "JANE 7K3PQ",
        }
    )
    try:
        event = parse_event(raw)
    except ValidationError as error:
        pytest.fail(f"the sign-up is refused for a space in its referral code: {error}")
    await api.apply(event)
    referral = await referral_row(api.db, "spaced")
    assert (referral.status, referral.referrer_id) == ("awaiting_payment", "emp-jane")
