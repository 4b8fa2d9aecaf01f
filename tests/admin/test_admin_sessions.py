"""Admin page sessions kept server-side, sign-in limits, the same-origin rule and the security headers.

The app runs in-process against the real PostgreSQL test database (test_admin_page_api.serving).
Session times follow ``app.state.session_clock``, which these tests replace with a clock they
move, so idle and absolute timeouts and the sign-in window are tested without waiting.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import select

from api import admin_page
from api.sign_in_limit import client_bucket
from infra.clock import FixedClock
from infra.db.tables import admin_sessions
from tests.support.console import ADMIN_TOKEN, COOKIE, NOW, depleted, notes, serving

ORIGIN = {"Origin": "http://credits.test"}


def session_clock(page) -> FixedClock:
    clock = FixedClock(datetime.now(UTC))
    page.app.state.session_clock = clock
    return clock


def later(clock: FixedClock, **delta) -> None:
    clock.move_to(clock.now() + timedelta(**delta))


async def status_of(page, path: str) -> int:
    return (await page.http.get(path)).status_code


# ---------------------------------------------------------------- revocation


async def test_after_sign_out_the_old_cookie_opens_nothing(db, pg_url):
    async with serving(db, pg_url) as page:
        await page.sign_in()
        stolen = page.http.cookies[COOKIE]
        assert await status_of(page, "/admin/data/at-risk") == 200
        assert (await page.http.post("/admin/logout")).status_code == 303

        # The cookie as it was before signing out (copied, or a browser that kept it): nothing.
        page.http.cookies.set(COOKIE, stolen, domain="credits.test")
        assert await status_of(page, "/admin/data/at-risk") == 401
        assert await status_of(page, "/admin/live") == 401
        assert await status_of(page, "/admin") == 303
        assert (await page.http.post("/admin/data/customers/anyone/note", json={"note": "x"})).status_code == 401


async def test_an_open_live_stream_ends_when_its_session_is_signed_out(db, pg_url, monkeypatch):
    monkeypatch.setattr(admin_page, "STREAM_SECONDS", 60)
    async with serving(db, pg_url) as page:
        await page.sign_in()
        cookie = page.http.cookies[COOKIE]

        async def sign_out_elsewhere():
            await asyncio.sleep(0.6)
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=page.app), base_url="http://credits.test", headers=ORIGIN
            ) as other:
                other.cookies.set(COOKIE, cookie, domain="credits.test")
                assert (await other.post("/admin/logout")).status_code == 303

        started = asyncio.get_running_loop().time()
        signing_out = asyncio.create_task(sign_out_elsewhere())
        async with page.http.stream("GET", "/admin/live") as response:
            assert response.status_code == 200
            text = "".join([chunk async for chunk in response.aiter_text()])
        await signing_out
        assert asyncio.get_running_loop().time() - started < 10  # not the 60 s the stream would last
        assert text.startswith("retry: 2000")


async def test_a_session_idles_out_and_ends_after_its_absolute_lifetime(db, pg_url):
    async with serving(db, pg_url, admin_session_idle_minutes=30, admin_session_max_hours=8) as page:
        clock = session_clock(page)
        await page.sign_in()
        later(clock, minutes=29)
        assert await status_of(page, "/admin/data/at-risk") == 200  # used: the idle clock restarts
        later(clock, minutes=29)
        assert await status_of(page, "/admin/data/at-risk") == 200
        later(clock, minutes=30)
        assert await status_of(page, "/admin/data/at-risk") == 401
        assert await status_of(page, "/admin/live") == 401

        # Kept busy, a session still ends 8 hours after sign-in.
        await page.sign_in()
        signed_in_at = clock.now()
        while clock.now() + timedelta(minutes=20) < signed_in_at + timedelta(hours=8):
            later(clock, minutes=20)
            assert await status_of(page, "/admin/data/at-risk") == 200
        later(clock, minutes=20)
        assert await status_of(page, "/admin/data/at-risk") == 401


async def test_rotating_the_admin_token_ends_every_session(db, pg_url):
    async with serving(db, pg_url) as page:
        await page.sign_in()
        cookie = page.http.cookies[COOKIE]
    # The web restarted with a new ADMIN_API_TOKEN, over the same database.
    async with serving(db, pg_url, admin_api_token="rotated-admin-token-0123456789abcdef") as rotated:
        rotated.http.cookies.set(COOKIE, cookie, domain="credits.test")
        assert await status_of(rotated, "/admin/data/at-risk") == 401
        assert await status_of(rotated, "/admin/live") == 401
        assert await status_of(rotated, "/admin") == 303
        # The old token does not sign in any more; the new one does.
        assert (await rotated.http.post("/admin/login", data={"token": ADMIN_TOKEN})).status_code == 401
        assert (
            await rotated.http.post("/admin/login", data={"token": "rotated-admin-token-0123456789abcdef"})
        ).status_code == 303
        assert await status_of(rotated, "/admin/data/at-risk") == 200


async def test_the_cookie_and_the_table_hold_neither_the_token_nor_a_usable_id(db, pg_url):
    async with serving(db, pg_url) as page:
        await page.sign_in()
        cookie = page.http.cookies[COOKIE]
    assert re.fullmatch(r"[A-Za-z0-9_\-]{43}", cookie)  # 32 random bytes, nothing else
    async with db.connect() as connection:
        rows = (await connection.execute(select(admin_sessions))).mappings().all()
    assert [row["session_hash"] for row in rows] == [hashlib.sha256(cookie.encode()).hexdigest()]
    stored = " ".join(str(value) for row in rows for value in row.values())
    assert cookie not in stored and ADMIN_TOKEN not in stored


# ---------------------------------------------------------------- sign-in limits


def from_address(page, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=page.app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://credits.test")


async def test_sign_in_is_limited_per_address_and_in_all_with_429_and_retry_after(db, pg_url):
    limits = {"admin_sign_in_limit_per_address": 3, "admin_sign_in_limit_total": 5, "admin_sign_in_window_minutes": 15}
    async with serving(db, pg_url, **limits) as page:
        clock = session_clock(page)
        async with from_address(page, "203.0.113.7") as first, from_address(page, "198.51.100.9") as second:
            assert [(await first.post("/admin/login", data={"token": "guess"})).status_code for _ in range(3)] == [
                401
            ] * 3
            later(clock, minutes=5)
            refused = await first.post("/admin/login", data={"token": ADMIN_TOKEN})  # even the right token
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == str(10 * 60)  # the window's 15 minutes, 5 of them gone
            assert "Too many sign-in attempts: try again in 10 minute(s)." in refused.text  # on the sign-in page
            assert COOKIE not in first.cookies

            # Another address has its own allowance, until everyone's together is used up
            # (the refused attempt of the first address did not count towards it).
            assert (await second.post("/admin/login", data={"token": "guess"})).status_code == 401
            assert (await second.post("/admin/login", data={"token": "guess"})).status_code == 401
            overall = await second.post("/admin/login", data={"token": ADMIN_TOKEN})
            assert overall.status_code == 429 and int(overall.headers["retry-after"]) == 10 * 60

            # When the window is over, the right token signs in again.
            later(clock, minutes=10)
            assert (await first.post("/admin/login", data={"token": ADMIN_TOKEN})).status_code == 303


async def test_concurrent_guesses_from_one_address_get_exactly_the_allowance(db, pg_url):
    async with serving(db, pg_url, admin_sign_in_limit_per_address=3) as page:
        async with from_address(page, "203.0.113.8") as guesser:
            answers = await asyncio.gather(
                *[guesser.post("/admin/login", data={"token": f"guess-{n}"}) for n in range(20)]
            )
    assert sorted(answer.status_code for answer in answers) == [401] * 3 + [429] * 17


@pytest.mark.parametrize(
    ("host", "bucket"),
    [
        ("203.0.113.7", "addr:203.0.113.7"),
        ("::ffff:203.0.113.7", "addr:203.0.113.7"),
        ("2001:db8:1:2:3:4:5:6", "net:2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "net:2001:db8:1:2::/64"),  # the same /64: one client
        ("testclient", "addr:testclient"),
    ],
)
def test_clients_are_counted_by_address_and_ipv6_by_its_64(host, bucket):
    class Request:
        client = type("Client", (), {"host": host})()

    assert client_bucket(Request()) == bucket


# ---------------------------------------------------------------- the same-origin rule


async def test_state_changing_admin_requests_need_this_servers_origin(db, pg_url):
    await depleted(db, "cust-origin", NOW - timedelta(days=20))
    async with serving(db, pg_url) as page:
        await page.sign_in()
        url = "/admin/data/customers/cust-origin/note"
        page.http.headers.pop("Origin")
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "http://credits.test.evil.example"},
            {"Origin": "http://credits.test:8080"},  # another port is another origin
            {"Origin": "null"},  # a sandboxed frame, a data: URL
            {},  # neither Origin nor Referer
            {"Referer": "https://evil.example/admin"},
            {"Origin": "https://evil.example", "Referer": "http://credits.test/admin"},  # Origin decides when present
        ):
            response = await page.http.post(url, json={"note": "forged"}, headers=headers)
            assert response.status_code == 403, (headers, response.text)
            adjusted = await page.http.post(
                "/admin/data/customers/cust-origin/adjustments",
                json={"credits": 5, "reason": "x", "idempotency_key": "forged-0001"},
                headers=headers,
            )
            assert adjusted.status_code == 403, headers
            assert (await page.http.post("/admin/logout", headers=headers)).status_code == 403
        assert await notes(db) == {}
        assert await status_of(page, "/admin/data/at-risk") == 200  # the forged sign-out did nothing

        for headers in (
            {"Origin": "http://credits.test"},
            {"Referer": "http://credits.test/admin"},
            {"Origin": "https://credits.test"},
        ):
            assert (await page.http.post(url, json={"note": "ok"}, headers=headers)).status_code == 200, headers
        assert (await page.http.post("/admin/logout", headers=ORIGIN)).status_code == 303


async def test_configured_origins_are_the_only_ones_accepted(db, pg_url):
    async with serving(db, pg_url, admin_allowed_origins="https://admin.example.com") as page:
        await depleted(db, "cust-configured", NOW - timedelta(days=20))
        await page.sign_in()
        url = "/admin/data/customers/cust-configured/note"
        assert (
            await page.http.post(url, json={"note": "x"}, headers={"Origin": "http://credits.test"})
        ).status_code == 403
        assert (
            await page.http.post(url, json={"note": "x"}, headers={"Origin": "https://admin.example.com"})
        ).status_code == 200


# ---------------------------------------------------------------- security headers


def assert_security_headers(response: httpx.Response, hsts: bool) -> None:
    csp = response.headers["content-security-policy"]
    directives = dict((part.strip().split(" ", 1) + [""])[:2] for part in csp.split(";"))
    assert directives["frame-ancestors"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["default-src"] == "'none'"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "same-origin"
    assert ("strict-transport-security" in response.headers) is hsts
    if hsts:
        assert response.headers["strict-transport-security"] == "max-age=31536000"


@pytest.mark.parametrize("secure", [False, True])
async def test_every_response_carries_the_security_headers_and_hsts_when_the_cookie_is_secure(db, pg_url, secure):
    async with serving(db, pg_url, admin_cookie_secure=secure) as page:
        responses = [
            await page.http.get("/admin/login"),
            await page.http.get("/admin"),
            await page.http.get("/healthz"),
        ]
        responses.append(await page.http.post("/admin/login", data={"token": "wrong"}))
        await page.sign_in()
        if secure:  # httpx keeps a Secure cookie for https only: hand it over as a browser on https would
            page.http.headers["Cookie"] = f"{COOKIE}={page.http.cookies[COOKIE]}"
        responses += [await page.http.get("/admin"), await page.http.get("/admin/data/at-risk")]
        responses += [await page.http.get(f"/admin/static/{name}") for name in ("admin.js", "admin.css", "login.css")]
        assert responses[4].headers["content-type"].startswith("text/html")
        for response in responses:
            assert response.status_code < 500
            assert_security_headers(response, hsts=secure)


async def test_the_pages_need_no_inline_script_or_style_and_their_files_are_ours(db, pg_url):
    async with serving(db, pg_url) as page:
        await page.sign_in()
        for path in ("/admin/login", "/admin"):
            html = (await page.http.get(path)).text
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path  # every script is a file
            assert "<style" not in html and " style=" not in html, path
            assert not re.search(r"\son[a-z]+=", html), path  # no inline event handlers
            for src in re.findall(r'(?:src|href)="(/admin/static/[^"]+)"', html):
                served = await page.http.get(src)
                assert served.status_code == 200, src
        assert (
            (await page.http.get("/admin/static/admin.js"))
            .headers["content-type"]
            .startswith(("text/javascript", "application/javascript"))
        )
        assert (await page.http.get("/admin/static/../app.py")).status_code == 404
