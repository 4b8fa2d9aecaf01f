"""The HTTP API as deployed: a real `credits web` process (uvicorn) over TCP, real PostgreSQL.

Data is set up through the service layer (`handlers.apply_event` on the same database) for
speed; one test goes all the way through the producer, Redis and a real worker process.
The server reads the system clock, so every event time is relative to `datetime.now(UTC)`.

`start_web_server` and the token constants are shared with tests/operations/test_logging.py.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from dateutil.relativedelta import relativedelta
from sqlalchemy import select

from infra.db.tables import credit_lots
from messages import Event, JobCompleted, PaymentSucceeded, Publisher
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import eventually, reconciliation
from tests.support.web import (
    ADMIN,
    ADMIN_TOKEN,
    FRONT,
    FRONTEND_TOKEN,
    POLICY,
    WebServer,
    clean_env,
    start_web_server,
)


@pytest.fixture(scope="module")
def web(pg_url: str, redis_url: str, tmp_path_factory) -> WebServer:
    """One server for the module (the same environment as the `service_env` fixture, plus tokens)."""
    env = clean_env(
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url,
        ADMIN_API_TOKEN=ADMIN_TOKEN,
        FRONTEND_API_TOKEN=FRONTEND_TOKEN,
        LOG_LEVEL="INFO",
    )
    server = start_web_server(env, tmp_path_factory.mktemp("web") / "web.log")
    yield server
    server.stop()


@pytest.fixture
async def client(web: WebServer):
    async with httpx.AsyncClient(base_url=web.base_url, timeout=10) as http:
        yield http


# --------------------------------------------------------------------------- data


def now() -> datetime:
    return datetime.now(UTC)


def payment(customer_id: str, credits: int, at: datetime) -> PaymentSucceeded:
    return PaymentSucceeded(
        event_id=f"pay-{uuid.uuid4().hex}",
        customer_id=customer_id,
        occurred_at=at,
        payment_id=f"in_{uuid.uuid4().hex[:12]}",
        credits=credits,
    )


def job_done(customer_id: str, job_id: str, at: datetime, credits: int = 1) -> JobCompleted:
    return JobCompleted(
        event_id=f"job-{uuid.uuid4().hex}", customer_id=customer_id, occurred_at=at, job_id=job_id, credits=credits
    )


async def apply(db, *events: Event) -> None:
    for event in events:
        assert await handlers.apply_event(event, SqlUnitOfWork(db), POLICY) == handlers.Outcome.APPLIED


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def credits_of(client: httpx.AsyncClient, customer_id: str) -> dict:
    response = await client.get(f"/api/customers/{customer_id}/credits", headers=FRONT)
    assert response.status_code == 200, response.text
    return response.json()


# --------------------------------------------------------------------------- GET credits


async def test_credits_show_balance_lots_and_holds(db, client):
    t = now()
    first, second = t - timedelta(days=60), t - timedelta(days=10)
    await apply(
        db, payment("alice", 3, first), payment("alice", 2, second), job_done("alice", "j-old", t - timedelta(days=5))
    )
    placed = await client.post("/api/customers/alice/holds", json={"job_id": "j-next", "credits": 1}, headers=FRONT)
    assert placed.status_code == 201, placed.text

    body = await credits_of(client, "alice")

    assert body["customer_id"] == "alice"
    assert body["balance"] == 4  # 3 + 2 - 1
    assert body["available"] == 3  # one more credit is held
    assert body["can_schedule"] is True
    assert body["credits_depleted_at"] is None
    # Oldest lot first, and the completed job was taken from it (FIFO).
    assert [lot["remaining"] for lot in body["lots"]] == [2, 2]
    assert [parse_time(lot["issued_at"]) for lot in body["lots"]] == [first, second]
    assert [parse_time(lot["expires_at"]) for lot in body["lots"]] == [
        first + relativedelta(months=12),
        second + relativedelta(months=12),
    ]
    [hold] = body["holds"]
    assert hold["job_id"] == "j-next" and hold["credits"] == 1
    assert parse_time(hold["expires_at"]) - parse_time(hold["placed_at"]) == timedelta(days=30)


async def test_unknown_customer_is_404(db, client):
    response = await client.get("/api/customers/nobody/credits", headers=FRONT)
    assert response.status_code == 404
    assert "nobody" in response.json()["detail"]


async def test_expired_credit_is_not_counted_before_the_sweep_ran(db, client):
    issued = now() - relativedelta(months=13)
    await apply(db, payment("old-timer", 5, issued))

    body = await credits_of(client, "old-timer")

    assert body["balance"] == 0
    assert body["available"] == 0
    assert body["lots"] == []
    assert body["can_schedule"] is False
    # Depleted when the lot expired, 12 months after issue (a month ago).
    assert parse_time(body["credits_depleted_at"]) == issued + relativedelta(months=12)
    # The view applied the expiry in memory only: no sweep ran, the stored lot still has its credit.
    async with db.connect() as connection:
        stored = (
            await connection.execute(select(credit_lots.c.remaining).where(credit_lots.c.customer_id == "old-timer"))
        ).scalar_one()
    assert stored == 5
    refused = await client.post("/api/customers/old-timer/holds", json={"job_id": "j-1", "credits": 1}, headers=FRONT)
    assert refused.status_code == 409
    assert refused.json()["reason"] == "insufficient_credits"


async def test_a_customer_at_zero_credits_cannot_book(db, client):
    t = now()
    await apply(db, payment("dry", 1, t - timedelta(days=40)), job_done("dry", "j-1", t - timedelta(days=30)))

    body = await credits_of(client, "dry")
    assert (body["balance"], body["available"], body["can_schedule"]) == (0, 0, False)
    assert parse_time(body["credits_depleted_at"]) == t - timedelta(days=30)

    refused = await client.post("/api/customers/dry/holds", json={"job_id": "j-2"}, headers=FRONT)
    assert refused.status_code == 409
    assert refused.json() == {
        "detail": "customer 'dry' has 0 credit(s) available and the job needs 1",
        "reason": "insufficient_credits",
        "available": 0,
        "requested": 1,
    }
    assert (await credits_of(client, "dry"))["holds"] == []


# --------------------------------------------------------------------------- holds


async def test_hold_lifecycle(db, client):
    await apply(db, payment("bob", 3, now() - timedelta(days=2)))
    url = "/api/customers/bob/holds"

    created = await client.post(url, json={"job_id": "j-1", "credits": 2}, headers=FRONT)
    assert created.status_code == 201, created.text
    assert created.json()["job_id"] == "j-1" and created.json()["credits"] == 2

    again = await client.post(url, json={"job_id": "j-1", "credits": 2}, headers=FRONT)
    assert again.status_code == 200
    assert again.json() == created.json()  # the same hold, not a second one

    conflict = await client.post(url, json={"job_id": "j-1", "credits": 1}, headers=FRONT)
    assert conflict.status_code == 409
    assert conflict.json()["reason"] == "hold_conflict"
    assert "j-1" in conflict.json()["detail"]

    short = await client.post(url, json={"job_id": "j-2", "credits": 2}, headers=FRONT)
    assert short.status_code == 409
    assert short.json() == {
        "detail": "customer 'bob' has 1 credit(s) available and the job needs 2",
        "reason": "insufficient_credits",
        "available": 1,
        "requested": 2,
    }

    body = await credits_of(client, "bob")
    assert (body["balance"], body["available"]) == (3, 1)
    assert [h["job_id"] for h in body["holds"]] == ["j-1"]

    released = await client.delete(f"{url}/j-1", headers=FRONT)
    assert released.status_code == 204
    assert released.content == b""
    gone = await client.delete(f"{url}/j-1", headers=FRONT)
    assert gone.status_code == 404

    body = await credits_of(client, "bob")
    assert (body["balance"], body["available"], body["holds"]) == (3, 3, [])
    # The credits are bookable again.
    rebooked = await client.post(url, json={"job_id": "j-2", "credits": 3}, headers=FRONT)
    assert rebooked.status_code == 201


async def test_holds_for_an_unknown_customer_are_404(db, client):
    placed = await client.post("/api/customers/nobody/holds", json={"job_id": "j-1", "credits": 1}, headers=FRONT)
    assert placed.status_code == 404
    released = await client.delete("/api/customers/nobody/holds/j-1", headers=FRONT)
    assert released.status_code == 404


async def test_holds_work_for_the_longest_legal_ids(db, client):
    customer, job_id = "c" * 255, "j" * 255
    await apply(db, payment(customer, 2, now() - timedelta(days=1)))
    placed = await client.post(f"/api/customers/{customer}/holds", json={"job_id": job_id, "credits": 1}, headers=FRONT)
    assert placed.status_code == 201, placed.text
    released = await client.delete(f"/api/customers/{customer}/holds/{job_id}", headers=FRONT)
    assert released.status_code == 204


async def test_a_nul_character_in_an_id_is_422_not_500(db, client):
    await apply(db, payment("dora", 2, now() - timedelta(days=1)))
    assert (await client.get("/api/customers/do%00ra/credits", headers=FRONT)).status_code == 422
    placed = await client.post("/api/customers/dora/holds", json={"job_id": "j\u0000", "credits": 1}, headers=FRONT)
    assert placed.status_code == 422, placed.text


@pytest.mark.parametrize(
    "body",
    [
        {"job_id": "j-1", "credits": 0},
        {"job_id": "j-1", "credits": -1},
        {"job_id": "j-1", "credits": 1, "note": "extra field"},
        {"credits": 1},
        {"job_id": "", "credits": 1},
        {"job_id": "j-1", "credits": 1_000_001},
    ],
    ids=["zero", "negative", "extra-field", "missing-job-id", "empty-job-id", "too-many"],
)
async def test_bad_hold_bodies_are_422(db, client, body):
    await apply(db, payment("carol", 2, now() - timedelta(days=1)))
    response = await client.post("/api/customers/carol/holds", json=body, headers=FRONT)
    assert response.status_code == 422, response.text
    assert (await credits_of(client, "carol"))["holds"] == []


# --------------------------------------------------------------------------- admin report


async def _depleted(db, customer_id: str, days_ago: int) -> None:
    t = now()
    await apply(
        db,
        payment(customer_id, 1, t - timedelta(days=days_ago + 5)),
        job_done(customer_id, "j", t - timedelta(days=days_ago)),
    )


async def test_credits_report_lists_long_depleted_customers_oldest_first(db, client):
    for customer_id, days_ago in (("d20", 20), ("d30", 30), ("d10", 10), ("d15", 15)):
        await _depleted(db, customer_id, days_ago)
    # Depleted 40 days ago, then paid again: not out of credits any more.
    t = now()
    await _depleted(db, "recovered", 40)
    await apply(db, payment("recovered", 1, t - timedelta(days=3)))
    await apply(db, payment("flush", 5, t - timedelta(days=3)))

    full = await client.get("/api/admin/credits-report", params={"days": 14}, headers=ADMIN)
    assert full.status_code == 200, full.text
    report = full.json()
    assert report["days"] == 14 and report["total"] == 3 and report["next_offset"] is None
    assert [(c["customer_id"], c["days_depleted"]) for c in report["customers"]] == [
        ("d30", 30),
        ("d20", 20),
        ("d15", 15),
    ]
    depleted_at = [parse_time(c["credits_depleted_at"]) for c in report["customers"]]
    assert depleted_at == sorted(depleted_at)

    first = (await client.get("/api/admin/credits-report", params={"days": 14, "limit": 2}, headers=ADMIN)).json()
    assert [c["customer_id"] for c in first["customers"]] == ["d30", "d20"]
    assert (first["total"], first["limit"], first["offset"], first["next_offset"]) == (3, 2, 0, 2)
    second = (
        await client.get(
            "/api/admin/credits-report", params={"days": 14, "limit": 2, "offset": first["next_offset"]}, headers=ADMIN
        )
    ).json()
    assert [c["customer_id"] for c in second["customers"]] == ["d15"]
    assert (second["total"], second["next_offset"]) == (3, None)

    narrower = (await client.get("/api/admin/credits-report", params={"days": 25}, headers=ADMIN)).json()
    assert [c["customer_id"] for c in narrower["customers"]] == ["d30"]
    assert narrower["total"] == 1

    default = (await client.get("/api/admin/credits-report", headers=ADMIN)).json()
    assert default["days"] == 14  # DEPLETED_REPORT_DAYS default
    assert default["customers"] == report["customers"]

    count = await client.get("/api/admin/at-risk-count", headers=ADMIN)
    assert count.status_code == 200
    assert count.json() == {"count": report["total"]}


@pytest.mark.parametrize("params", [{"days": -1}, {"limit": 0}, {"limit": 1001}, {"offset": -1}, {"days": "two"}])
async def test_credits_report_rejects_bad_query(db, client, params):
    response = await client.get("/api/admin/credits-report", params=params, headers=ADMIN)
    assert response.status_code == 422


# --------------------------------------------------------------------------- auth

CUSTOMER_ROUTES = [
    ("GET", "/api/customers/alice/credits", None),
    ("POST", "/api/customers/alice/holds", {"job_id": "j-1", "credits": 1}),
    ("DELETE", "/api/customers/alice/holds/j-1", None),
]
ADMIN_ROUTES = [
    ("GET", "/api/admin/credits-report", None),
    ("GET", "/api/admin/at-risk-count", None),
]
WRONG = {
    "missing": {},
    "wrong-token": {"Authorization": f"Bearer {secrets.token_hex(20)}"},
    "not-bearer": {"Authorization": f"Basic {FRONTEND_TOKEN}"},
    "token-prefix": {"Authorization": f"Bearer {FRONTEND_TOKEN[:-1]}"},
}


@pytest.mark.parametrize("method,path,body", CUSTOMER_ROUTES + ADMIN_ROUTES)
@pytest.mark.parametrize("headers", WRONG.values(), ids=WRONG.keys())
async def test_missing_or_wrong_tokens_are_401(db, client, method, path, body, headers):
    await apply(db, payment("alice", 2, now() - timedelta(days=1)))
    response = await client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert (await credits_of(client, "alice"))["holds"] == []


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
async def test_the_frontend_token_never_opens_an_admin_route(db, client, method, path, body):
    response = await client.request(method, path, json=body, headers=FRONT)
    assert response.status_code == 401
    assert (await client.request(method, path, json=body, headers=ADMIN)).status_code == 200


@pytest.mark.parametrize("method,path,body", CUSTOMER_ROUTES)
async def test_the_admin_token_is_not_accepted_on_customer_routes(db, client, method, path, body):
    await apply(db, payment("alice", 2, now() - timedelta(days=1)))
    response = await client.request(method, path, json=body, headers=ADMIN)
    assert response.status_code == 401
    assert (await credits_of(client, "alice"))["holds"] == []


async def test_healthz_needs_no_token(client):
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# --------------------------------------------------------------------------- end to end


async def test_published_events_show_up_over_http(db, client, redis_client, redis_url, start_workers):
    """Producer → Redis → real worker process → PostgreSQL → `credits web` → HTTP client."""
    start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    try:
        t = now()
        publisher.publish(payment("e2e", 5, t - timedelta(hours=1)))

        async def shows_five() -> bool:
            response = await client.get("/api/customers/e2e/credits", headers=FRONT)
            return response.status_code == 200 and response.json()["balance"] == 5

        await eventually(shows_five, message="the payment to show over HTTP")

        booked = await client.post("/api/customers/e2e/holds", json={"job_id": "j-1", "credits": 2}, headers=FRONT)
        assert booked.status_code == 201
        assert (await credits_of(client, "e2e"))["available"] == 3

        # The job is done: the worker captures the hold.
        publisher.publish(job_done("e2e", "j-1", now(), credits=2))

        async def captured() -> bool:
            body = await credits_of(client, "e2e")
            return body["balance"] == 3 and body["holds"] == []

        await eventually(captured, message="the completed job to capture its hold")
        body = await credits_of(client, "e2e")
        assert (body["available"], body["can_schedule"]) == (3, True)
        assert [lot["remaining"] for lot in body["lots"]] == [3]
    finally:
        publisher.close()
    assert await reconciliation(db) == []
