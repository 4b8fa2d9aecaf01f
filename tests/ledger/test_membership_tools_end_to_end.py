"""Membership tools against real PostgreSQL (and, for gifts end to end, real worker processes on Redis).

Freezing is stored and pauses the expiry sweep; a frozen customer cannot book over HTTP; gifts
cross between customers atomically, never deadlock, and go only to customers the ledger knows;
admins adjust credits with a reason, once per idempotency key; the credits analytics add up per
month over the requested window only (outstanding worked back from the stored balances,
breakage = expired ÷ (expired + used)) and read a range of the kind/time index.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import Counter
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta, timezone

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
    CustomerSignedUp,
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
from tests.support import reconciliation, t
from tests.support.delivery import (
    dead_lettered,
    ledger_snapshot,
    wait_for_dead_letter_rows,
    wait_for_outcomes,
)

UTC = UTC
POLICY = CreditPolicy()
TWO_MONTHS = CreditPolicy(credit_expiration_months=2)
ADMIN_TOKEN = "admin-token-membership-0123456789"
FRONTEND_TOKEN = "frontend-token-membership-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FRONT = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}


async def apply(db: Database, event_, policy: CreditPolicy = POLICY) -> Outcome:
    return await handlers.apply_event(event_, SqlUnitOfWork(db), policy)


def paid(event_id: str, customer: str, credits: int, at: datetime) -> PaymentSucceeded:
    return PaymentSucceeded(
        event_id=event_id, customer_id=customer, occurred_at=at, payment_id=f"in_{event_id}", credits=credits
    )


async def rows(db: Database, query) -> list[dict]:
    async with db.connect() as connection:
        return [dict(r) for r in (await connection.execute(query)).mappings().all()]


async def count(db: Database, table) -> int:
    async with db.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar_one()


async def lots_of(db: Database, customer: str) -> list[dict]:
    return await rows(db, select(credit_lots).where(credit_lots.c.customer_id == customer).order_by(credit_lots.c.id))


async def entries_of(db: Database, customer: str) -> list[dict]:
    return await rows(
        db, select(ledger_entries).where(ledger_entries.c.customer_id == customer).order_by(ledger_entries.c.id)
    )


async def customer(db: Database, customer_id: str) -> dict | None:
    found = await rows(db, select(customers).where(customers.c.customer_id == customer_id))
    return found[0] if found else None


@asynccontextmanager
async def serving(db: Database, pg_url: str, clock: Clock | None = None):
    """The app in-process (lifespan run), over httpx's ASGI transport."""
    settings = load_settings(
        database_url=pg_url, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None
    )
    app = create_app(settings, db=db, clock=clock)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http,
    ):
        yield http


# --------------------------------------------------------------------------- freeze


async def test_freezing_is_stored_and_the_sweep_passes_over_a_frozen_customer_until_unfrozen(db):
    await apply(db, paid("pay-f1", "cust-frozen", 10, t(2025, 1, 10)))  # expires 2026-01-10
    await apply(db, paid("pay-f2", "cust-frozen", 4, t(2025, 6, 1)))  # expires 2026-06-01
    await apply(db, paid("pay-o1", "cust-other", 3, t(2025, 1, 10)))  # expires 2026-01-10 too
    frozen_at, unfrozen_at = t(2025, 12, 1, 8), t(2026, 4, 1, 20)
    pause = unfrozen_at - frozen_at

    assert (
        await apply(db, MembershipFrozen(event_id="freeze-1", customer_id="cust-frozen", occurred_at=frozen_at))
        is Outcome.APPLIED
    )
    assert (await customer(db, "cust-frozen"))["frozen_since"] == frozen_at
    # A second freeze is recorded but changes nothing.
    assert (
        await apply(
            db,
            MembershipFrozen(event_id="freeze-2", customer_id="cust-frozen", occurred_at=frozen_at + timedelta(days=3)),
        )
        is Outcome.IGNORED
    )
    assert (await customer(db, "cust-frozen"))["frozen_since"] == frozen_at

    # The sweep, long after the first lot's original expiry: the other customer's lot expires,
    # the frozen customer's due lot is passed over, and the sweep ends (no endless re-selection).
    sweep_at = t(2026, 3, 1)
    result = await asyncio.wait_for(handlers.expire_due_credits(lambda: SqlUnitOfWork(db), sweep_at, 500), timeout=20)
    assert (result.customers, result.entries, result.more) == (1, 1, False)
    assert [(lot["remaining"], lot["expired"]) for lot in await lots_of(db, "cust-other")] == [(0, 3)]
    assert [(lot["remaining"], lot["expires_at"]) for lot in await lots_of(db, "cust-frozen")] == [
        (10, t(2026, 1, 10)),
        (4, t(2026, 6, 1)),
    ]
    assert "expired" not in {e["kind"] for e in await entries_of(db, "cust-frozen")}
    # Small batches too: the frozen customer never fills a batch and stalls the rest.
    result = await asyncio.wait_for(handlers.expire_due_credits(lambda: SqlUnitOfWork(db), sweep_at, 1), timeout=20)
    assert (result.customers, result.entries) == (0, 0)

    # While frozen its credits stay spendable however late they are read.
    view = await handlers.credit_view(SqlUnitOfWork(db, read_only=True), "cust-frozen", sweep_at)
    assert (view.balance, view.available, view.frozen_since, view.can_schedule) == (14, 14, frozen_at, False)

    assert (
        await apply(db, MembershipUnfrozen(event_id="unfreeze-1", customer_id="cust-frozen", occurred_at=unfrozen_at))
        is Outcome.APPLIED
    )
    assert (await customer(db, "cust-frozen"))["frozen_since"] is None
    moved = await lots_of(db, "cust-frozen")
    assert [(lot["remaining"], lot["expires_at"]) for lot in moved] == [
        (10, t(2026, 1, 10) + pause),
        (4, t(2026, 6, 1) + pause),
    ]
    # An unfreeze when not frozen is recorded, changes nothing.
    assert (
        await apply(
            db,
            MembershipUnfrozen(
                event_id="unfreeze-2", customer_id="cust-frozen", occurred_at=unfrozen_at + timedelta(days=1)
            ),
        )
        is Outcome.IGNORED
    )
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
    warnings = await rows(
        db,
        select(notifications_table.c.subject)
        .where(notifications_table.c.customer_id == "cust-warn")
        .order_by(notifications_table.c.id),
    )
    assert queued == 1 and len(warnings) == 2, f"only the warning for the old date exists: {warnings}"


async def test_a_frozen_customer_cannot_book_over_http(db, pg_url):
    now = datetime.now(UTC)
    await apply(db, paid("pay-h", "cust-hold", 5, now - timedelta(days=2)))
    await apply(db, MembershipFrozen(event_id="freeze-h", customer_id="cust-hold", occurred_at=now - timedelta(days=1)))

    async with serving(db, pg_url) as http:
        refused = await http.post(
            "/api/customers/cust-hold/holds", json={"job_id": "job-1", "credits": 1}, headers=FRONT
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "membership_frozen"
        assert "cust-hold" in refused.json()["detail"]
        credits = (await http.get("/api/customers/cust-hold/credits", headers=FRONT)).json()
        assert credits["balance"] == credits["available"] == 5
        assert credits["can_schedule"] is False
        assert credits["frozen_since"] is not None
        assert await count(db, holds) == 0
        assert [e["kind"] for e in await entries_of(db, "cust-hold")] == ["issued"]

        await apply(
            db,
            MembershipUnfrozen(event_id="unfreeze-h", customer_id="cust-hold", occurred_at=now - timedelta(minutes=1)),
        )
        booked = await http.post(
            "/api/customers/cust-hold/holds", json={"job_id": "job-1", "credits": 1}, headers=FRONT
        )
        assert booked.status_code == 201, booked.text
        credits = (await http.get("/api/customers/cust-hold/credits", headers=FRONT)).json()
        assert (credits["available"], credits["can_schedule"], credits["frozen_since"]) == (4, True, None)


# --------------------------------------------------------------------------- gifts


async def test_a_gift_is_stored_atomically_with_its_expiry_dates(db):
    await apply(
        db, paid("pay-g1", "giver", 3, t(2025, 1, 1)), CreditPolicy(credit_expiration_months=3)
    )  # expires 2025-04-01
    await apply(db, paid("pay-g2", "giver", 10, t(2025, 2, 1)))  # expires 2026-02-01
    # Gifts go only to customers the ledger knows: the receiver signed up first (no credits yet).
    await apply(
        db,
        CustomerSignedUp(
            event_id="signup-receiver",
            customer_id="new-receiver",
            occurred_at=t(2025, 2, 15),
            email="receiver@example.com",
        ),
    )
    assert (await customer(db, "new-receiver"))["balance"] == 0
    assert await lots_of(db, "new-receiver") == []
    gift = CreditsGifted(
        event_id="gift-1", customer_id="giver", to_customer_id="new-receiver", occurred_at=t(2025, 3, 1), credits=5
    )
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
    assert (given["kind"], given["credits"], given["balance_after"], given["note"]) == (
        "gifted",
        -5,
        8,
        "gift to new-receiver",
    )
    got = await entries_of(db, "new-receiver")
    assert [(e["kind"], e["credits"], e["balance_after"], e["lot_id"]) for e in got] == [
        ("gifted", 3, 3, received[0]["id"]),
        ("gifted", 2, 5, received[1]["id"]),
    ]
    giver_lots = await lots_of(db, "giver")
    taken = await rows(
        db, select(lot_movements.c.lot_id, lot_movements.c.credits).where(lot_movements.c.entry_id == given["id"])
    )
    assert sorted((m["lot_id"], m["credits"]) for m in taken) == [(giver_lots[0]["id"], 3), (giver_lots[1]["id"], 2)]
    for entry, lot in zip(got, received, strict=True):
        moved = await rows(
            db, select(lot_movements.c.lot_id, lot_movements.c.credits).where(lot_movements.c.entry_id == entry["id"])
        )
        assert moved == [{"lot_id": lot["id"], "credits": lot["amount"]}]
    assert (await customer(db, "giver"))["balance"] == 8
    assert (await customer(db, "new-receiver"))["balance"] == 5
    assert await reconciliation(db) == []


async def test_gifts_refused_by_the_rules_change_nothing(db):
    await apply(db, paid("pay-a", "cust-a", 6, t(2025, 1, 1)))
    await apply(db, paid("pay-b", "cust-b", 2, t(2025, 1, 1)))
    await apply(
        db,
        CustomerSignedUp(event_id="signup-c", customer_id="cust-c", occurred_at=t(2025, 1, 1), email="c@example.com"),
    )
    await apply(db, MembershipFrozen(event_id="freeze-b", customer_id="cust-b", occurred_at=t(2025, 1, 5)))
    before = await ledger_snapshot(db)

    # A known receiver, but more than the giver has.
    with pytest.raises(InsufficientCredits):
        await apply(
            db,
            CreditsGifted(
                event_id="gift-big", customer_id="cust-a", to_customer_id="cust-c", occurred_at=t(2025, 1, 6), credits=7
            ),
        )
    # A receiver the ledger does not know (a typo): refused even though the giver can afford it.
    with pytest.raises(domain_errors.UnknownCustomer):
        await apply(
            db,
            CreditsGifted(
                event_id="gift-unknown",
                customer_id="cust-a",
                to_customer_id="cust-nobody",
                occurred_at=t(2025, 1, 6),
                credits=1,
            ),
        )
    with pytest.raises(domain_errors.MembershipIsFrozen):
        await apply(
            db,
            CreditsGifted(
                event_id="gift-frozen",
                customer_id="cust-a",
                to_customer_id="cust-b",
                occurred_at=t(2025, 1, 6),
                credits=1,
            ),
        )
    with pytest.raises(domain_errors.MembershipIsFrozen):
        await apply(
            db,
            CreditsGifted(
                event_id="gift-from-frozen",
                customer_id="cust-b",
                to_customer_id="cust-a",
                occurred_at=t(2025, 1, 6),
                credits=1,
            ),
        )
    assert await ledger_snapshot(db) == before
    assert await customer(db, "cust-nobody") is None  # not even the receiver's row
    assert (await customer(db, "cust-c"))["balance"] == 0


@pytest.mark.parametrize("receiver", ["aaa-unknown", "zzz-unknown"])  # locked before the giver, and after it
async def test_a_gift_to_a_customer_the_ledger_does_not_know_is_refused_and_can_be_replayed_once_they_exist(
    db, receiver
):
    await apply(db, paid("pay-giver", "m-giver", 10, t(2025, 1, 1)))
    before = await ledger_snapshot(db)
    gift = CreditsGifted(
        event_id="gift-typo", customer_id="m-giver", to_customer_id=receiver, occurred_at=t(2025, 2, 1), credits=4
    )

    with pytest.raises(domain_errors.UnknownCustomer) as refused:
        await apply(db, gift)
    # A DomainError: the worker dead-letters it rather than retrying it.
    assert isinstance(refused.value, domain_errors.DomainError)
    assert receiver in str(refused.value)
    assert await ledger_snapshot(db) == before  # no account, no lot, no entry, not recorded as processed
    assert await customer(db, receiver) is None
    assert await rows(db, select(processed_events.c.event_id).where(processed_events.c.event_id == "gift-typo")) == []
    # Refused again, the same way, however often it is redelivered.
    with pytest.raises(domain_errors.UnknownCustomer):
        await apply(db, gift)
    assert await ledger_snapshot(db) == before

    # Once the receiver exists (their first payment), the same event (replayed) applies, once.
    await apply(db, paid("pay-receiver", receiver, 1, t(2025, 1, 20)))
    assert await apply(db, gift) is Outcome.APPLIED
    assert await apply(db, gift) is Outcome.DUPLICATE
    assert (await customer(db, "m-giver"))["balance"] == 6
    assert (await customer(db, receiver))["balance"] == 5
    assert [(lot["amount"], lot["source"]) for lot in await lots_of(db, receiver)] == [(1, "payment"), (4, "gift")]
    assert await reconciliation(db) == []


async def test_two_customers_gifting_each_other_concurrently_on_real_workers(
    db, redis_client, redis_url, start_workers
):
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
                event_id=f"gift-{n}",
                customer_id=giver,
                to_customer_id=receiver,
                occurred_at=base + timedelta(minutes=n + 1),
                credits=rng.randint(1, 3),
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
    gifted = await rows(
        db,
        select(ledger_entries.c.customer_id, func.sum(ledger_entries.c.credits).label("net"))
        .where(ledger_entries.c.kind == "gifted")
        .group_by(ledger_entries.c.customer_id),
    )
    assert sum(r["net"] for r in gifted) == 0
    assert await reconciliation(db) == []

    # A gift above what the giver has is dead-lettered and changes nothing.
    before = await ledger_snapshot(db)
    too_much = CreditsGifted(
        event_id="gift-too-much",
        customer_id="gift-a",
        to_customer_id="gift-b",
        occurred_at=base + timedelta(hours=5),
        credits=final["gift-a"] + 1,
    )
    message_id = publisher.publish(too_much)
    assert wait_for_outcomes(workers, [message_id], timeout=30) == {message_id: "event_rejected"}
    archived = await wait_for_dead_letter_rows(db, [message_id])
    assert f"{final['gift-a']} credit(s) available" in archived[message_id]["error"]
    assert json.loads(archived[message_id]["message"])["kwargs"]
    assert message_id in dead_lettered(redis_client)
    assert await ledger_snapshot(db) == before
    assert (
        await rows(db, select(processed_events.c.event_id).where(processed_events.c.event_id == "gift-too-much")) == []
    )
    assert await count(db, dead_letters) == 1

    # A gift to a customer the ledger does not know (a typo) is dead-lettered too, not retried,
    # and creates no account holding the credits.
    typo = CreditsGifted(
        event_id="gift-typo",
        customer_id="gift-a",
        to_customer_id="gift-c",
        occurred_at=base + timedelta(hours=6),
        credits=1,
    )
    message_id = publisher.publish(typo)
    assert wait_for_outcomes(workers, [message_id], timeout=30) == {message_id: "event_rejected"}
    archived = await wait_for_dead_letter_rows(db, [message_id])
    assert "'gift-c' does not exist" in archived[message_id]["error"]
    assert message_id in dead_lettered(redis_client)
    assert await ledger_snapshot(db) == before
    assert await customer(db, "gift-c") is None
    assert await count(db, dead_letters) == 2
    assert "retrying message" not in workers.log().lower()
    publisher.close()


# --------------------------------------------------------------------------- admin adjustments


async def test_admin_adjustments_over_the_api(db, pg_url):
    now = datetime.now(UTC)
    await apply(db, paid("pay-adj", "cust-adj", 10, now - timedelta(days=1)))
    url = "/api/admin/customers/cust-adj/adjustments"

    async with serving(db, pg_url) as http:
        added = await http.post(
            url, json={"credits": 5, "reason": "goodwill after the outage", "admin": "alice@ops"}, headers=ADMIN
        )
        assert added.status_code == 201, added.text
        assert added.json() == {"customer_id": "cust-adj", "credits": 5, "outcome": "applied"}
        taken = await http.post(
            url, json={"credits": -3, "reason": "double booking", "admin": "bob@ops"}, headers=ADMIN
        )
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
        unknown = await http.post(
            "/api/admin/customers/nobody/adjustments",
            json={"credits": 5, "reason": "x", "admin": "alice"},
            headers=ADMIN,
        )
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
        for body in (
            {"credits": 5, "reason": "short key", "admin": "alice", "idempotency_key": "short"},
            {"credits": 5, "reason": "bad key", "admin": "alice", "idempotency_key": "not a key with spaces"},
            {"credits": 5, "reason": "long key", "admin": "alice", "idempotency_key": "k" * 101},
        ):
            response = await http.post(url, json=body, headers=ADMIN)
            assert response.status_code == 422, (body, response.text)
        for headers in (FRONT, {}, {"Authorization": "Bearer wrong-token-0123456789"}):
            response = await http.post(
                url, json={"credits": 5, "reason": "sneaky", "admin": "mallory"}, headers=headers
            )
            assert response.status_code == 401, (headers, response.text)
        assert await ledger_snapshot(db) == before
    assert await reconciliation(db) == []


async def test_an_admin_adjustment_with_the_same_idempotency_key_applies_once(db, pg_url):
    now = datetime.now(UTC)
    await apply(db, paid("pay-idem", "cust-idem", 10, now - timedelta(days=1)))
    url = "/api/admin/customers/cust-idem/adjustments"

    async with serving(db, pg_url) as http:
        body = {"credits": 4, "reason": "goodwill", "admin": "alice@ops", "idempotency_key": "form-7f3a9c21"}
        first = await http.post(url, json=body, headers=ADMIN)
        assert first.status_code == 201, first.text
        assert first.json() == {"customer_id": "cust-idem", "credits": 4, "outcome": "applied"}
        # A retry after a timeout, a double click: the same key, a later moment. Applied once.
        after_first = await ledger_snapshot(db)
        again = await http.post(url, json=body, headers=ADMIN)
        assert again.status_code == 201, again.text
        assert again.json() == {"customer_id": "cust-idem", "credits": 4, "outcome": "duplicate"}
        assert await ledger_snapshot(db) == after_first
        # The key is per request: reused with other content, it applies nothing either.
        reused = await http.post(url, json={**body, "credits": 40}, headers=ADMIN)
        assert reused.json().get("outcome") != "applied", reused.text
        assert await ledger_snapshot(db) == after_first
        # The key is per customer's request, not per customer: another key applies.
        other = await http.post(url, json={**body, "idempotency_key": "form-7f3a9c22"}, headers=ADMIN)
        assert other.json()["outcome"] == "applied", other.text

        # Without a key, each call is a new adjustment, even with the same body.
        plain = {"credits": -1, "reason": "no-show fee", "admin": "bob@ops"}
        for _ in range(2):
            response = await http.post(url, json=plain, headers=ADMIN)
            assert (response.status_code, response.json()["outcome"]) == (201, "applied"), response.text

    adjusted = [e for e in await entries_of(db, "cust-idem") if e["kind"] == "adjusted"]
    assert [(e["credits"], e["balance_after"]) for e in adjusted] == [(4, 14), (4, 18), (-1, 17), (-1, 16)]
    assert [e["event_id"] for e in adjusted[:2]] == ["admin-adjustment:form-7f3a9c21", "admin-adjustment:form-7f3a9c22"]
    assert adjusted[2]["event_id"] != adjusted[3]["event_id"]
    assert (await customer(db, "cust-idem"))["balance"] == 16
    assert await reconciliation(db) == []


async def test_an_api_adjustment_with_a_lone_surrogate_is_refused_with_422_and_changes_nothing(db, pg_url):
    await apply(db, paid("pay-sur", "cust-sur", 10, datetime.now(UTC) - timedelta(days=1)))
    before = await ledger_snapshot(db)
    async with serving(db, pg_url) as http:
        for raw in (
            b'{"credits": 5, "reason": "goodwill \\ud800", "admin": "alice@ops"}',
            b'{"credits": 5, "reason": "goodwill", "admin": "\\udfff"}',
            b'{"credits": 5, "reason": "goodwill", "admin": "alice@ops", "idempotency_key": "surrogate-\\ud800"}',
        ):
            response = await http.post(
                "/api/admin/customers/cust-sur/adjustments",
                content=raw,
                headers={**ADMIN, "Content-Type": "application/json"},
            )
            assert response.status_code == 422, (raw, response.text)
    assert await ledger_snapshot(db) == before


async def _waiting_for_locks(db: Database) -> int:
    async with db.connect() as connection:
        return (
            await connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query ILIKE '%customers%'"
                )
            )
        ).scalar_one()


async def test_a_double_click_sent_at_once_applies_the_adjustment_once_and_answers_both(db, pg_url):
    """The docstring's case: "a double click or a retried request apply once". Two requests
    with the same key that arrive together both pass the "seen before?" check, then queue on
    the customer's lock; the second must come back `duplicate`, not as a server error.

    The clock is the real one, as in production: each request has its own moment."""
    now = datetime.now(UTC)
    await apply(db, paid("pay-dbl", "cust-dbl", 10, now - timedelta(days=1)))
    body = {"credits": 3, "reason": "double click", "admin": "alice@ops", "idempotency_key": "click-0123456789"}
    settings = load_settings(
        database_url=pg_url, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None
    )
    app = create_app(settings, db=db)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://credits.test") as http,
    ):
        # Another transaction holds the customer for a moment (any event being applied).
        async with db.connect() as blocker:
            await blocker.begin()
            await blocker.execute(text("SELECT 1 FROM customers WHERE customer_id = 'cust-dbl' FOR UPDATE"))
            clicks = [
                asyncio.create_task(http.post("/api/admin/customers/cust-dbl/adjustments", json=body, headers=ADMIN))
                for _ in range(2)
            ]
            deadline = asyncio.get_running_loop().time() + 10
            while await _waiting_for_locks(db) < 2:
                assert asyncio.get_running_loop().time() < deadline, (
                    "both requests should be waiting on the customer's lock"
                )
                await asyncio.sleep(0.05)
            await blocker.rollback()
        answers = await asyncio.gather(*clicks)
    assert [a.status_code for a in answers] == [201, 201], [a.text for a in answers]
    assert sorted(a.json()["outcome"] for a in answers) == ["applied", "duplicate"]
    adjusted = [e for e in await entries_of(db, "cust-dbl") if e["kind"] == "adjusted"]
    assert [e["credits"] for e in adjusted] == [3]
    assert (await customer(db, "cust-dbl"))["balance"] == 13


# --------------------------------------------------------------------------- analytics


async def analytics_history(db: Database) -> None:
    """Three months of credits, two-month expiry: Jan issues, Feb spends and adjusts, Mar expires, reverses and gifts."""
    await apply(db, paid("an-pay-a", "an-a", 100, t(2025, 1, 15, 10)), TWO_MONTHS)  # expires 2025-03-15 10:00
    await apply(db, paid("an-pay-b", "an-b", 50, t(2025, 1, 20, 10)), TWO_MONTHS)  # expires 2025-03-20 10:00
    await apply(
        db,
        JobCompleted(event_id="an-job-a", customer_id="an-a", occurred_at=t(2025, 2, 10), job_id="job-a", credits=30),
        TWO_MONTHS,
    )
    await apply(
        db,
        CreditsAdjusted(
            event_id="an-adj-up",
            customer_id="an-b",
            occurred_at=t(2025, 2, 12),
            credits=10,
            reason="goodwill",
            actor="ops",
        ),
        TWO_MONTHS,
    )  # expires 2025-04-12
    await apply(
        db,
        CreditsAdjusted(
            event_id="an-adj-down",
            customer_id="an-b",
            occurred_at=t(2025, 2, 13),
            credits=-5,
            reason="fix",
            actor="ops",
        ),
        TWO_MONTHS,
    )
    await apply(db, paid("an-pay-c", "an-c", 40, t(2025, 3, 5)), TWO_MONTHS)  # expires 2025-05-05
    await apply(
        db,
        PaymentReversed(
            event_id="an-refund-c",
            customer_id="an-c",
            occurred_at=t(2025, 3, 25),
            payment_id="in_an-pay-c",
            reason="refund",
            total_credits_reversed=15,
        ),
        TWO_MONTHS,
    )
    await apply(db, paid("an-pay-d", "an-d", 20, t(2025, 3, 28)), TWO_MONTHS)  # expires 2025-05-28
    await apply(
        db,
        CreditsGifted(
            event_id="an-gift", customer_id="an-c", to_customer_id="an-d", occurred_at=t(2025, 3, 30), credits=5
        ),
        TWO_MONTHS,
    )
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
        m["month"]: (
            m["issued"],
            m["used"],
            m["expired"],
            m["reversed"],
            m["adjusted_down"],
            m["outstanding"],
            m["breakage_rate"],
        )
        for m in payload["months"]
    }


def breakage(expired: int, used: int) -> float | None:
    """The share of credits that ended unused: expired ÷ (expired + used)."""
    return round(expired / (expired + used), 4) if expired + used else None


async def test_credits_analytics_per_month(db, pg_url):
    await analytics_history(db)
    async with serving(db, pg_url, clock=FixedClock(t(2025, 4, 1))) as http:
        # The default window is the last twelve UTC months before now: all of this history.
        response = await http.get("/api/admin/credits/analytics", headers=ADMIN)
        assert response.status_code == 200, response.text
        found = response.json()
        #                  issued used expired reversed adj_down outstanding breakage
        assert months(found) == {
            "2025-01": (150, 0, 0, 0, 0, 150, None),  # nothing ended: no rate
            "2025-02": (10, 30, 0, 0, 5, 125, 0.0),  # 30 used, none expired
            "2025-03": (60, 0, 115, 15, 0, 55, 1.0),  # 115 expired, none used
        }
        assert found["totals"] == {"issued": 220, "used": 30, "expired": 115, "reversed": 15, "adjusted_down": 5}
        assert found["breakage_rate"] == breakage(115, 30) == round(115 / 145, 4)
        # Open credits by the month they expire: an-b's adjustment lot in April; an-c's 20 and
        # an-d's 20 + 5 gifted (keeping an-c's date) in May.
        assert found["upcoming_expirations"] == [
            {"month": "2025-04", "credits": 10},
            {"month": "2025-05", "credits": 45},
        ]
        # Outstanding at the last month's end is what the customers hold.
        balances = [(await customer(db, c))["balance"] for c in ("an-a", "an-b", "an-c", "an-d")]
        assert balances == [0, 10, 20, 25]
        assert found["months"][-1]["outstanding"] == sum(balances)

        # since: months from February on (January is not read at all), outstanding still the
        # book balance at each month's end, worked back from the customers' balances.
        since = (
            await http.get("/api/admin/credits/analytics", params={"since": "2025-02-01T00:00:00Z"}, headers=ADMIN)
        ).json()
        assert months(since) == {"2025-02": (10, 30, 0, 0, 5, 125, 0.0), "2025-03": (60, 0, 115, 15, 0, 55, 1.0)}
        assert since["totals"] == {"issued": 70, "used": 30, "expired": 115, "reversed": 15, "adjusted_down": 5}
        assert since["breakage_rate"] == breakage(115, 30)
        assert since["upcoming_expirations"] == found["upcoming_expirations"]
        # since picks whole months: the middle of February is all of February.
        mid_february = (
            await http.get("/api/admin/credits/analytics", params={"since": "2025-02-20T13:45:00Z"}, headers=ADMIN)
        ).json()
        assert months(mid_february) == months(since)

        # until: entries before that instant only.
        until = (
            await http.get("/api/admin/credits/analytics", params={"until": "2025-03-01T00:00:00Z"}, headers=ADMIN)
        ).json()
        assert months(until) == {"2025-01": (150, 0, 0, 0, 0, 150, None), "2025-02": (10, 30, 0, 0, 5, 125, 0.0)}
        assert until["breakage_rate"] == 0.0
        mid_march = (
            await http.get("/api/admin/credits/analytics", params={"until": "2025-03-20T00:00:00Z"}, headers=ADMIN)
        ).json()
        # By Mar 20: an-c paid 40, an-a's 70 expired (an-b's 45 expires at 10:00 that day): 125 + 40 - 70.
        assert months(mid_march)["2025-03"] == (40, 0, 70, 0, 0, 95, 1.0)

        both = (
            await http.get(
                "/api/admin/credits/analytics",
                params={"since": "2025-02-01T00:00:00Z", "until": "2025-03-01T00:00:00Z"},
                headers=ADMIN,
            )
        ).json()
        assert months(both) == {"2025-02": (10, 30, 0, 0, 5, 125, 0.0)}
        assert both["breakage_rate"] == 0.0
        # A window with nothing in it.
        quiet = (
            await http.get(
                "/api/admin/credits/analytics",
                params={"since": "2024-06-01T00:00:00Z", "until": "2024-12-01T00:00:00Z"},
                headers=ADMIN,
            )
        ).json()
        assert (quiet["months"], quiet["breakage_rate"]) == ([], None)
        assert quiet["totals"] == {"issued": 0, "used": 0, "expired": 0, "reversed": 0, "adjusted_down": 0}

        for params in ({"since": "2025-02-01T00:00:00"}, {"until": "not-a-date"}):  # naive or garbage
            assert (await http.get("/api/admin/credits/analytics", params=params, headers=ADMIN)).status_code == 422
        assert (await http.get("/api/admin/credits/analytics", headers=FRONT)).status_code == 401


async def test_analytics_default_window_is_the_last_twelve_months_before_now(db, pg_url):
    """Months older than the window are neither listed nor read; the outstanding balance of
    the months shown is still the whole book's (worked back from the stored balances)."""
    await analytics_history(db)
    # 2026-02-15: the twelve months are 2025-03 … 2026-02; January and February 2025 fall out.
    async with serving(db, pg_url, clock=FixedClock(t(2026, 2, 15))) as http:
        found = (await http.get("/api/admin/credits/analytics", headers=ADMIN)).json()
    assert months(found) == {"2025-03": (60, 0, 115, 15, 0, 55, 1.0)}
    assert found["totals"] == {"issued": 60, "used": 0, "expired": 115, "reversed": 15, "adjusted_down": 0}
    assert found["breakage_rate"] == 1.0

    # Exactly twelve months: at 2026-03-01 the window starts at 2025-04-01, after all of it.
    later = await analytics.credits_analytics(db, t(2026, 3, 1))
    assert later.months == [] and later.breakage_rate is None
    # And the one-month-earlier edge: at 2026-02-28 23:59 March 2025 is still in.
    edge = await analytics.credits_analytics(db, t(2026, 2, 28, 23, 59))
    assert [m.month for m in edge.months] == ["2025-03"]


async def test_analytics_refuses_dates_outside_the_years_2000_to_2999_and_a_since_after_until(db, pg_url):
    await analytics_history(db)
    url = "/api/admin/credits/analytics"
    async with serving(db, pg_url, clock=FixedClock(t(2025, 4, 1))) as http:
        for params in (
            {"since": "1999-12-31T23:59:59Z"},
            {"until": "3000-01-01T00:00:00Z"},
            {"since": "0001-01-01T00:00:00Z"},
            {"until": "9999-12-31T23:59:59Z"},
            # 2000 where given, 1999 in UTC; 2999 where given, 3000 in UTC.
            {"since": "2000-01-01T00:30:00+01:00"},
            {"until": "2999-12-31T23:30:00-01:00"},
            {"since": "2025-03-01T00:00:00Z", "until": "2025-02-01T00:00:00Z"},
            {"since": "2025-03-01T00:00:01Z", "until": "2025-03-01T00:00:00Z"},
        ):
            response = await http.get(url, params=params, headers=ADMIN)
            assert response.status_code == 422, (params, response.text)
        # The bounds themselves are fine, and since == until is an (empty) window, not an error.
        for params in (
            {"since": "2000-01-01T00:00:00Z"},
            {"until": "2999-12-31T23:59:59Z"},
            {"since": "2025-03-01T00:00:00Z", "until": "2025-03-01T00:00:00Z"},
        ):
            response = await http.get(url, params=params, headers=ADMIN)
            assert response.status_code == 200, (params, response.text)
        wide = (
            await http.get(
                url, params={"since": "2000-01-01T00:00:00Z", "until": "2999-12-31T23:59:59Z"}, headers=ADMIN
            )
        ).json()
        assert list(months(wide)) == ["2025-01", "2025-02", "2025-03"]


async def test_analytics_since_is_read_in_utc_like_the_months(db):
    """Months are UTC; `since` given with another offset must pick the UTC month it falls in.

    2025-01-31T22:00-05:00 is 2025-02-01T03:00Z: January (UTC) is before it and must not be listed.
    """
    await analytics_history(db)
    found = await analytics.credits_analytics(
        db, t(2025, 4, 1), since=datetime(2025, 1, 31, 22, tzinfo=timezone(timedelta(hours=-5)))
    )
    assert [m.month for m in found.months] == ["2025-02", "2025-03"]


async def test_empty_ledger_analytics(db, pg_url):
    async with serving(db, pg_url, clock=FixedClock(t(2025, 4, 1))) as http:
        found = (await http.get("/api/admin/credits/analytics", headers=ADMIN)).json()
    assert found == {
        "months": [],
        "upcoming_expirations": [],
        "totals": {"issued": 0, "used": 0, "expired": 0, "reversed": 0, "adjusted_down": 0},
        "breakage_rate": None,
    }


async def test_analytics_figures_are_of_one_moment_while_payments_come_in(db, pg_url):
    """The window's entries, the stored balances and what happened after the window are read
    by separate statements; a payment committed between them must not shift every month's
    outstanding balance. Here one lands (dated in March) just before the balances are read:
    January's outstanding must still be what had been issued by then (150), whichever side
    of the payment the report is taken on."""
    await analytics_history(db)
    injected = []

    def pay_meanwhile() -> None:
        async def write() -> None:
            other = Database(pg_url)
            try:
                await handlers.apply_event(
                    paid("an-pay-meanwhile", "an-e", 1000, t(2025, 3, 31, 12)), SqlUnitOfWork(other), TWO_MONTHS
                )
            finally:
                await other.dispose()

        asyncio.run(write())

    def before_balances(conn, cursor, statement, parameters, context, executemany):
        if "FROM customers" in statement and not injected:
            injected.append(statement)
            # Another worker commits a payment now (its own thread, loop and connection).
            thread = threading.Thread(target=pay_meanwhile)
            thread.start()
            thread.join(timeout=30)

    event.listen(db.engine.sync_engine, "before_cursor_execute", before_balances)
    try:
        found = await analytics.credits_analytics(db, t(2025, 4, 1))
    finally:
        event.remove(db.engine.sync_engine, "before_cursor_execute", before_balances)
    assert injected and (await customer(db, "an-e"))["balance"] == 1000  # the payment did land in between
    by_month = {m.month: m for m in found.months}
    march_issued = by_month["2025-03"].issued
    assert march_issued in (60, 1060)
    # The book at each month's end, of the same moment as the months' figures.
    assert [m.outstanding for m in found.months] == ([150, 125, 55] if march_issued == 60 else [150, 125, 1055]), [
        (m.month, m.issued, m.outstanding) for m in found.months
    ]


def plan_nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.mark.slow  # writes 300,000 entries: ~4 s
async def test_analytics_on_hundreds_of_thousands_of_entries_reads_the_kind_time_index(db):
    async with db.begin() as connection:
        await connection.execute(
            text("INSERT INTO customers (customer_id) SELECT 'scale-' || g FROM generate_series(0, 99) g")
        )
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
        # The stored balances are what the balance-moving entries sum to (as the ledger keeps them).
        await connection.execute(
            text(
                "UPDATE customers SET balance = s.net FROM (SELECT customer_id, sum(credits) AS net FROM ledger_entries "
                "WHERE kind NOT IN ('held', 'released', 'lapsed') GROUP BY customer_id) s WHERE s.customer_id = customers.customer_id"
            )
        )
    # What autovacuum does after a bulk load: statistics, and the visibility map an index-only scan needs.
    async with db.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text("VACUUM ANALYZE ledger_entries"))

    async def run(**window) -> tuple[analytics.Analytics, list[tuple[str, object]]]:
        statements: list[tuple[str, object]] = []

        def capture(conn, cursor, statement, parameters, context, executemany):
            statements.append((statement, parameters))

        event.listen(db.engine.sync_engine, "before_cursor_execute", capture)
        try:
            found = await analytics.credits_analytics(db, t(2026, 1, 1), **window)
        finally:
            event.remove(db.engine.sync_engine, "before_cursor_execute", capture)
        return found, [(s, p) for s, p in statements if "FROM ledger_entries" in s]

    async def assert_reads_a_range_of_the_index(statement: str, parameters) -> None:
        async with db.connect() as connection:
            plan = (await connection.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters)).scalar()
        plan = plan if isinstance(plan, list) else json.loads(plan)
        nodes = list(plan_nodes(plan[0]["Plan"]))
        on_index = [node for node in nodes if node.get("Index Name") == "ix_ledger_entries_kind_time"]
        assert on_index, json.dumps(plan, indent=1)
        # A range of it: the time bound is in the index condition, not a filter after a full read.
        assert all("occurred_at" in node.get("Index Cond", "") for node in on_index), json.dumps(plan, indent=1)
        assert not any(
            node.get("Node Type") == "Seq Scan" and node.get("Relation Name") == "ledger_entries" for node in nodes
        )

    async def expected(since: datetime, until: datetime | None):
        bound = "occurred_at >= :since" + (" AND occurred_at < :until" if until else "")
        async with db.connect() as connection:
            totals = (
                await connection.execute(
                    text(
                        "SELECT sum(credits) FILTER (WHERE kind = 'issued' OR (kind = 'adjusted' AND credits > 0)) AS issued, "
                        "-sum(credits) FILTER (WHERE kind = 'expired') AS expired, "
                        "-sum(credits) FILTER (WHERE kind IN ('debited', 'captured')) AS used "
                        f"FROM ledger_entries WHERE {bound}"
                    ),
                    {"since": since, "until": until},
                )
            ).one()
            # The book balance at each month's end (or at `until`), summed from the very first entry.
            ends = (
                await connection.execute(
                    text(
                        "SELECT to_char(m, 'YYYY-MM') AS month, (SELECT sum(credits) FROM ledger_entries "
                        "WHERE kind NOT IN ('held', 'released', 'lapsed') AND occurred_at < least(m + interval '1 month', coalesce(:until, 'infinity'))) AS outstanding "
                        "FROM generate_series(CAST(:since AS timestamptz), coalesce(:until, '2025-12-01'::timestamptz), interval '1 month') AS m "
                        "WHERE m < coalesce(:until, 'infinity') AND m < '2025-11-09' ORDER BY m"
                    ),
                    {"since": since, "until": until},
                )
            ).all()
        return totals, {r.month: r.outstanding for r in ends}

    # The default window: twelve UTC months up to now (2026-01-01): 2025-02 … 2026-01. The
    # entries (300,000 × 5 minutes ≈ 1,042 days from 2023-01-01) end in 2025-11.
    found, [(statement, parameters)] = await run()
    await assert_reads_a_range_of_the_index(statement, parameters)
    totals, outstanding = await expected(t(2025, 2, 1), None)
    assert [found.months[0].month, found.months[-1].month, len(found.months)] == ["2025-02", "2025-11", 10]
    assert (found.totals["issued"], found.totals["expired"], found.totals["used"]) == (
        totals.issued,
        totals.expired,
        totals.used,
    )
    assert {m.month: m.outstanding for m in found.months} == outstanding
    # SUM over BIGINT is NUMERIC (a Decimal here): the rate is a float, as the route serves it.
    assert found.breakage_rate == round(int(totals.expired) / int(totals.expired + totals.used), 4)

    # A window in the past: both the window and "what happened after it" read a range of the index.
    found, statements = await run(since=t(2024, 3, 10), until=t(2024, 9, 20, 12))
    assert len(statements) == 2
    for statement, parameters in statements:
        await assert_reads_a_range_of_the_index(statement, parameters)
    totals, outstanding = await expected(t(2024, 3, 1), t(2024, 9, 20, 12))
    assert [m.month for m in found.months] == [f"2024-{n:02}" for n in range(3, 10)]
    assert (found.totals["issued"], found.totals["expired"], found.totals["used"]) == (
        totals.issued,
        totals.expired,
        totals.used,
    )
    assert {m.month: m.outstanding for m in found.months} == outstanding
