"""Membership tools against real PostgreSQL (and, for gifts end to end, real worker processes on Redis).

Freezing is stored and pauses the expiry sweep; a frozen customer cannot book over HTTP; gifts
cross between customers atomically and never deadlock; admins adjust credits with a reason; the
credits analytics add up per month and read the kind/time index.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from sqlalchemy import event, func, select, text

from api.app import create_app
from domain import CreditPolicy, InsufficientCredits
from domain import errors as domain_errors
from infra.clock import Clock, FixedClock
from infra.db import Database
from infra.db.tables import (
    credit_lots,
    customers,
    dead_letters,
    holds,
    ledger_entries,
    lot_movements,
    processed_events,
)
from infra.db.tables import notifications as notifications_table
from infra.settings import load_settings
from messages import (
    CreditsAdjusted,
    CreditsGifted,
    JobCompleted,
    MembershipFrozen,
    MembershipUnfrozen,
    PaymentReversed,
    PaymentSucceeded,
    Publisher,
)
from service_layer import analytics, handlers, notifications
from service_layer.handlers import Outcome
from service_layer.unit_of_work import SqlUnitOfWork
from tests.integration.test_delivery import (
    dead_lettered,
    ledger_snapshot,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)
from tests.support import reconciliation

UTC = timezone.utc
POLICY = CreditPolicy()
TWO_MONTHS = CreditPolicy(credit_expiration_months=2)
ADMIN_TOKEN = "admin-token-membership-0123456789"
FRONTEND_TOKEN = "frontend-token-membership-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FRONT = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}


def t(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


async def apply(db: Database, event_, policy: CreditPolicy = POLICY) -> Outcome:
    return await handlers.apply_event(event_, SqlUnitOfWork(db), policy)


def paid(event_id: str, customer: str, credits: int, at: datetime) -> PaymentSucceeded:
    return PaymentSucceeded(event_id=event_id, customer_id=customer, occurred_at=at, payment_id=f"in_{event_id}", credits=credits)


async def rows(db: Database, query) -> list[dict]:
    async with db.connect() as connection:
        return [dict(r) for r in (await connection.execute(query)).mappings().all()]


async def count(db: Database, table) -> int:
    async with db.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar_one()


async def lots_of(db: Database, customer: str) -> list[dict]:
    return await rows(db, select(credit_lots).where(credit_lots.c.customer_id == customer).order_by(credit_lots.c.id))


async def entries_of(db: Database, customer: str) -> list[dict]:
    return await rows(db, select(ledger_entries).where(ledger_entries.c.customer_id == customer).order_by(ledger_entries.c.id))


async def customer(db: Database, customer_id: str) -> dict | None:
    found = await rows(db, select(customers).where(customers.c.customer_id == customer_id))
    return found[0] if found else None


@asynccontextmanager
async def serving(db: Database, pg_url: str, clock: Clock | None = None):
    """The app in-process (lifespan run), over httpx's ASGI transport."""
    settings = load_settings(database_url=pg_url, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None)
    app = create_app(settings, db=db, clock=clock)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http:
        yield http


# --------------------------------------------------------------------------- freeze


async def test_freezing_is_stored_and_the_sweep_passes_over_a_frozen_customer_until_unfrozen(db):
    await apply(db, paid("pay-f1", "cust-frozen", 10, t(2025, 1, 10)))  # expires 2026-01-10
    await apply(db, paid("pay-f2", "cust-frozen", 4, t(2025, 6, 1)))  # expires 2026-06-01
    await apply(db, paid("pay-o1", "cust-other", 3, t(2025, 1, 10)))  # expires 2026-01-10 too
    frozen_at, unfrozen_at = t(2025, 12, 1, 8), t(2026, 4, 1, 20)
    pause = unfrozen_at - frozen_at

    assert await apply(db, MembershipFrozen(event_id="freeze-1", customer_id="cust-frozen", occurred_at=frozen_at)) is Outcome.APPLIED
    assert (await customer(db, "cust-frozen"))["frozen_since"] == frozen_at
    # A second freeze is recorded but changes nothing.
    assert await apply(db, MembershipFrozen(event_id="freeze-2", customer_id="cust-frozen", occurred_at=frozen_at + timedelta(days=3))) is Outcome.IGNORED
    assert (await customer(db, "cust-frozen"))["frozen_since"] == frozen_at

    # The sweep, long after the first lot's original expiry: the other customer's lot expires,
    # the frozen customer's due lot is passed over, and the sweep ends (no endless re-selection).
    sweep_at = t(2026, 3, 1)
    result = await asyncio.wait_for(handlers.expire_due_credits(lambda: SqlUnitOfWork(db), sweep_at, 500), timeout=20)
    assert (result.customers, result.entries, result.more) == (1, 1, False)
    assert [(lot["remaining"], lot["expired"]) for lot in await lots_of(db, "cust-other")] == [(0, 3)]
    assert [(lot["remaining"], lot["expires_at"]) for lot in await lots_of(db, "cust-frozen")] == [(10, t(2026, 1, 10)), (4, t(2026, 6, 1))]
    assert "expired" not in {e["kind"] for e in await entries_of(db, "cust-frozen")}
    # Small batches too: the frozen customer never fills a batch and stalls the rest.
    result = await asyncio.wait_for(handlers.expire_due_credits(lambda: SqlUnitOfWork(db), sweep_at, 1), timeout=20)
    assert (result.customers, result.entries) == (0, 0)

    # While frozen its credits stay spendable however late they are read.
    view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), "cust-frozen", sweep_at)
    assert (view.balance, view.available, view.frozen_since, view.can_schedule) == (14, 14, frozen_at, False)

    assert await apply(db, MembershipUnfrozen(event_id="unfreeze-1", customer_id="cust-frozen", occurred_at=unfrozen_at)) is Outcome.APPLIED
    assert (await customer(db, "cust-frozen"))["frozen_since"] is None
    moved = await lots_of(db, "cust-frozen")
    assert [(lot["remaining"], lot["expires_at"]) for lot in moved] == [(10, t(2026, 1, 10) + pause), (4, t(2026, 6, 1) + pause)]
    # An unfreeze when not frozen is recorded, changes nothing.
    assert await apply(db, MembershipUnfrozen(event_id="unfreeze-2", customer_id="cust-frozen", occurred_at=unfrozen_at + timedelta(days=1))) is Outcome.IGNORED
    assert [lot["expires_at"] for lot in await lots_of(db, "cust-frozen")] == [lot["expires_at"] for lot in moved]

    # Not due yet at the old date: nothing to sweep.
    result = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), unfrozen_at + timedelta(days=1), 500)
    assert result.entries == 0
    # At the moved date it expires, with an entry at that very moment.
    first_due = t(2026, 1, 10) + pause
    result = await asyncio.wait_for(handlers.expire_due_credits(lambda: SqlUnitOfWork(db), first_due, 500), timeout=20)
    assert (result.customers, result.entries) == (1, 1)
    assert [(lot["remaining"], lot["expired"]) for lot in await lots_of(db, "cust-frozen")] == [(0, 10), (4, 0)]
    [expired] = [e for e in await entries_of(db, "cust-frozen") if e["kind"] == "expired"]
    assert (expired["credits"], expired["occurred_at"]) == (-10, first_due)
    assert (await customer(db, "cust-frozen"))["balance"] == 4
    assert await reconciliation(db) == []


async def test_an_unfreeze_delivered_before_its_freeze_does_not_leave_the_membership_frozen(db):
    """Events may arrive out of order (docs/WIRE_CONTRACT.md "Order"): a customer who froze on
    March 1 and unfroze on April 1 must not end up frozen because the freeze came second."""
    await apply(db, paid("pay-ooo", "cust-ooo", 10, t(2025, 1, 10)))
    # The unfreeze of April 1 is delivered first (a retry, another worker, another queue)...
    await apply(db, MembershipUnfrozen(event_id="unfreeze-ooo", customer_id="cust-ooo", occurred_at=t(2025, 4, 1)))
    # ...then the freeze of March 1 it ends.
    await apply(db, MembershipFrozen(event_id="freeze-ooo", customer_id="cust-ooo", occurred_at=t(2025, 3, 1)))

    view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), "cust-ooo", t(2025, 5, 1))
    assert view.frozen_since is None, "the membership stays frozen for good: its unfreeze was dropped as a no-op"
    assert view.can_schedule is True


async def test_an_expiry_warning_is_given_again_for_the_date_a_lot_moved_to(db):
    """A lot warned about before a freeze expires later after the unfreeze; the customer must be
    warned about the new date too (the first warning named a date that no longer holds)."""
    async with db.begin() as connection:
        await connection.execute(text("TRUNCATE notifications RESTART IDENTITY"))
    await apply(db, paid("pay-warn", "cust-warn", 10, t(2025, 1, 10)))  # expires 2026-01-10
    assert await notifications.warn_expiring_credits(lambda: SqlUnitOfWork(db), t(2026, 1, 5), 7) == 1
    await apply(db, MembershipFrozen(event_id="freeze-warn", customer_id="cust-warn", occurred_at=t(2026, 1, 6)))
    await apply(db, MembershipUnfrozen(event_id="unfreeze-warn", customer_id="cust-warn", occurred_at=t(2026, 4, 6)))
    [lot] = await lots_of(db, "cust-warn")
    assert lot["expires_at"] == t(2026, 4, 10)  # moved by the 90-day pause

    queued = await notifications.warn_expiring_credits(lambda: SqlUnitOfWork(db), t(2026, 4, 7), 7)
    warnings = await rows(db, select(notifications_table.c.subject).where(notifications_table.c.customer_id == "cust-warn").order_by(notifications_table.c.id))
    assert queued == 1 and len(warnings) == 2, f"only the warning for the old date exists: {warnings}"


async def test_a_frozen_customer_cannot_book_over_http(db, pg_url):
    now = datetime.now(UTC)
    await apply(db, paid("pay-h", "cust-hold", 5, now - timedelta(days=2)))
    await apply(db, MembershipFrozen(event_id="freeze-h", customer_id="cust-hold", occurred_at=now - timedelta(days=1)))

    async with serving(db, pg_url) as http:
        refused = await http.post("/api/customers/cust-hold/holds", json={"job_id": "job-1", "credits": 1}, headers=FRONT)
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "membership_frozen"
        assert "cust-hold" in refused.json()["detail"]
        credits = (await http.get("/api/customers/cust-hold/credits", headers=FRONT)).json()
        assert credits["balance"] == credits["available"] == 5
        assert credits["can_schedule"] is False
        assert credits["frozen_since"] is not None
        assert await count(db, holds) == 0
        assert [e["kind"] for e in await entries_of(db, "cust-hold")] == ["issued"]

        await apply(db, MembershipUnfrozen(event_id="unfreeze-h", customer_id="cust-hold", occurred_at=now - timedelta(minutes=1)))
        booked = await http.post("/api/customers/cust-hold/holds", json={"job_id": "job-1", "credits": 1}, headers=FRONT)
        assert booked.status_code == 201, booked.text
        credits = (await http.get("/api/customers/cust-hold/credits", headers=FRONT)).json()
        assert (credits["available"], credits["can_schedule"], credits["frozen_since"]) == (4, True, None)


# --------------------------------------------------------------------------- gifts


async def test_a_gift_is_stored_atomically_with_its_expiry_dates(db):
    await apply(db, paid("pay-g1", "giver", 3, t(2025, 1, 1)), CreditPolicy(credit_expiration_months=3))  # expires 2025-04-01
    await apply(db, paid("pay-g2", "giver", 10, t(2025, 2, 1)))  # expires 2026-02-01
    gift = CreditsGifted(event_id="gift-1", customer_id="giver", to_customer_id="new-receiver", occurred_at=t(2025, 3, 1), credits=5)
    assert await apply(db, gift) is Outcome.APPLIED
    # A replay of the same event changes nothing.
    assert await apply(db, gift) is Outcome.DUPLICATE

    assert [(lot["remaining"], lot["source"]) for lot in await lots_of(db, "giver")] == [(0, "payment"), (8, "payment")]
    received = await lots_of(db, "new-receiver")
    assert [(lot["amount"], lot["remaining"], lot["source"], lot["expires_at"]) for lot in received] == [
        (3, 3, "gift", t(2025, 4, 1)),
        (2, 2, "gift", t(2026, 2, 1)),
    ]
    given = (await entries_of(db, "giver"))[-1]
    assert (given["kind"], given["credits"], given["balance_after"], given["note"]) == ("gifted", -5, 8, "gift to new-receiver")
    got = await entries_of(db, "new-receiver")
    assert [(e["kind"], e["credits"], e["balance_after"], e["lot_id"]) for e in got] == [
        ("gifted", 3, 3, received[0]["id"]),
        ("gifted", 2, 5, received[1]["id"]),
    ]
    giver_lots = await lots_of(db, "giver")
    taken = await rows(db, select(lot_movements.c.lot_id, lot_movements.c.credits).where(lot_movements.c.entry_id == given["id"]))
    assert sorted((m["lot_id"], m["credits"]) for m in taken) == [(giver_lots[0]["id"], 3), (giver_lots[1]["id"], 2)]
    for entry, lot in zip(got, received):
        moved = await rows(db, select(lot_movements.c.lot_id, lot_movements.c.credits).where(lot_movements.c.entry_id == entry["id"]))
        assert moved == [{"lot_id": lot["id"], "credits": lot["amount"]}]
    assert (await customer(db, "giver"))["balance"] == 8
    assert (await customer(db, "new-receiver"))["balance"] == 5
    assert await reconciliation(db) == []


async def test_gifts_refused_by_the_rules_change_nothing(db):
    await apply(db, paid("pay-a", "cust-a", 6, t(2025, 1, 1)))
    await apply(db, paid("pay-b", "cust-b", 2, t(2025, 1, 1)))
    await apply(db, MembershipFrozen(event_id="freeze-b", customer_id="cust-b", occurred_at=t(2025, 1, 5)))
    before = await ledger_snapshot(db)

    with pytest.raises(InsufficientCredits):
        await apply(db, CreditsGifted(event_id="gift-big", customer_id="cust-a", to_customer_id="cust-c", occurred_at=t(2025, 1, 6), credits=7))
    with pytest.raises(domain_errors.MembershipFrozen):
        await apply(db, CreditsGifted(event_id="gift-frozen", customer_id="cust-a", to_customer_id="cust-b", occurred_at=t(2025, 1, 6), credits=1))
    with pytest.raises(domain_errors.MembershipFrozen):
        await apply(db, CreditsGifted(event_id="gift-from-frozen", customer_id="cust-b", to_customer_id="cust-a", occurred_at=t(2025, 1, 6), credits=1))
    assert await ledger_snapshot(db) == before
    assert await customer(db, "cust-c") is None  # not even the receiver's row


async def test_two_customers_gifting_each_other_concurrently_on_real_workers(db, redis_client, redis_url, start_workers):
    base = t(2026, 3, 2, 9)
    for name in ("gift-a", "gift-b"):
        await apply(db, paid(f"pay-{name}", name, 300, base))
    workers = start_workers(processes=2, threads=4)
    publisher = Publisher.from_url(redis_url)
    rng = random.Random(20261121)
    gifts = []
    for n in range(200):
        giver, receiver = ("gift-a", "gift-b") if n % 2 == 0 else ("gift-b", "gift-a")
        gifts.append(
            CreditsGifted(
                event_id=f"gift-{n}", customer_id=giver, to_customer_id=receiver, occurred_at=base + timedelta(minutes=n + 1), credits=rng.randint(1, 3)
            )
        )
    sent = {"gift-a": 0, "gift-b": 0}
    for gift in gifts:
        sent[gift.customer_id] += gift.credits
    assert max(sent.values()) <= 300  # any order of application stays within what each has
    message_ids = [publisher.publish(gift) for gift in gifts]
    outcomes = wait_for_outcomes(workers, message_ids, timeout=60)
    assert Counter(outcomes.values()) == {"event_applied": len(gifts)}
    log = workers.log().lower()
    assert "deadlock" not in log and "retrying message" not in log

    final = {name: (await customer(db, name))["balance"] for name in ("gift-a", "gift-b")}
    assert final == {"gift-a": 300 - sent["gift-a"] + sent["gift-b"], "gift-b": 300 - sent["gift-b"] + sent["gift-a"]}
    assert sum(final.values()) == 600
    kinds = Counter((e["customer_id"], e["kind"], e["credits"] > 0) for e in await rows(db, select(ledger_entries)))
    assert kinds[("gift-a", "gifted", False)] == kinds[("gift-b", "gifted", False)] == 100
    # Every given credit arrived, to the other customer (one receiver entry per source lot).
    gifted = await rows(db, select(ledger_entries.c.customer_id, func.sum(ledger_entries.c.credits).label("net")).where(ledger_entries.c.kind == "gifted").group_by(ledger_entries.c.customer_id))
    assert sum(r["net"] for r in gifted) == 0
    assert await reconciliation(db) == []

    # A gift above what the giver has is dead-lettered and changes nothing.
    before = await ledger_snapshot(db)
    too_much = CreditsGifted(
        event_id="gift-too-much", customer_id="gift-a", to_customer_id="gift-b", occurred_at=base + timedelta(hours=5), credits=final["gift-a"] + 1
    )
    message_id = publisher.publish(too_much)
    assert wait_for_outcomes(workers, [message_id], timeout=30) == {message_id: "event_rejected"}
    archived = await wait_for_dead_letter_rows(db, [message_id])
    assert f"{final['gift-a']} credit(s) available" in archived[message_id]["error"]
    assert json.loads(archived[message_id]["message"])["kwargs"]
    assert message_id in dead_lettered(redis_client)
    assert await ledger_snapshot(db) == before
    assert await rows(db, select(processed_events.c.event_id).where(processed_events.c.event_id == "gift-too-much")) == []
    assert await count(db, dead_letters) == 1
    publisher.close()


# --------------------------------------------------------------------------- admin adjustments


async def test_admin_adjustments_over_the_api(db, pg_url):
    now = datetime.now(UTC)
    await apply(db, paid("pay-adj", "cust-adj", 10, now - timedelta(days=1)))
    url = "/api/admin/customers/cust-adj/adjustments"

    async with serving(db, pg_url) as http:
        added = await http.post(url, json={"credits": 5, "reason": "goodwill after the outage", "admin": "alice@ops"}, headers=ADMIN)
        assert added.status_code == 201, added.text
        assert added.json() == {"customer_id": "cust-adj", "credits": 5, "outcome": "applied"}
        taken = await http.post(url, json={"credits": -3, "reason": "double booking", "admin": "bob@ops"}, headers=ADMIN)
        assert taken.status_code == 201, taken.text

        adjusted = [e for e in await entries_of(db, "cust-adj") if e["kind"] == "adjusted"]
        assert [(e["credits"], e["balance_after"]) for e in adjusted] == [(5, 15), (-3, 12)]
        assert "goodwill after the outage" in adjusted[0]["note"] and "alice@ops" in adjusted[0]["note"]
        assert "double booking" in adjusted[1]["note"] and "bob@ops" in adjusted[1]["note"]
        assert all(e["event_id"].startswith("admin-adjustment:") for e in adjusted)
        [adjustment_lot] = [lot for lot in await lots_of(db, "cust-adj") if lot["source"] == "adjustment"]
        assert adjustment_lot["amount"] == 5
        credits = (await http.get("/api/customers/cust-adj/credits", headers=FRONT)).json()
        assert credits["balance"] == 12

        before = await ledger_snapshot(db)
        unknown = await http.post("/api/admin/customers/nobody/adjustments", json={"credits": 5, "reason": "x", "admin": "alice"}, headers=ADMIN)
        assert unknown.status_code == 404, unknown.text
        assert await customer(db, "nobody") is None
        for body in (
            {"credits": 0, "reason": "nothing", "admin": "alice"},
            {"credits": 5, "admin": "alice"},
            {"credits": 5, "reason": "", "admin": "alice"},
            {"credits": 5, "reason": "no admin"},
            {"credits": 5, "reason": "extra", "admin": "alice", "note": "unknown field"},
            {"credits": 10_000_000, "reason": "too big", "admin": "alice"},
        ):
            response = await http.post(url, json=body, headers=ADMIN)
            assert response.status_code == 422, (body, response.text)
        for headers in (FRONT, {}, {"Authorization": "Bearer wrong-token-0123456789"}):
            response = await http.post(url, json={"credits": 5, "reason": "sneaky", "admin": "mallory"}, headers=headers)
            assert response.status_code == 401, (headers, response.text)
        assert await ledger_snapshot(db) == before
    assert await reconciliation(db) == []


# --------------------------------------------------------------------------- analytics


async def analytics_history(db: Database) -> None:
    """Three months of credits, two-month expiry: Jan issues, Feb spends and adjusts, Mar expires, reverses and gifts."""
    await apply(db, paid("an-pay-a", "an-a", 100, t(2025, 1, 15, 10)), TWO_MONTHS)  # expires 2025-03-15 10:00
    await apply(db, paid("an-pay-b", "an-b", 50, t(2025, 1, 20, 10)), TWO_MONTHS)  # expires 2025-03-20 10:00
    await apply(db, JobCompleted(event_id="an-job-a", customer_id="an-a", occurred_at=t(2025, 2, 10), job_id="job-a", credits=30), TWO_MONTHS)
    await apply(db, CreditsAdjusted(event_id="an-adj-up", customer_id="an-b", occurred_at=t(2025, 2, 12), credits=10, reason="goodwill", actor="ops"), TWO_MONTHS)  # expires 2025-04-12
    await apply(db, CreditsAdjusted(event_id="an-adj-down", customer_id="an-b", occurred_at=t(2025, 2, 13), credits=-5, reason="fix", actor="ops"), TWO_MONTHS)
    await apply(db, paid("an-pay-c", "an-c", 40, t(2025, 3, 5)), TWO_MONTHS)  # expires 2025-05-05
    await apply(db, PaymentReversed(event_id="an-refund-c", customer_id="an-c", occurred_at=t(2025, 3, 25), payment_id="in_an-pay-c", reason="refund", total_credits_reversed=15), TWO_MONTHS)
    await apply(db, paid("an-pay-d", "an-d", 20, t(2025, 3, 28)), TWO_MONTHS)  # expires 2025-05-28
    await apply(db, CreditsGifted(event_id="an-gift", customer_id="an-c", to_customer_id="an-d", occurred_at=t(2025, 3, 30), credits=5), TWO_MONTHS)
    # A hold moves no balance and must not count anywhere.
    async with SqlUnitOfWork(db) as uow:
        account = await uow.accounts.lock("an-d", create=False)
        account.place_hold("job-d", 2, t(2025, 3, 29), "hold-d", TWO_MONTHS)
        await uow.accounts.save(account)
        await uow.commit()
    result = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), t(2025, 3, 31), 500)
    assert result.entries == 2  # an-a's 70 on Mar 15, an-b's 45 on Mar 20


def months(payload) -> dict[str, tuple]:
    return {
        m["month"]: (m["issued"], m["used"], m["expired"], m["reversed"], m["adjusted_down"], m["outstanding"], m["breakage_rate"])
        for m in payload["months"]
    }


async def test_credits_analytics_per_month(db, pg_url):
    await analytics_history(db)
    async with serving(db, pg_url, clock=FixedClock(t(2025, 4, 1))) as http:
        response = await http.get("/api/admin/credits/analytics", headers=ADMIN)
        assert response.status_code == 200, response.text
        found = response.json()
        #                  issued used expired reversed adj_down outstanding breakage
        assert months(found) == {
            "2025-01": (150, 0, 0, 0, 0, 150, 0.0),
            "2025-02": (10, 30, 0, 0, 5, 125, 0.0),
            "2025-03": (60, 0, 115, 15, 0, 55, round(115 / 60, 4)),
        }
        assert found["totals"] == {"issued": 220, "used": 30, "expired": 115, "reversed": 15, "adjusted_down": 5}
        assert found["breakage_rate"] == round(115 / 220, 4)
        # Open credits by the month they expire: an-b's adjustment lot in April; an-c's 20 and
        # an-d's 20 + 5 gifted (keeping an-c's date) in May.
        assert found["upcoming_expirations"] == [{"month": "2025-04", "credits": 10}, {"month": "2025-05", "credits": 45}]
        # Outstanding at the last month's end is what the customers hold.
        balances = [(await customer(db, c))["balance"] for c in ("an-a", "an-b", "an-c", "an-d")]
        assert balances == [0, 10, 20, 25]
        assert found["months"][-1]["outstanding"] == sum(balances)

        # since: months from February on, outstanding still cumulative from the start.
        since = (await http.get("/api/admin/credits/analytics", params={"since": "2025-02-01T00:00:00Z"}, headers=ADMIN)).json()
        assert months(since) == {"2025-02": (10, 30, 0, 0, 5, 125, 0.0), "2025-03": (60, 0, 115, 15, 0, 55, round(115 / 60, 4))}
        assert since["totals"] == {"issued": 70, "used": 30, "expired": 115, "reversed": 15, "adjusted_down": 5}
        assert since["breakage_rate"] == round(115 / 70, 4)
        assert since["upcoming_expirations"] == found["upcoming_expirations"]

        # until: entries before that instant only.
        until = (await http.get("/api/admin/credits/analytics", params={"until": "2025-03-01T00:00:00Z"}, headers=ADMIN)).json()
        assert months(until) == {"2025-01": (150, 0, 0, 0, 0, 150, 0.0), "2025-02": (10, 30, 0, 0, 5, 125, 0.0)}
        assert until["breakage_rate"] == 0.0
        mid_march = (await http.get("/api/admin/credits/analytics", params={"until": "2025-03-20T00:00:00Z"}, headers=ADMIN)).json()
        assert months(mid_march)["2025-03"] == (40, 0, 70, 0, 0, 95, round(70 / 40, 4))

        both = (await http.get("/api/admin/credits/analytics", params={"since": "2025-02-01T00:00:00Z", "until": "2025-03-01T00:00:00Z"}, headers=ADMIN)).json()
        assert months(both) == {"2025-02": (10, 30, 0, 0, 5, 125, 0.0)}
        assert both["breakage_rate"] == 0.0

        for params in ({"since": "2025-02-01T00:00:00"}, {"until": "not-a-date"}):  # naive or garbage
            assert (await http.get("/api/admin/credits/analytics", params=params, headers=ADMIN)).status_code == 422
        assert (await http.get("/api/admin/credits/analytics", headers=FRONT)).status_code == 401


async def test_analytics_since_is_read_in_utc_like_the_months(db):
    """Months are UTC; `since` given with another offset must pick the UTC month it falls in.

    2025-01-31T22:00-05:00 is 2025-02-01T03:00Z: January (UTC) is before it and must not be listed.
    """
    await analytics_history(db)
    found = await analytics.credits_analytics(db, t(2025, 4, 1), since=datetime(2025, 1, 31, 22, tzinfo=timezone(timedelta(hours=-5))))
    assert [m.month for m in found.months] == ["2025-02", "2025-03"]


async def test_empty_ledger_analytics(db, pg_url):
    async with serving(db, pg_url, clock=FixedClock(t(2025, 4, 1))) as http:
        found = (await http.get("/api/admin/credits/analytics", headers=ADMIN)).json()
    assert found == {"months": [], "upcoming_expirations": [], "totals": {"issued": 0, "used": 0, "expired": 0, "reversed": 0, "adjusted_down": 0}, "breakage_rate": None}


def plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


async def test_analytics_on_hundreds_of_thousands_of_entries_reads_the_kind_time_index(db):
    async with db.begin() as connection:
        await connection.execute(text("INSERT INTO customers (customer_id) SELECT 'scale-' || g FROM generate_series(0, 99) g"))
        await connection.execute(
            text(
                """
                INSERT INTO ledger_entries (customer_id, kind, credits, balance_after, overdraft_change, occurred_at, event_id)
                SELECT 'scale-' || (g % 100),
                       (ARRAY['issued', 'debited', 'captured', 'expired', 'adjusted', 'held', 'released', 'lapsed', 'reversed', 'gifted'])[1 + g % 10],
                       CASE WHEN g % 10 IN (0, 4, 5, 6, 7) THEN 1 + g % 7 ELSE -(1 + g % 3) END,
                       0, 0,
                       timestamptz '2023-01-01 00:00+00' + g * interval '5 minutes',
                       'scale-' || g
                FROM generate_series(1, 300000) AS g
                """
            )
        )
    # What autovacuum does after a bulk load: statistics, and the visibility map an index-only scan needs.
    async with db.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("VACUUM ANALYZE ledger_entries"))

    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
    try:
        found = await analytics.credits_analytics(db, t(2026, 1, 1))
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
    [(statement, parameters)] = [(s, p) for s, p in statements if "FROM ledger_entries" in s]
    async with db.connect() as connection:
        plan = (await connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)).scalar()
        expected = (
            await connection.execute(
                text(
                    "SELECT sum(credits) FILTER (WHERE kind = 'issued' OR (kind = 'adjusted' AND credits > 0)) AS issued, "
                    "-sum(credits) FILTER (WHERE kind = 'expired') AS expired, "
                    "-sum(credits) FILTER (WHERE kind IN ('debited', 'captured')) AS used, "
                    "sum(credits) FILTER (WHERE kind NOT IN ('held', 'released', 'lapsed')) AS net FROM ledger_entries"
                )
            )
        ).one()
    plan = plan if isinstance(plan, list) else json.loads(plan)
    nodes = list(plan_nodes(plan[0]["Plan"]))
    assert any(node.get("Index Name") == "ix_ledger_entries_kind_time" for node in nodes), json.dumps(plan, indent=1)
    assert not any(node.get("Node Type") == "Seq Scan" and node.get("Relation Name") == "ledger_entries" for node in nodes)

    # And the figures are the ledger's.
    assert [found.months[0].month, found.months[-1].month, len(found.months)] == ["2023-01", "2025-11", 35]  # 300,000 × 5 minutes ≈ 1,042 days
    assert found.totals["issued"] == expected.issued
    assert found.totals["expired"] == expected.expired
    assert found.totals["used"] == expected.used
    assert found.months[-1].outstanding == expected.net
