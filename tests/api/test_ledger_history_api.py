"""The ledger history routes (api/ledger.py) over a real uvicorn and PostgreSQL.

`GET /api/customers/{id}/ledger` pages newest first by a keyset cursor; the admin's
`ledger.csv` streams the same entries oldest first. Data is written through the service
layer into the same database the server reads, also while a client is paging.
"""

from __future__ import annotations

import base64
import csv
import io
import uuid
from datetime import datetime, timedelta

import httpx

from api.app import create_app
from domain import CreditPolicy
from infra.clock import FixedClock
from infra.settings import load_settings
from messages import CreditsGifted, JobCancelled, JobCompleted, PaymentSucceeded
from service_layer import handlers
from service_layer.adjustments import Adjustment
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import InProcessServer, t

ADMIN_TOKEN = "admin-" + uuid.uuid4().hex
FRONTEND_TOKEN = "front-" + uuid.uuid4().hex
FRONT = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
POLICY = CreditPolicy()
START = t(2025, 1, 1, 9)


def serving(pg_url: str) -> InProcessServer:
    settings = load_settings(
        database_url=pg_url, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None
    )
    return InProcessServer(create_app(settings, clock=FixedClock(t(2025, 6, 1))))


async def apply(db, event) -> None:
    await handlers.apply_event(event, SqlUnitOfWork(db), POLICY)


async def pay(db, customer_id: str, credits: int, at: datetime, payment_id: str | None = None) -> None:
    payment_id = payment_id or f"in-{uuid.uuid4().hex[:10]}"
    await apply(
        db,
        PaymentSucceeded(
            event_id=f"pay-{payment_id}",
            occurred_at=at,
            customer_id=customer_id,
            payment_id=payment_id,
            credits=credits,
        ),
    )


async def job(db, customer_id: str, credits: int, at: datetime) -> None:
    job_id = f"job-{uuid.uuid4().hex[:10]}"
    await apply(
        db,
        JobCompleted(
            event_id=f"done-{job_id}", occurred_at=at, customer_id=customer_id, job_id=job_id, credits=credits
        ),
    )


async def history(http: httpx.AsyncClient, customer_id: str, limit: int, between_pages=None) -> list[dict]:
    entries, cursor, pages = [], None, 0
    while True:
        params = {"limit": limit} | ({"cursor": cursor} if cursor else {})
        response = await http.get(f"/api/customers/{customer_id}/ledger", params=params, headers=FRONT)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["entries"]) <= limit
        entries += body["entries"]
        cursor, pages = body["next_cursor"], pages + 1
        if cursor is None:
            return entries
        if between_pages:
            await between_pages(pages)


def key(entry: dict) -> tuple:
    return (
        datetime.fromisoformat(entry["at"]),
        entry["kind"],
        int(entry["credits"]),
        int(entry["balance_after"]),
        entry["event_id"],
        entry["note"] or "",
    )


async def test_paging_while_writes_arrive_loses_and_repeats_nothing(db, pg_url):
    for day in range(12):  # 24 entries, one every half day
        await pay(db, "ann", 3, START + timedelta(days=day))
        await job(db, "ann", 1, START + timedelta(days=day, hours=12))
    async with serving(pg_url) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        before = [key(e) for e in await history(http, "ann", 200)]
        assert len(before) == 24

        async def write_meanwhile(pages: int) -> None:
            # Newer entries (above the cursor) and older ones (an event reported late, below it):
            # an offset would shift under both; the keyset sees the old ones once and skips none.
            await pay(db, "ann", 2, START + timedelta(days=100 + pages))
            await job(db, "ann", 1, START + timedelta(days=1, hours=pages))

        paged = [key(e) for e in await history(http, "ann", 5, between_pages=write_meanwhile)]
        after = [key(e) for e in await history(http, "ann", 200)]

    assert len(paged) == len(set(paged)), "an entry was shown twice"
    assert set(before) <= set(paged), "an entry there before paging began was lost"
    assert paged == sorted(paged, key=lambda k: k[0], reverse=True)
    assert [k for k in after if k in set(paged)] == paged  # in the ledger's own order
    late = [k for k in paged if k not in set(before)]
    assert late and all(k[0] < START + timedelta(days=2) for k in late), (
        "the late, older entries below the cursor are shown"
    )


async def test_entries_show_their_kinds_signs_and_lots(db, pg_url):
    await pay(db, "bo", 3, t(2025, 1, 1), payment_id="in-a")
    await pay(db, "bo", 4, t(2025, 2, 1), payment_id="in-b")
    await pay(db, "cy", 1, t(2025, 2, 1))
    await job(db, "bo", 5, t(2025, 3, 1))  # takes 3 from A, 2 from B
    hold = await handlers.place_hold(SqlUnitOfWork(db), POLICY, "bo", "job-h", 1, t(2025, 3, 2))
    assert hold[1]
    await apply(db, JobCancelled(event_id="cancel-h", occurred_at=t(2025, 3, 3), customer_id="bo", job_id="job-h"))
    await apply(
        db,
        CreditsGifted(event_id="gift-1", occurred_at=t(2025, 3, 4), customer_id="bo", to_customer_id="cy", credits=1),
    )
    async with serving(pg_url) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        bo = await history(http, "bo", 50)
        cy = await history(http, "cy", 50)

    assert [(e["kind"], e["credits"], e["balance_after"]) for e in bo] == [
        ("gift_sent", -1, 1),
        ("released", 1, 2),
        ("held", -1, 2),
        ("debited", -5, 2),
        ("issued", 4, 7),
        ("issued", 3, 3),
    ]
    debit = bo[3]
    assert [(lot["issued_at"][:10], lot["credits"]) for lot in debit["lots"]] == [
        ("2025-01-01", -3),
        ("2025-02-01", -2),
    ]
    assert all(lot["expires_at"] > lot["issued_at"] for lot in debit["lots"])
    assert bo[5]["lots"] == [{"issued_at": bo[5]["at"], "expires_at": bo[5]["lots"][0]["expires_at"], "credits": 3}]
    assert bo[5]["note"] == "payment in-a" and bo[5]["event_id"] == "pay-in-a"
    assert bo[1]["lots"] == [] and bo[2]["lots"] == []
    assert cy[0]["kind"] == "gift_received" and cy[0]["credits"] == 1 and cy[0]["note"] == "gift from bo"
    # The gift keeps the expiry of the lot it came from (B, what was left after the job).
    assert cy[0]["lots"][0]["expires_at"] == debit["lots"][1]["expires_at"]


async def test_the_csv_is_the_json_oldest_first_streamed(db, pg_url):
    await pay(db, "di", 5, t(2025, 1, 1))
    for day in range(1, 4):
        await job(db, "di", 1, t(2025, 1, 1 + day))
    adjustment = Adjustment("di", 2, '=HYPERLINK("x"), "quoted", comma', "ops", t(2025, 1, 9), "key-12345678")
    await handlers.admin_adjustment(SqlUnitOfWork(db), POLICY, adjustment)
    async with serving(pg_url) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        json_entries = await history(http, "di", 2)
        response = await http.get("/api/admin/customers/di/ledger.csv", headers=ADMIN)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    assert "content-length" not in response.headers and response.headers.get("transfer-encoding") == "chunked"
    assert 'filename="ledger-di.csv"' in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert list(rows[0]) == ["at", "kind", "credits", "balance_after", "event_id", "note"]
    assert len(rows) == len(json_entries) == 5
    for row, entry in zip(rows, reversed(json_entries), strict=True):
        assert datetime.fromisoformat(row["at"]) == datetime.fromisoformat(entry["at"])
        assert (row["kind"], int(row["credits"]), int(row["balance_after"]), row["event_id"]) == (
            entry["kind"],
            entry["credits"],
            entry["balance_after"],
            entry["event_id"],
        )
        # A note a spreadsheet would run as a formula is neutralised with a leading quote.
        assert row["note"] == ("'" + entry["note"] if (entry["note"] or "").startswith("=") else entry["note"] or "")
    assert rows[-1]["kind"] == "adjusted" and rows[-1]["note"].startswith("'=HYPERLINK")


async def test_refusals(db, pg_url):
    await pay(db, "ed", 2, t(2025, 1, 1))
    await job(db, "ed", 1, t(2025, 1, 2))
    bad_cursors = [
        "garbage",
        "%%%",
        base64.urlsafe_b64encode(b"v1.abc.1").decode(),
        base64.urlsafe_b64encode(b"v1.1.0").decode(),
        base64.urlsafe_b64encode(b"v1.999999999999999999.1").decode(),
        base64.urlsafe_b64encode(b"v1.1.99999999999999999999").decode(),
        base64.urlsafe_b64encode("v1.1.1\u00e9".encode()).decode(),
        "A" * 201,
    ]
    async with serving(pg_url) as server, httpx.AsyncClient(base_url=server.base_url) as http:
        url = "/api/customers/ed/ledger"
        for limit in ("0", "201", "-1", "abc", "1.5"):
            assert (await http.get(url, params={"limit": limit}, headers=FRONT)).status_code == 422, limit
        for limit in ("1", "200"):
            assert (await http.get(url, params={"limit": limit}, headers=FRONT)).status_code == 200
        for cursor in bad_cursors:
            response = await http.get(url, params={"cursor": cursor}, headers=FRONT)
            assert response.status_code == 422, (cursor, response.text)
        first = (await http.get(url, params={"limit": 1}, headers=FRONT)).json()
        assert (
            first["next_cursor"]
            and (await http.get(url, params={"cursor": first["next_cursor"]}, headers=FRONT)).json()["next_cursor"]
            is None
        )
        assert (await http.get("/api/customers/nobody/ledger", headers=FRONT)).status_code == 404
        assert (await http.get("/api/admin/customers/nobody/ledger.csv", headers=ADMIN)).status_code == 404
        # Each route takes its own token only.
        assert (await http.get(url, headers=ADMIN)).status_code == 401
        assert (await http.get("/api/admin/customers/ed/ledger.csv", headers=FRONT)).status_code == 401
        assert (await http.get(url)).status_code == 401
