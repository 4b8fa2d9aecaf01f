"""The admin console's pages and forms over HTTP (api/console/), without a browser.

In-process over httpx's ASGI transport against the real PostgreSQL test database (the
`serving` helper of the retention page's tests). The browser tests
(test_admin_console_browser.py) drive the same pages in Chromium; this file pins the rules a
browser does not show: sign-in first, same-origin forms only, one application per form key,
no inline script, the navigation bar on every page.
"""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from infra.db.tables import customers, ledger_entries
from tests.support.console import NOW, depleted, serving

PAGES = (
    "/admin/customers",
    "/admin/customers/ann",
    "/admin/referrals",
    "/admin/payouts",
    "/admin/payments",
    "/admin/analytics",
)
NAV = ["Retention", "Customers", "Referrals", "Payouts", "Payments", "Analytics"]
ORIGIN = {"Origin": "http://credits.test"}


@pytest.fixture
async def console(db, pg_url):
    await depleted(db, "ann", NOW.replace(month=1), credits=3)
    async with serving(db, pg_url) as page:
        yield page


def nav_labels(html: str) -> list[str]:
    nav = re.search(r'<nav class="top".*?</nav>', html, re.S).group(0)
    # Each link's own text, without the bubble's count.
    return [
        re.sub(r"<span.*?</span>", "", label, flags=re.S).strip()
        for label in re.findall(r"<li><a [^>]*>(.*?)</a></li>", nav, re.S)
    ]


async def test_every_page_wants_a_session_then_has_the_navigation_and_no_inline_script(console):
    for path in PAGES:
        response = await console.http.get(path)
        assert response.status_code == 303 and response.headers["location"] == "/admin/login", path
    await console.sign_in()
    for path in (*PAGES, "/admin"):
        response = await console.http.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        assert nav_labels(response.text) == NAV, path
        assert 'data-testid="at-risk-bubble"' in response.text
        if path != "/admin":  # the retention page's own script is another change's to move
            assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", response.text) == [], path
            assert " style=" not in response.text and "<style" not in response.text, path
            assert "http://" not in response.text.replace("http://www.w3.org/2000/svg", ""), path


async def test_forms_are_same_origin_and_a_key_applies_once(console, db):
    await console.sign_in()
    body = {"idempotency_key": "k-0123456789", "credits": "5", "reason": "goodwill"}
    unsigned = console.http.build_request("POST", "/admin/customers/ann/adjust", data=body)
    del unsigned.headers["Origin"]  # the client sends one by default, as a browser does
    refused = [
        await console.http.send(unsigned),  # neither Origin nor Referer
        await console.http.post("/admin/customers/ann/adjust", data=body, headers={"Origin": "https://evil.example"}),
    ]
    assert [r.status_code for r in refused] == [403, 403]
    too_big = await console.http.post(
        "/admin/customers/ann/adjust", data={**body, "reason": "x" * 20_000}, headers=ORIGIN
    )
    assert too_big.status_code == 413
    as_json = await console.http.post("/admin/customers/ann/adjust", json=body, headers=ORIGIN)
    assert as_json.status_code == 415

    first = await console.http.post("/admin/customers/ann/adjust", data=body, headers=ORIGIN)
    again = await console.http.post("/admin/customers/ann/adjust", data=body, headers=ORIGIN)
    assert first.status_code == again.status_code == 303 and first.headers["location"] == "/admin/customers/ann"
    page = await console.http.get("/admin/customers/ann")
    assert "Already done" in page.text  # the second send's answer, shown once
    async with db.connect() as connection:
        adjusted = (
            (await connection.execute(select(ledger_entries.c.credits).where(ledger_entries.c.kind == "adjusted")))
            .scalars()
            .all()
        )
        balance = (
            await connection.execute(select(customers.c.balance).where(customers.c.customer_id == "ann"))
        ).scalar_one()
    assert adjusted == [5] and balance == 5

    bad = await console.http.post(
        "/admin/customers/ann/adjust", data={**body, "idempotency_key": "k-other-123", "credits": "x"}, headers=ORIGIN
    )
    assert bad.status_code == 303
    assert "Not adjusted" in (await console.http.get("/admin/customers/ann")).text


async def test_a_gift_to_nobody_or_beyond_what_is_available_is_refused_with_a_message(console, db):
    await console.sign_in()
    for data, said in (
        ({"to_customer_id": "nobody", "credits": "1"}, "does not exist"),
        ({"to_customer_id": "ann", "credits": "1"}, "themselves"),
    ):
        response = await console.http.post(
            "/admin/customers/ann/gift",
            data={"idempotency_key": "gift-" + data["to_customer_id"] + "-1234", **data},
            headers=ORIGIN,
        )
        assert response.status_code == 303
        assert said in (await console.http.get("/admin/customers/ann")).text


async def test_hostile_input_is_a_clear_4xx_never_a_500(console):
    await console.sign_in()
    for path, params in (
        ("/admin/customers", {"q": "a\x00b"}),
        ("/admin/customers", {"q": "x" * 400}),
        ("/admin/customers/ann", {"cursor": "not-a-cursor"}),
        ("/admin/customers/%ED%A0%80", {}),
        ("/admin/referrals", {"status": "nope"}),
        ("/admin/referrals", {"offset": "-1"}),
        ("/admin/payouts", {"period": "week'; drop"}),
        ("/admin/payments", {"status": "nope"}),
        ("/admin/analytics", {"since": "2025-13"}),
        ("/admin/assets/../app.py", {}),
    ):
        response = await console.http.get(path, params=params)
        # Refused, or (an undecodable id is no customer) sent back to the search with a message.
        assert 400 <= response.status_code < 500 or response.headers.get("location", "").startswith(
            "/admin/customers?q="
        ), (path, params, response.status_code)
    for path, data in (
        ("/admin/customers/ann/gift", {"idempotency_key": "short", "to_customer_id": "bo", "credits": "1"}),
        ("/admin/customers/ann/note", {"note": "a\x00b"}),
        ("/admin/referrals/99/approve", {"status": ""}),
        ("/admin/payouts/99/reference", {"external_reference": "ref-1"}),
        (
            "/admin/payments/link",
            {"stripe_customer_id": "cus_1", "customer_id": "ann"},
        ),  # no Redis here: said, not done
    ):
        response = await console.http.post(path, data=data, headers=ORIGIN)
        assert response.status_code == 303, (path, response.status_code, response.text[:200])
        page = await console.http.get(response.headers["location"])
        assert 'class="flash error"' in page.text, (path, page.text[:500])
