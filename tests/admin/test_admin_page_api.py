"""The retention admin page's HTTP surface (api/admin_page.py), without a browser.

The app runs in-process (its lifespan run) over httpx's ASGI transport against the real
PostgreSQL test database: sign-in by the admin token posted in a form, the signed session
cookie (HttpOnly, SameSite=Strict), the JSON-only data calls, the live count by server-sent
events, sign-out. The browser test (test_admin_page_browser.py) drives the same page in
Chromium; this file pins the rules a browser does not show.

Every response any test here receives is checked for the admin token: it must never appear
in a header (a cookie, a Location) or a URL.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from http.cookies import SimpleCookie

import pytest
from sqlalchemy import select

from api import admin_page
from domain import CreditPolicy
from infra.db.tables import customers, ledger_entries
from messages import PaymentSucceeded
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support.console import (
    ADMIN_TOKEN,
    COOKIE,
    JSON,
    NOW,
    depleted,
    notes,
    serving,
    set_cookie,
)
from tests.support.delivery import ledger_snapshot


@pytest.fixture
async def page(db, pg_url):
    async with serving(db, pg_url) as page:
        yield page


# ---------------------------------------------------------------- signing in


async def test_the_page_sends_a_visitor_without_a_session_to_sign_in(page):
    response = await page.http.get("/admin")
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/login"
    assert set_cookie(response) == []

    form = await page.http.get("/admin/login")
    assert form.status_code == 200
    assert form.headers["content-type"].startswith("text/html")
    # The token goes in a form body (POST), never in a URL.
    assert '<form method="post" action="/admin/login">' in form.text
    assert 'name="token" type="password"' in form.text


async def test_a_wrong_token_is_refused_with_401_and_no_cookie(page):
    for body in (
        {"token": "not-the-token"},
        {"token": ""},
        {"token": ADMIN_TOKEN[:-1]},  # a prefix
        {"token": ADMIN_TOKEN + "x"},  # longer
        {"token": ADMIN_TOKEN.upper()},
        {"other": ADMIN_TOKEN},  # another field
        {},
    ):
        response = await page.http.post("/admin/login", data=body)
        assert response.status_code == 401, (body, response.text)
        assert "That token is not right." in response.text
        assert ADMIN_TOKEN not in response.text
        assert set_cookie(response) == []
        assert COOKIE not in page.http.cookies
    # Still signed out.
    assert (await page.http.get("/admin")).status_code == 303
    assert (await page.http.get("/admin/data/at-risk")).status_code == 401


async def test_the_token_in_the_url_instead_of_the_form_does_not_sign_in(page):
    response = await page.http.post("/admin/login", params={"token": ADMIN_TOKEN})
    assert response.status_code == 401
    assert set_cookie(response) == []
    # (The serving check would fail on the URL itself: this request is the one exception.)
    page.responses.remove(response)


async def test_the_right_token_sets_a_strict_httponly_session_cookie_and_redirects_to_the_page(page):
    response = await page.sign_in()
    assert response.headers["location"] == "/admin"
    [cookie_header] = set_cookie(response)
    attributes = {
        part.strip().split("=", 1)[0].lower(): (part.strip().split("=", 1) + [""])[1]
        for part in cookie_header.split(";")[1:]
    }
    assert cookie_header.startswith(f"{COOKIE}=")
    assert "httponly" in attributes
    assert attributes["samesite"].lower() == "strict"
    assert attributes["path"] == "/"
    assert attributes["max-age"] == str(8 * 3600)
    assert "secure" not in attributes  # ADMIN_COOKIE_SECURE=false in this test
    # The session holds no token: it is signed with a key derived from it.
    value = SimpleCookie(cookie_header)[COOKIE].value
    assert ADMIN_TOKEN not in value

    shown = await page.http.get("/admin")
    assert shown.status_code == 200, shown.text
    assert shown.headers["content-type"].startswith("text/html")
    assert ADMIN_TOKEN not in shown.text
    assert (await page.http.get("/admin/data/at-risk")).status_code == 200
    # Signing in again while signed in is harmless.
    await page.sign_in()
    assert (await page.http.get("/admin")).status_code == 200


async def test_the_session_cookie_is_secure_by_default(db, pg_url):
    async with serving(db, pg_url, admin_cookie_secure=True) as page:
        response = await page.http.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert response.status_code == 303
        [cookie_header] = set_cookie(response)
        assert "secure" in [part.strip().lower() for part in cookie_header.split(";")]


async def test_a_forged_or_foreign_session_cookie_is_not_a_session(db, pg_url, page):
    page.http.cookies.set(COOKIE, "eyJhZG1pbiI6IHRydWV9.forged.signature", domain="credits.test")
    assert (await page.http.get("/admin")).status_code == 303
    assert (await page.http.get("/admin/data/at-risk")).status_code == 401

    # A session signed under another admin token (the token was rotated): signed out.
    async with serving(db, pg_url, admin_api_token="another-admin-token-0123456789abcdef") as other:
        await other.http.post("/admin/login", data={"token": "another-admin-token-0123456789abcdef"})
        foreign = other.http.cookies[COOKIE]
    page.http.cookies.clear()
    page.http.cookies.set(COOKIE, foreign, domain="credits.test")
    assert (await page.http.get("/admin/data/at-risk")).status_code == 401


async def test_the_admin_api_bearer_token_is_not_a_page_session(page):
    bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await page.http.get("/admin/data/at-risk", headers=bearer)).status_code == 401
    assert (await page.http.get("/admin", headers=bearer)).status_code == 303


async def test_a_login_body_over_4_kb_is_refused_with_413(page):
    padding = "x" * 4_100
    declared = await page.http.post("/admin/login", data={"token": ADMIN_TOKEN, "pad": padding})
    assert declared.status_code == 413, declared.text
    assert set_cookie(declared) == []

    # Without a Content-Length (chunked): counted as it arrives, refused all the same.
    async def chunks():
        yield f"token={ADMIN_TOKEN}&pad=".encode()
        for _ in range(10):
            yield b"y" * 1_000

    streamed = await page.http.post(
        "/admin/login", content=chunks(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert "content-length" not in streamed.request.headers
    assert streamed.status_code == 413, streamed.text
    assert set_cookie(streamed) == []
    assert (await page.http.get("/admin")).status_code == 303

    # A Content-Length that lies low does not get a big body through either.
    async def big():
        yield b"token=" + b"z" * 5_000

    lying = await page.http.post(
        "/admin/login",
        content=big(),
        headers={"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "10"},
    )
    assert lying.status_code in (400, 413), lying.text
    assert set_cookie(lying) == []

    # Exactly 4 KB is read (and judged on the token).
    body = f"token=wrong&pad={'p' * (4_096 - len('token=wrong&pad='))}"
    assert len(body) == 4_096
    at_limit = await page.http.post(
        "/admin/login", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert at_limit.status_code == 401


# ---------------------------------------------------------------- data calls


async def test_data_calls_and_the_live_stream_need_a_session(db, page):
    await depleted(db, "cust-nosession", NOW - timedelta(days=20))
    before = await ledger_snapshot(db)
    for method, path, body in (
        ("GET", "/admin/data/at-risk", None),
        ("GET", "/admin/live", None),
        ("POST", "/admin/data/customers/cust-nosession/note", {"note": "x"}),
        (
            "POST",
            "/admin/data/customers/cust-nosession/adjustments",
            {"credits": 5, "reason": "x", "idempotency_key": "nosession-0001"},
        ),
    ):
        response = await page.http.request(method, path, json=body)
        assert response.status_code == 401, (path, response.text)
        assert "sign in" in response.json()["detail"]
    assert await notes(db) == {}
    assert await ledger_snapshot(db) == before


async def test_the_at_risk_list_for_a_signed_in_admin(db, page):
    await depleted(db, "cust-long", NOW - timedelta(days=40))
    await depleted(db, "cust-lapsed", NOW - timedelta(days=20))
    await depleted(db, "cust-recent", NOW - timedelta(days=2))
    await page.sign_in()
    found = (await page.http.get("/admin/data/at-risk")).json()
    assert (found["days"], found["count"]) == (14, 2)
    assert [(c["customer_id"], c["days_depleted"]) for c in found["customers"]] == [
        ("cust-long", 40),
        ("cust-lapsed", 20),
    ]


async def test_note_and_adjustment_accept_only_json_415_otherwise(db, page):
    """A cross-site form can send only form or text bodies: a JSON-only endpoint is out of its reach."""
    await depleted(db, "cust-ct", NOW - timedelta(days=20))
    await page.sign_in()
    before = await ledger_snapshot(db)
    for content_type in (
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
        "application/jsonp",
        "text/json",
    ):
        headers = {"Content-Type": content_type} if content_type else {}
        for path, body in (
            ("/admin/data/customers/cust-ct/note", {"note": "called"}),
            (
                "/admin/data/customers/cust-ct/adjustments",
                {"credits": 5, "reason": "goodwill", "idempotency_key": "content-type-0001"},
            ),
        ):
            response = await page.http.post(path, content=json.dumps(body).encode(), headers=headers)
            assert response.status_code == 415, (path, content_type, response.text)
    assert await notes(db) == {}
    assert await ledger_snapshot(db) == before

    # JSON (with a charset parameter too) is taken.
    saved = await page.http.post(
        "/admin/data/customers/cust-ct/note",
        content=json.dumps({"note": "called"}).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert saved.status_code == 200, saved.text
    assert await notes(db) == {"cust-ct": "called"}


async def test_a_note_is_saved_the_latest_stands_and_an_unknown_customer_is_404(db, page):
    await depleted(db, "cust-note", NOW - timedelta(days=20))
    await page.sign_in()
    first = await page.http.post("/admin/data/customers/cust-note/note", json={"note": "called on Monday"})
    assert first.json() == {"customer_id": "cust-note", "note": "called on Monday"}
    page.clock.move_to(NOW + timedelta(hours=1))
    assert (
        await page.http.post("/admin/data/customers/cust-note/note", json={"note": "renewing next week ✓"})
    ).status_code == 200
    assert await notes(db) == {"cust-note": "renewing next week ✓"}
    listed = (await page.http.get("/admin/data/at-risk")).json()["customers"]
    assert [(c["customer_id"], c["note"]) for c in listed] == [("cust-note", "renewing next week ✓")]

    assert (await page.http.post("/admin/data/customers/nobody/note", json={"note": "x"})).status_code == 404
    for body in ({"note": "x" * 2001}, {"note": "nul\x00byte"}, {"note": "x", "extra": 1}, {}):
        assert (await page.http.post("/admin/data/customers/cust-note/note", json=body)).status_code == 422, body
    assert await notes(db) == {"cust-note": "renewing next week ✓"}


async def test_a_note_with_a_lone_surrogate_is_refused_with_422_not_500(db, page):
    """Valid JSON text, but not Unicode text PostgreSQL can store."""
    await depleted(db, "cust-surrogate", NOW - timedelta(days=20))
    await page.sign_in()
    for raw in (
        b'{"note": "\\ud800"}',
        b'{"note": "before \\udfff after"}',
        b'{"note": "\\udc00\\ud800"}',
    ):  # lone high, lone low, a pair reversed
        response = await page.http.post("/admin/data/customers/cust-surrogate/note", content=raw, headers=JSON)
        assert response.status_code == 422, (raw, response.text)
        assert "Unicode" in response.json()["detail"]
    assert await notes(db) == {}
    # The app is fine afterwards, and a real pair (an emoji) is ordinary text.
    emoji = await page.http.post(
        "/admin/data/customers/cust-surrogate/note", content=b'{"note": "\\ud83d\\ude00 called"}', headers=JSON
    )
    assert emoji.status_code == 200, emoji.text
    assert await notes(db) == {"cust-surrogate": "\U0001f600 called"}


async def test_an_adjustment_with_a_lone_surrogate_in_its_reason_is_refused_with_422_and_changes_nothing(db, page):
    await depleted(db, "cust-surrogate-adj", NOW - timedelta(days=20))
    await page.sign_in()
    before = await ledger_snapshot(db)
    raw = b'{"credits": 5, "reason": "goodwill \\ud800", "idempotency_key": "surrogate-0001"}'
    response = await page.http.post("/admin/data/customers/cust-surrogate-adj/adjustments", content=raw, headers=JSON)
    assert response.status_code == 422, response.text
    assert await ledger_snapshot(db) == before
    # The same key with a storable reason is a new request, not a duplicate of the refused one.
    fixed = await page.http.post(
        "/admin/data/customers/cust-surrogate-adj/adjustments",
        json={"credits": 5, "reason": "goodwill", "idempotency_key": "surrogate-0001"},
    )
    assert fixed.json()["outcome"] == "applied", fixed.text


# ---------------------------------------------------------------- adjustments from the page


async def test_page_adjustments_require_an_idempotency_key_and_apply_once_per_key(db, page):
    await depleted(db, "cust-adj", NOW - timedelta(days=20))
    await page.sign_in()
    url = "/admin/data/customers/cust-adj/adjustments"
    before = await ledger_snapshot(db)
    for body in (
        {"credits": 5, "reason": "goodwill"},  # no key: the page always sends one
        {"credits": 5, "reason": "goodwill", "idempotency_key": None},
        {"credits": 5, "reason": "goodwill", "idempotency_key": "short"},
        {"credits": 5, "reason": "goodwill", "idempotency_key": "has spaces in it"},
        {"credits": 0, "reason": "nothing", "idempotency_key": "zero-credits-0001"},
        {"credits": 5, "reason": "", "idempotency_key": "empty-reason-0001"},
        {"credits": 5, "reason": "x", "idempotency_key": "admin-field-0001", "admin": "mallory"},
        {"credits": 2_000_000, "reason": "too big", "idempotency_key": "too-big-00001"},
    ):
        response = await page.http.post(url, json=body)
        assert response.status_code == 422, (body, response.text)
    assert await ledger_snapshot(db) == before

    body = {"credits": 6, "reason": "sorry for the outage", "idempotency_key": "page-form-9c1e44"}
    first = await page.http.post(url, json=body)
    assert first.json() == {"customer_id": "cust-adj", "credits": 6, "outcome": "applied"}
    # A double click (a later moment, the same form): once.
    page.clock.move_to(NOW + timedelta(seconds=2))
    second = await page.http.post(url, json=body)
    assert second.status_code == 200
    assert second.json() == {"customer_id": "cust-adj", "credits": 6, "outcome": "duplicate"}
    # The next form has a new key.
    third = await page.http.post(url, json={**body, "credits": -1, "idempotency_key": "page-form-9c1e45"})
    assert third.json()["outcome"] == "applied"

    async with db.connect() as connection:
        adjusted = (
            await connection.execute(
                select(ledger_entries.c.credits, ledger_entries.c.note, ledger_entries.c.event_id)
                .where(ledger_entries.c.customer_id == "cust-adj", ledger_entries.c.kind == "adjusted")
                .order_by(ledger_entries.c.id)
            )
        ).all()
        balance = (
            await connection.execute(select(customers.c.balance).where(customers.c.customer_id == "cust-adj"))
        ).scalar_one()
    assert [(a.credits, a.event_id) for a in adjusted] == [
        (6, "admin-adjustment:page-form-9c1e44"),
        (-1, "admin-adjustment:page-form-9c1e45"),
    ]
    assert "sorry for the outage" in adjusted[0].note and "admin page" in adjusted[0].note
    assert balance == 5

    assert (
        await page.http.post(
            "/admin/data/customers/nobody/adjustments", json={**body, "idempotency_key": "unknown-0001"}
        )
    ).status_code == 404


# ---------------------------------------------------------------- the live count


def events_of(text: str) -> list[tuple[str, str]]:
    """The server-sent events in a stream's text: (event name or comment, data)."""
    found = []
    for block in text.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) if ": " in line else (line, "") for line in block.split("\n"))
        if "event" in fields:
            found.append((fields["event"], fields.get("data", "")))
        elif "retry" in fields:
            found.append(("retry", fields["retry"]))
        else:
            found.append(("comment", block))
    return found


async def test_the_live_stream_sends_the_at_risk_count_and_again_when_it_changes(db, page, monkeypatch):
    """`event: count` at once, then only when the count changes (keep-alives between): here a
    customer crosses the 14-day line with no event, only the clock moving. The stream ends
    after STREAM_SECONDS (shortened here) so the browser reconnects and its session is checked again."""
    monkeypatch.setattr(admin_page, "STREAM_SECONDS", 1.6)
    await depleted(db, "cust-gone", NOW - timedelta(days=30))
    await depleted(db, "cust-almost", NOW - timedelta(days=13, hours=23))  # crosses in an hour
    await depleted(db, "cust-fresh", NOW - timedelta(days=1))
    await page.sign_in()

    async def an_hour_later():
        await asyncio.sleep(0.7)
        page.clock.move_to(NOW + timedelta(hours=1, minutes=1))

    mover = asyncio.create_task(an_hour_later())
    chunks = []
    started = asyncio.get_running_loop().time()
    async with page.http.stream("GET", "/admin/live") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        async for chunk in response.aiter_text():
            chunks.append(chunk)
    elapsed = asyncio.get_running_loop().time() - started
    await mover
    assert 1.5 <= elapsed < 10, elapsed  # it ended by itself, after STREAM_SECONDS
    # (httpx's ASGI transport hands the body over once the app has finished it: one text.)
    text = "".join(chunks)
    assert text.startswith("retry: 2000\n\nevent: count\ndata: ")
    stream = events_of(text)
    assert stream[0] == ("retry", "2000")
    assert stream[1] == ("count", json.dumps({"count": 1}))
    counts = [json.loads(data)["count"] for name, data in stream if name == "count"]
    assert counts == [1, 2], stream
    assert ("comment", ": keep-alive") in stream  # unchanged in between: no count, a keep-alive

    # Signed out: the browser's reconnection is refused.
    await page.http.post("/admin/logout")
    assert (await page.http.get("/admin/live")).status_code == 401


async def test_the_live_count_leaves_out_customers_whose_credits_came_back(db, page, monkeypatch):
    monkeypatch.setattr(admin_page, "STREAM_SECONDS", 0.3)
    await depleted(db, "cust-back", NOW - timedelta(days=30))
    await depleted(db, "cust-out", NOW - timedelta(days=30))
    await handlers.apply_event(
        PaymentSucceeded(
            event_id="pay-back-again",
            occurred_at=NOW - timedelta(days=1),
            customer_id="cust-back",
            payment_id="in-back-again",
            credits=3,
        ),
        SqlUnitOfWork(db),
        CreditPolicy(),
    )
    await page.sign_in()
    async with page.http.stream("GET", "/admin/live") as response:
        text = "".join([chunk async for chunk in response.aiter_text()])
    assert events_of(text)[1] == ("count", json.dumps({"count": 1}))


# ---------------------------------------------------------------- signing out


async def test_signing_out_clears_the_session(db, page):
    await depleted(db, "cust-logout", NOW - timedelta(days=20))
    await page.sign_in()
    assert (await page.http.get("/admin/data/at-risk")).status_code == 200

    response = await page.http.post("/admin/logout")
    assert response.status_code == 303
    assert response.headers["location"] == "/admin/login"
    [cleared] = set_cookie(response)
    assert (
        cleared.startswith(f"{COOKIE}=null")
        or "max-age=0" in cleared.lower()
        or "expires=thu, 01 jan 1970" in cleared.lower()
    ), cleared
    assert COOKIE not in page.http.cookies

    assert (await page.http.get("/admin")).status_code == 303
    assert (await page.http.get("/admin/data/at-risk")).status_code == 401
    assert (await page.http.post("/admin/data/customers/cust-logout/note", json={"note": "x"})).status_code == 401
    assert await notes(db) == {}
    # Signing out when signed out is harmless.
    assert (await page.http.post("/admin/logout")).status_code == 303
