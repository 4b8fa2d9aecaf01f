"""The retention page in a real headless Chromium (Debian's, driven by Playwright).

The app is served over TCP by uvicorn in this process (so the test can move its clock);
events go through the real Publisher, Redis and `dramatiq` worker processes into PostgreSQL.
The bubble must change without a reload: when a customer's credits come back through the
pipeline, and when a customer crosses the 14-day line with no event at all.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from api.app import create_app
from domain import CreditPolicy
from infra.clock import FixedClock
from infra.settings import load_settings
from messages import JobCompleted, PaymentSucceeded, Publisher
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import ROOT, InProcessServer, eventually

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = ROOT / "docs" / "admin-retention.png"


async def depleted(db, customer_id: str, since: datetime, credits: int = 2) -> None:
    """A customer whose credits ran out at ``since``."""
    policy = CreditPolicy()
    await handlers.apply_event(
        PaymentSucceeded(
            event_id=f"pay-{customer_id}",
            occurred_at=since - timedelta(days=30),
            customer_id=customer_id,
            payment_id=f"in-{customer_id}",
            credits=credits,
        ),
        SqlUnitOfWork(db),
        policy,
    )
    await handlers.apply_event(
        JobCompleted(
            event_id=f"job-{customer_id}",
            occurred_at=since,
            customer_id=customer_id,
            job_id=f"job-{customer_id}",
            credits=credits,
        ),
        SqlUnitOfWork(db),
        policy,
    )


async def test_the_bubble_follows_the_pipeline_and_the_clock_without_a_reload(
    db, pg_url, redis_url, start_workers, tmp_path
):
    now = datetime.now(UTC).replace(microsecond=0)
    clock = FixedClock(now)
    await depleted(db, "long-gone", now - timedelta(days=40))
    await depleted(db, "lapsed", now - timedelta(days=20))
    await depleted(db, "almost", now - timedelta(days=13, hours=12))  # crosses the line in 12 hours
    await depleted(db, "recent", now - timedelta(days=2))

    settings = load_settings(
        database_url=pg_url,
        redis_url=redis_url,
        admin_api_token=ADMIN_TOKEN,
        frontend_api_token="front-" + uuid.uuid4().hex,
        admin_cookie_secure=False,  # plain http on loopback in the test
        admin_live_interval_seconds=0.3,
        event_max_age_days=36500,
    )
    start_workers()
    publisher = Publisher.from_url(redis_url)
    async with InProcessServer(create_app(settings, clock=clock)) as server, async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            # The page runs under its Content-Security-Policy (no bypass): anything it blocks is reported here.
            # (Expressions below are passed as functions: Playwright evaluates a bare expression with eval, which the CSP forbids.)
            blocked = []
            page.on(
                "console",
                lambda message: blocked.append(message.text) if "Content Security Policy" in message.text else None,
            )
            # Not signed in: the page sends us to sign in; the token goes in a form, never a URL.
            await page.goto(f"{server.base_url}/admin")
            assert page.url.endswith("/admin/login")
            await page.fill("#token", "not-the-token")
            await page.click("button[type=submit]")
            assert "not right" in await page.inner_text("[role=alert]")
            await page.fill("#token", ADMIN_TOKEN)
            await page.click("button[type=submit]")
            await page.wait_for_url(f"{server.base_url}/admin")
            assert ADMIN_TOKEN not in page.url

            bubble = page.get_by_test_id("at-risk-bubble")
            await page.wait_for_function("() => document.getElementById('bubble').textContent === '2'", timeout=10_000)
            # Styles and script come from our own files (/admin/static): the red bubble is styled.
            assert (
                await page.evaluate("() => getComputedStyle(document.getElementById('bubble')).backgroundColor")
                == "rgb(229, 72, 77)"
            )
            rows = page.locator("#rows tr")
            assert await rows.count() == 2
            assert await rows.nth(0).get_attribute("data-customer") == "long-gone"
            assert "40" in await rows.nth(0).locator("td.days").inner_text()

            # Mark this document: if the page reloaded, the mark would be gone.
            await page.evaluate("window.__noReload = 'still here'")

            # Credits come back through the real pipeline: producer → Redis → worker → PostgreSQL.
            publisher.publish(
                PaymentSucceeded(
                    event_id=f"restore-{uuid.uuid4()}",
                    occurred_at=now,
                    customer_id="lapsed",
                    payment_id="in-restore",
                    credits=4,
                )
            )
            await page.wait_for_function("() => document.getElementById('bubble').textContent === '1'", timeout=30_000)
            assert await page.evaluate("window.__noReload") == "still here"
            await eventually(lambda: _row_count(page, 1), timeout=10, message="the list to drop the restored customer")

            # Half a day later, with no event at all, "almost" has crossed the 14-day line.
            clock.move_to(now + timedelta(hours=12, minutes=1))
            await page.wait_for_function("() => document.getElementById('bubble').textContent === '2'", timeout=10_000)
            assert await page.evaluate("window.__noReload") == "still here"

            # A follow-up note, kept with the customer.
            await eventually(lambda: _row_count(page, 2), timeout=10, message="the list to show the crossed customer")
            first = page.locator("#rows tr[data-customer='long-gone']")
            await first.locator("textarea").fill("Called on Monday: renewing next week")
            await first.get_by_role("button", name="Save note").click()
            await first.get_by_text("saved").wait_for()

            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
            shutil.copyfile(tmp_path / "admin.png", SCREENSHOT)
            assert await bubble.inner_text() == "2"

            # Signing out ends the session on the server: the page's own calls are refused after it.
            await page.get_by_role("button", name="Sign out").click()
            await page.wait_for_url(f"{server.base_url}/admin/login")
            assert await page.evaluate("async () => (await fetch('/admin/data/at-risk')).status") == 401
            assert blocked == []
        finally:
            await browser.close()
            publisher.close()

    async with db.connect() as connection:
        from sqlalchemy import select

        from infra.db.tables import customer_notes

        notes = dict((await connection.execute(select(customer_notes.c.customer_id, customer_notes.c.note))).all())
    assert notes == {"long-gone": "Called on Monday: renewing next week"}
    assert Path(SCREENSHOT).stat().st_size > 10_000


async def _row_count(page, expected: int) -> bool:
    return await page.locator("#rows tr[data-customer]").count() == expected
