"""The admin console in a real headless Chromium (Debian's, driven by Playwright): one admin's
journey per page, through real `dramatiq` workers, Redis and PostgreSQL.

The app is served by uvicorn in this process (its clock is the test's); events go through the
real Publisher; periodic jobs run as an operator runs them (`credits run pay_referrals
--as-of`). Each test leaves a screenshot of its page in docs/ (docs/ADMIN.md shows them) and
checks that at 768 px the page does not scroll sideways.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.async_api import Page, async_playwright
from sqlalchemy import select

from api.app import create_app
from domain.referrals import ReferrerDetails, ReferrerKind
from infra.clock import FixedClock
from infra.db.tables import customers, ledger_entries, payouts, referrals
from infra.settings import load_settings
from messages import CustomerSignedUp, JobCompleted, PaymentFailed, PaymentSucceeded, Publisher
from service_layer import referrals as referral_cases
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import ROOT, InProcessServer, eventually
from tests.support.fake_stripe import event as stripe_event
from tests.support.fake_stripe import invoice, mark_paid, signed
from tests.support.referrals import pay_referrals_as_of

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
WEBHOOK_SECRET = "whsec_" + uuid.uuid4().hex
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NAV = ["Retention", "Customers", "Referrals", "Payouts", "Payments", "Analytics"]


def at(month: int, day: int, hour: int = 12) -> datetime:
    """The referral stories are set in October 2026 (in the past: pay_referrals refuses the future)."""
    return datetime(2026, month, day, hour, tzinfo=UTC)


class Console:
    """A signed-in admin's browser tab on the app, and the publisher producers use."""

    def __init__(self, page: Page, base_url: str, publisher: Publisher, clock: FixedClock, workers, tmp_path) -> None:
        self.page, self.base_url, self.publisher, self.clock, self.workers, self.tmp_path = (
            page,
            base_url,
            publisher,
            clock,
            workers,
            tmp_path,
        )
        self.dialogs: list[str] = []
        self.answer = True

        async def on_dialog(dialog) -> None:
            self.dialogs.append(dialog.message)
            await (dialog.accept() if self.answer else dialog.dismiss())

        page.on("dialog", on_dialog)

    async def open(self, path: str) -> None:
        await self.page.goto(self.base_url + path)
        labels = [
            (await link.inner_text()).split("\n")[0].strip()
            for link in await self.page.locator("nav.top ul > li > a").all()
        ]
        assert [label.rstrip("0123456789… ").strip() for label in labels] == NAV
        assert await self.page.get_by_test_id("at-risk-bubble").count() == 1

    async def flash(self) -> str:
        return await self.page.get_by_test_id("flash").inner_text()

    async def screenshot_and_narrow(self, name: str) -> None:
        """The page at 1280 px into docs/admin-<name>.png; then at 768 px no sideways scroll."""
        await self.page.set_viewport_size({"width": 1280, "height": 800})
        await self.page.screenshot(path=str(self.tmp_path / "shot.png"), full_page=True)
        shutil.copyfile(self.tmp_path / "shot.png", ROOT / "docs" / f"admin-{name}.png")
        await self.page.set_viewport_size({"width": 768, "height": 900})
        widths = await self.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert widths[0] <= widths[1], f"{name} scrolls sideways at 768 px: {widths}"
        await self.page.set_viewport_size({"width": 1280, "height": 800})


@asynccontextmanager
async def console_for(pg_url, redis_url, workers_env, start_workers, tmp_path, now: datetime, **settings):
    workers = start_workers(env=workers_env)
    app_settings = load_settings(
        database_url=pg_url,
        redis_url=redis_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token="front-" + uuid.uuid4().hex,
        admin_cookie_secure=False,
        admin_live_interval_seconds=0.3,
        event_max_age_days=36500,
        **settings,
    )
    clock = FixedClock(now)
    publisher = Publisher.from_url(redis_url)
    async with InProcessServer(create_app(app_settings, clock=clock)) as server, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800}, accept_downloads=True)
            await page.goto(server.base_url + "/admin/login")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_url(server.base_url + "/admin")
            yield Console(page, server.base_url, publisher, clock, workers, tmp_path)
        finally:
            await browser.close()
            publisher.close()


async def scalar(db, query):
    async with db.connect() as connection:
        return (await connection.execute(query)).scalar_one_or_none()


async def entries_of(db, customer_id: str) -> list:
    async with db.connect() as connection:
        return list(
            await connection.execute(
                select(ledger_entries).where(ledger_entries.c.customer_id == customer_id).order_by(ledger_entries.c.id)
            )
        )


# ---------------------------------------------------------------- Customers


async def test_customers_find_read_the_history_and_act_once(
    db, pg_url, redis_url, service_env, start_workers, tmp_path
):
    now = datetime.now(UTC).replace(microsecond=0)
    async with console_for(pg_url, redis_url, service_env, start_workers, tmp_path, now) as admin:
        start = now - timedelta(days=60)
        admin.publisher.publish(
            CustomerSignedUp(event_id="signup-ann", occurred_at=start, customer_id="ann", email="Ann.Lee@Example.com")
        )
        admin.publisher.publish(
            CustomerSignedUp(event_id="signup-bo", occurred_at=start, customer_id="bo", email="bo@example.com")
        )
        admin.publisher.publish(
            PaymentSucceeded(event_id="pay-ann", occurred_at=start, customer_id="ann", payment_id="in-ann", credits=40)
        )
        for n in range(24):
            admin.publisher.publish(
                JobCompleted(
                    event_id=f"job-ann-{n}",
                    occurred_at=start + timedelta(days=1, hours=n),
                    customer_id="ann",
                    job_id=f"job-{n}",
                    credits=1,
                )
            )
        await eventually(lambda: _count(db, "ann", 25), timeout=60, message="ann's 25 entries")

        # Found by the address she signed up with, however it is typed.
        await admin.open("/admin/customers")
        await admin.page.get_by_label("Customer id or sign-up email").fill("ann.lee@example.com")
        await admin.page.get_by_role("button", name="Find").click()
        await admin.page.locator("tr[data-customer=ann] a").click()
        await admin.page.wait_for_url(admin.base_url + "/admin/customers/ann")
        assert await admin.page.get_by_test_id("balance").inner_text() == "16"

        # The history pages: 20 newest, then the rest; the CSV has all 25.
        ledger = admin.page.get_by_test_id("ledger").locator("tbody tr")
        assert await ledger.count() == 20
        await admin.page.get_by_role("link", name="Older entries").click()
        assert await ledger.count() == 5
        assert "issued" in await ledger.last.inner_text()
        async with admin.page.expect_download() as download_info:
            await admin.page.get_by_role("link", name="Download the whole history (CSV)").click()
        rows = list(csv.DictReader(io.StringIO((await (await download_info.value).path()).read_text())))
        assert len(rows) == 25 and rows[0]["kind"] == "issued" and rows[-1]["balance_after"] == "16"

        # An adjustment, confirmed, double-clicked: applied once.
        await admin.page.get_by_label("Credits (+ or −)").fill("5")
        await admin.page.get_by_label("Reason").fill("goodwill after a late cleaner")
        await admin.page.get_by_role("button", name="Adjust").dblclick()
        await admin.page.get_by_test_id("flash").wait_for()
        assert "Adjusted by +5" in await admin.flash()
        assert await admin.page.get_by_test_id("balance").inner_text() == "21"
        assert [e.credits for e in await entries_of(db, "ann") if e.kind == "adjusted"] == [5]

        # Freezing asks first: dismissed, nothing happens; accepted, the membership is frozen.
        admin.answer = False
        await admin.page.get_by_role("button", name="Freeze").click()
        assert await admin.page.get_by_test_id("membership").inner_text() == "active"
        admin.answer = True
        await admin.page.get_by_role("button", name="Freeze").click()
        await admin.page.get_by_role("button", name="Unfreeze").wait_for()
        assert "frozen" in await admin.page.get_by_test_id("membership").inner_text()
        assert await scalar(db, select(customers.c.frozen_since).where(customers.c.customer_id == "ann")) == now

        # A frozen membership cannot gift; unfrozen, it can.
        await _gift(admin, "bo", 3)
        assert "frozen" in await admin.flash()
        await admin.page.get_by_role("button", name="Unfreeze").click()
        await admin.page.get_by_role("button", name="Freeze").wait_for()
        await _gift(admin, "bo", 3)
        assert "Gave 3 credits to bo" in await admin.flash()
        assert await admin.page.get_by_test_id("balance").inner_text() == "18"
        assert [(e.kind, e.credits) for e in await entries_of(db, "bo")] == [("gifted", 3)]
        assert any("Freeze" in d for d in admin.dialogs) and any("Give" in d for d in admin.dialogs)
        assert "gift sent" in await admin.page.get_by_test_id("ledger").locator("tbody tr").first.inner_text()
        await admin.screenshot_and_narrow("customer")
        await admin.open("/admin/customers?q=a")
        await admin.screenshot_and_narrow("customers")


async def _count(db, customer_id: str, expected: int) -> bool:
    return len(await entries_of(db, customer_id)) >= expected


async def _gift(admin: Console, to: str, credits: int) -> None:
    await admin.page.get_by_label("To customer id").fill(to)
    await admin.page.get_by_label("Credits", exact=True).fill(str(credits))
    await admin.page.get_by_role("button", name="Gift").click()
    await admin.page.get_by_test_id("flash").wait_for()


# ---------------------------------------------------------------- Referrals


async def test_a_flagged_referral_approved_in_the_page_is_paid_on_the_next_friday(
    db, pg_url, redis_url, stripe_env, fake_stripe, start_workers, tmp_path
):
    workers_env = {**stripe_env, "PAYOUT_MINIMUM_CENTS": "100", "REFERRAL_VELOCITY_LIMIT": "3"}
    async with console_for(
        pg_url,
        redis_url,
        workers_env,
        start_workers,
        tmp_path,
        at(10, 2),
        payout_minimum_cents=100,
        referral_velocity_limit=3,
    ) as admin:
        code = await referral_cases.register_referrer(
            SqlUnitOfWork(db),
            ReferrerDetails(
                "partner-vic",
                ReferrerKind.PARTNER,
                name="Vic",
                payout_method="stripe_connect",
                stripe_account_id="acct_vic123",
            ),
        )
        # Velocity: the fourth referral of a code within 24 hours is flagged.
        for n in range(1, 5):
            customer = f"v{n}"
            admin.publisher.publish(
                CustomerSignedUp(
                    event_id=f"signup-{customer}",
                    occurred_at=at(10, 1, 8 + n),
                    customer_id=customer,
                    email=f"{customer}@{customer}.example.com",
                    referral_code=code,
                )
            )
        await eventually(lambda: _referrals(db, 4), timeout=60, message="four referrals")
        for n in range(1, 5):
            admin.publisher.publish(
                PaymentSucceeded(
                    event_id=f"paid-v{n}",
                    occurred_at=at(10, 1, 14),
                    customer_id=f"v{n}",
                    payment_id=f"pay-v{n}",
                    credits=10,
                    amount_cents=4900,
                    currency="USD",
                )
            )
        await eventually(lambda: _referral_status(db, "v4", "flagged"), timeout=60, message="v4 to be flagged")

        await admin.open("/admin/referrals")
        await admin.page.get_by_label("Status").select_option("flagged")
        await admin.page.get_by_role("button", name="Show").click()
        row = admin.page.locator("tr[data-referral]")
        assert await row.count() == 1
        assert "velocity: 4 referrals within 24 h" in await row.inner_text()
        await admin.screenshot_and_narrow("referrals")
        await row.get_by_role("button", name="Approve").click()
        assert "approved" in await admin.flash()
        assert await row.count() == 0  # no longer flagged
        assert await _referral_status(db, "v4", "pending")

        # The hold runs its course; the next Friday's run pays all four, v4 included, by Stripe Connect.
        run = await pay_referrals_as_of(workers_env, admin.workers, at(10, 16, 14))
        assert (run["payouts_created"], run["sent"]) == (1, {"paid": 1})
    assert await _referral_status(db, "v4", "paid")
    [transfer] = fake_stripe.transfers
    assert (transfer["amount"], transfer["destination"]) == (4 * 5000, "acct_vic123")


async def _referrals(db, expected: int) -> bool:
    async with db.connect() as connection:
        return len((await connection.execute(select(referrals.c.id))).all()) >= expected


async def _referral_status(db, customer_id: str, status: str) -> bool:
    return await scalar(db, select(referrals.c.status).where(referrals.c.referred_customer_id == customer_id)) == status


# ---------------------------------------------------------------- Payouts


async def test_a_payout_reference_recorded_in_the_page_marks_it_paid(
    db, pg_url, redis_url, service_env, start_workers, tmp_path
):
    # No Stripe key: the Stripe Connect payee's payout fails, and the page shows why.
    workers_env = {**service_env, "PAYOUT_MINIMUM_CENTS": "100"}
    async with console_for(
        pg_url, redis_url, workers_env, start_workers, tmp_path, at(10, 16, 15), payout_minimum_cents=100
    ) as admin:
        codes = {}
        for referrer, method, extra in (
            ("emp-jo", "manual", {"payout_address": "jo@bank.example"}),
            ("partner-zed", "stripe_connect", {"stripe_account_id": "acct_zed123"}),
        ):
            kind = ReferrerKind.EMPLOYEE if method == "manual" else ReferrerKind.PARTNER
            details = ReferrerDetails(
                referrer, kind, name=referrer.split("-")[1].title(), payout_method=method, **extra
            )
            codes[referrer] = await referral_cases.register_referrer(SqlUnitOfWork(db), details)
        for customer, referrer in (("r-jo", "emp-jo"), ("r-zed", "partner-zed")):
            admin.publisher.publish(
                CustomerSignedUp(
                    event_id=f"signup-{customer}",
                    occurred_at=at(10, 1, 9),
                    customer_id=customer,
                    email=f"{customer}@{customer}.example.com",
                    referral_code=codes[referrer],
                )
            )
        await eventually(lambda: _referrals(db, 2), timeout=60, message="two referrals")
        for customer in ("r-jo", "r-zed"):
            admin.publisher.publish(
                PaymentSucceeded(
                    event_id=f"paid-{customer}",
                    occurred_at=at(10, 1, 14),
                    customer_id=customer,
                    payment_id=f"pay-{customer}",
                    credits=10,
                    amount_cents=4900,
                    currency="USD",
                )
            )
        await eventually(
            lambda: _referral_status(db, "r-zed", "pending"), timeout=60, message="the referrals to qualify"
        )
        run = await pay_referrals_as_of(workers_env, admin.workers, at(10, 16, 14))
        assert (run["payouts_created"], run["sent"]) == (2, {"exported": 1})

        await admin.open("/admin/payouts")
        failed = admin.page.get_by_test_id("failed-payouts")
        assert "no stripe_connect gateway is configured" in await failed.inner_text()
        async with admin.page.expect_download() as download_info:
            await admin.page.get_by_role("link", name="Download the manual gateway's CSV").click()
        [line] = list(csv.DictReader(io.StringIO((await (await download_info.value).path()).read_text())))
        assert (line["payee_id"], line["payout_address"], line["period"], line["amount_cents"], line["status"]) == (
            "emp-jo",
            "jo@bank.example",
            "week-2026-10-16",
            "1000",
            "exported",
        )

        await admin.page.get_by_label("Period").select_option("week-2026-10-16")
        await admin.page.get_by_label("Status").select_option("exported")
        await admin.page.get_by_role("button", name="Show").click()
        row = admin.page.locator(f"tr[data-payout='{line['id']}']")
        await row.get_by_label("External reference").fill("bank-transfer-0001")
        await admin.screenshot_and_narrow("payouts")
        await row.get_by_role("button", name="Record paid").click()
        assert f"Payout {line['id']} recorded as paid" in await admin.flash()
        async with db.connect() as connection:
            paid = (await connection.execute(select(payouts).where(payouts.c.id == int(line["id"])))).one()
        assert (paid.status, paid.external_reference, paid.paid_at) == ("paid", "bank-transfer-0001", at(10, 16, 15))
        assert await _referral_status(db, "r-jo", "paid")


# ---------------------------------------------------------------- Payments


async def test_payments_show_dunning_and_a_parked_event_linked_in_the_page_is_relayed(
    db, pg_url, redis_url, service_env, start_workers, tmp_path
):
    now = datetime.now(UTC).replace(microsecond=0)
    settings = {"stripe_webhook_secrets": WEBHOOK_SECRET, "stripe_plan_credits": json.dumps({"price_basic": 10})}
    async with console_for(pg_url, redis_url, service_env, start_workers, tmp_path, now, **settings) as admin:
        admin.publisher.publish(
            PaymentFailed(
                event_id="failed-cara",
                occurred_at=now - timedelta(days=2),
                customer_id="cara",
                invoice_id="in_cara",
                decline_code="insufficient_funds",
                failure_message="Your card has insufficient funds.",
            )
        )
        # Stripe pays an invoice of a Stripe customer we cannot place yet: parked for review.
        body, headers = signed(stripe_event("invoice.paid", mark_paid(invoice("in_dee", "cus_dee"))), WEBHOOK_SECRET)
        async with httpx.AsyncClient(base_url=admin.base_url) as http:
            receipt = await http.post("/webhooks/stripe", content=body, headers=headers)
        assert receipt.json()["outcome"] == "parked", receipt.text
        await eventually(lambda: _dunning_shown(admin), timeout=60, message="the failed invoice in the dunning report")

        await admin.open("/admin/payments")
        dunning = await admin.page.get_by_test_id("dunning").inner_text()
        assert "in_cara" in dunning and "retrying" in dunning and "insufficient funds" in dunning
        assert "cus_dee" in await admin.page.get_by_test_id("parked").inner_text()
        await admin.page.get_by_label("Our customer id for cus_dee").fill("dee")
        await admin.screenshot_and_narrow("payments")
        await admin.page.get_by_role("button", name="Link and relay").click()
        assert "1 parked event(s) relayed" in await admin.flash()
        assert "Nothing parked" in await admin.page.get_by_test_id("parked").inner_text()
        # The relayed payment goes through the workers: dee has the plan's credits.
        await eventually(lambda: _balance(db, "dee", 10), timeout=60, message="dee's credits from the relayed payment")


async def _dunning_shown(admin: Console) -> bool:
    await admin.page.goto(admin.base_url + "/admin/payments")
    return "in_cara" in await admin.page.get_by_test_id("dunning").inner_text()


async def _balance(db, customer_id: str, expected: int) -> bool:
    return await scalar(db, select(customers.c.balance).where(customers.c.customer_id == customer_id)) == expected


# ---------------------------------------------------------------- Analytics


async def test_analytics_chart_and_table_agree_with_the_ledger(
    db, pg_url, redis_url, service_env, start_workers, tmp_path
):
    now = datetime.now(UTC).replace(microsecond=0)
    first = (now.replace(day=1) - timedelta(days=430)).replace(day=15, hour=12, minute=0, second=0)
    async with console_for(pg_url, redis_url, service_env, start_workers, tmp_path, now) as admin:
        events = [
            PaymentSucceeded(event_id="pay-old", occurred_at=first, customer_id="old", payment_id="in-old", credits=6)
        ]
        for n in range(6):
            moment = first + timedelta(days=62 * n + 20)
            events.append(
                PaymentSucceeded(
                    event_id=f"pay-{n}", occurred_at=moment, customer_id=f"c{n}", payment_id=f"in-{n}", credits=8 + n
                )
            )
            events.append(
                JobCompleted(
                    event_id=f"job-{n}",
                    occurred_at=moment + timedelta(days=25),
                    customer_id=f"c{n}",
                    job_id=f"job-{n}",
                    credits=3,
                )
            )
        # "old" books nothing until after its credits expired: the expiry is written then.
        events.append(
            JobCompleted(
                event_id="job-old", occurred_at=now - timedelta(days=1), customer_id="old", job_id="job-old", credits=1
            )
        )
        for event in events:
            admin.publisher.publish(event)
        await eventually(lambda: _entries_total(db, 1 + 12 + 2), timeout=60, message="every event applied")

        since = first.strftime("%Y-%m")
        await admin.open(f"/admin/analytics?since={since}")
        async with httpx.AsyncClient(base_url=admin.base_url) as http:
            expected = (
                await http.get(
                    "/api/admin/credits/analytics",
                    params={"since": first.replace(day=1, hour=0).isoformat()},
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                )
            ).json()
        rows = [
            [cell.strip() for cell in (await row.inner_text()).split("\t")]
            for row in await admin.page.get_by_test_id("months").locator("tbody tr").all()
        ]
        assert [[r[0], int(r[1]), int(r[2]), int(r[3]), int(r[6])] for r in rows] == [
            [m["month"], m["issued"], m["used"], m["expired"], m["outstanding"]] for m in expected["months"]
        ]
        assert expected["totals"]["expired"] == 6 and expected["breakage_rate"] is not None
        assert await admin.page.get_by_test_id("breakage").inner_text() == f"{expected['breakage_rate']:.1%}"
        chart = admin.page.get_by_test_id("chart").locator("svg")
        # Every month from the first to the last is drawn, those with no entries too.
        first_month, last_month = expected["months"][0]["month"], expected["months"][-1]["month"]
        span = (int(last_month[:4]) - int(first_month[:4])) * 12 + int(last_month[5:]) - int(first_month[5:]) + 1
        assert await chart.locator("rect").count() == 3 * span and await chart.locator("circle").count() == span
        titles = await chart.evaluate("svg => Array.from(svg.querySelectorAll('circle title'), t => t.textContent)")
        assert {f"{m['month']} outstanding: {m['outstanding']}" for m in expected["months"]} <= set(titles)
        upcoming = await admin.page.get_by_test_id("upcoming").inner_text()
        assert all(
            month in upcoming for month, _ in [(u["month"], u["credits"]) for u in expected["upcoming_expirations"]]
        )
        await admin.screenshot_and_narrow("analytics")


async def _entries_total(db, expected: int) -> bool:
    async with db.connect() as connection:
        return (
            len((await connection.execute(select(ledger_entries.c.id).where(ledger_entries.c.kind != "held"))).all())
            >= expected
        )


# ---------------------------------------------------------------- Retention, with the others' navigation


async def test_the_navigation_fits_768_works_by_keyboard_and_its_bubble_is_live_on_every_page(
    db, pg_url, redis_url, service_env, start_workers, tmp_path
):
    now = datetime.now(UTC).replace(microsecond=0)
    async with console_for(pg_url, redis_url, service_env, start_workers, tmp_path, now) as admin:
        # A customer out of credits for 13½ days: on the line in half a day, with no event.
        # One after the other: applied the other way round, the job would overdraw and the payment
        # would end the depletion at its own time, and "almost" would never cross the line.
        admin.publisher.publish(
            PaymentSucceeded(
                event_id="pay-almost",
                occurred_at=now - timedelta(days=40),
                customer_id="almost",
                payment_id="in-almost",
                credits=1,
            )
        )
        await eventually(lambda: _count(db, "almost", 1), timeout=60, message="almost's payment")
        admin.publisher.publish(
            JobCompleted(
                event_id="job-almost",
                occurred_at=now - timedelta(days=13, hours=12),
                customer_id="almost",
                job_id="j",
                credits=1,
            )
        )
        await eventually(lambda: _count(db, "almost", 2), timeout=60, message="almost's entries")
        await admin.open("/admin/analytics")
        await admin.page.evaluate("window.__noReload = 'still here'")
        assert await admin.page.get_by_test_id("at-risk-bubble").inner_text() == "0"
        admin.clock.move_to(now + timedelta(hours=12, minutes=1))
        await admin.page.wait_for_function(
            "() => document.getElementById('bubble').textContent === '1'", timeout=15_000
        )
        assert await admin.page.evaluate("window.__noReload") == "still here"

        await admin.open("/admin")
        await admin.page.get_by_role("link", name="Customers").click()
        await admin.page.wait_for_url(admin.base_url + "/admin/customers")
        # By keyboard alone: the skip link first, then into the search, Enter to find.
        await admin.page.keyboard.press("Tab")
        assert await admin.page.evaluate("document.activeElement.textContent") == "Skip to content"
        for _ in range(12):
            await admin.page.keyboard.press("Tab")
            if await admin.page.evaluate("document.activeElement.id") == "q":
                break
        await admin.page.keyboard.type("nobody-here")
        await admin.page.keyboard.press("Enter")
        await admin.page.wait_for_url("**/admin/customers?q=nobody-here")
        assert "No customer has that id" in await admin.page.inner_text("main")
        await admin.page.set_viewport_size({"width": 768, "height": 900})
        for path in (
            "/admin",
            "/admin/customers",
            "/admin/referrals",
            "/admin/payouts",
            "/admin/payments",
            "/admin/analytics",
        ):
            await admin.open(path)
            widths = await admin.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert widths[0] <= widths[1], (path, widths)
