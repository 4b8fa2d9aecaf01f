"""Stripe webhooks, end to end: genuinely signed deliveries into a real `credits web` process,
the relay publishing domain events to Redis, real `dramatiq` worker processes applying them
to PostgreSQL.

One server and one set of workers serve the whole module (starting them per test would cost
seconds each); the `db` fixture empties every table before each test, and every test uses
customer, Stripe-customer and invoice ids of its own. The server runs with two webhook
secrets (a rotation in progress), ``price_basic`` worth 10 credits, and no STRIPE_API_KEY
(so nothing is charged: payment attempts stay pending in the database).

Event ``created`` times are near now: the workers refuse events outside their event window.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select

from api.app import create_app
from domain import CreditPolicy
from infra.db.tables import (
    credit_lots,
    customers,
    dead_letters,
    dunning_cases,
    ledger_entries,
    payment_attempts,
    processed_events,
    stripe_customers,
    stripe_events,
)
from infra.settings import load_settings
from messages import JobCompleted
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork
from tests.support import eventually, reconciliation, start_worker_processes
from tests.support.fake_stripe import event, invoice, signed
from tests.support.web import ADMIN, ADMIN_TOKEN, FRONT, FRONTEND_TOKEN, WebServer, clean_env, start_web_server

pytestmark = pytest.mark.slow

OLD_SECRET = "whsec_old" + uuid.uuid4().hex
NEW_SECRET = "whsec_new" + uuid.uuid4().hex
PLAN = {"price_basic": 10}
POLICY = CreditPolicy()
WEBHOOK = "/webhooks/stripe"
SHAPES = pytest.mark.parametrize("legacy_shape", [False, True], ids=["current-api", "legacy-api"])


# --------------------------------------------------------------------------- processes


def _env(pg_url: str, redis_url: str) -> dict[str, str]:
    return clean_env(
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url,
        ADMIN_API_TOKEN=ADMIN_TOKEN,
        FRONTEND_API_TOKEN=FRONTEND_TOKEN,
        STRIPE_WEBHOOK_SECRETS=f"{OLD_SECRET},{NEW_SECRET}",
        STRIPE_PLAN_CREDITS=json.dumps(PLAN),
        EVENT_MIN_BACKOFF_MS="100",
        EVENT_MAX_BACKOFF_MS="1000",
        # A message that keeps failing is dead-lettered within a second, not retried for minutes.
        EVENT_MAX_RETRIES="3",
        LOG_LEVEL="INFO",
    )


@pytest.fixture(scope="module")
def web(pg_url: str, redis_url: str, tmp_path_factory) -> WebServer:
    server = start_web_server(_env(pg_url, redis_url), tmp_path_factory.mktemp("stripe-web") / "web.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def workers(pg_url: str, redis_url: str, tmp_path_factory):
    """Real `dramatiq workers.actors` processes for the module (like the `start_workers` fixture, module-scoped)."""
    started = start_worker_processes(
        _env(pg_url, redis_url), tmp_path_factory.mktemp("stripe-workers") / "workers.log", processes=1, threads=4
    )
    yield started
    started.stop()


@pytest.fixture
async def client(web: WebServer, workers, db):
    async with httpx.AsyncClient(base_url=web.base_url, timeout=10) as http:
        yield http


# --------------------------------------------------------------------------- helpers


def ids() -> tuple[str, str, str]:
    """A customer of ours, a Stripe customer and an invoice, new for each test."""
    token = uuid.uuid4().hex[:12]
    return f"cust-{token}", f"cus_{token}", f"in_{token}"


def ago(seconds: int) -> int:
    return int(time.time()) - seconds


async def deliver(client: httpx.AsyncClient, body: dict, secret: str = NEW_SECRET) -> httpx.Response:
    payload, headers = signed(body, secret)
    return await client.post(WEBHOOK, content=payload, headers=headers)


async def relay(client: httpx.AsyncClient, body: dict, outcome: str = "relayed", secret: str = NEW_SECRET) -> dict:
    response = await deliver(client, body, secret)
    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == outcome, response.json()
    return response.json()


async def link(client: httpx.AsyncClient, stripe_customer: str, customer_id: str) -> None:
    """Link through Stripe's own customer.created event, its metadata naming our customer."""
    obj = {
        "id": stripe_customer,
        "object": "customer",
        "metadata": {"customer_id": customer_id},
        "invoice_settings": {"default_payment_method": None},
    }
    body = await relay(client, event("customer.created", obj))
    assert body["detail"] == f"linked to customer {customer_id!r}"


def paid(invoice_id: str, stripe_customer: str, *, created: int | None = None, **kwargs) -> dict:
    return invoice(invoice_id, stripe_customer, status="paid", created=created, **kwargs)


def charge(
    charge_id: str,
    stripe_customer: str,
    *,
    amount_refunded: int,
    payment_intent: str | None = None,
    invoice_id: str | None = None,
) -> dict:
    obj = {
        "id": charge_id,
        "object": "charge",
        "customer": stripe_customer,
        "amount": 4900,
        "amount_refunded": amount_refunded,
        "refunded": amount_refunded >= 4900,
        "currency": "usd",
        "payment_intent": payment_intent,
    }
    if invoice_id is not None:  # only the pre-2025 API versions name the invoice on a charge
        obj["invoice"] = invoice_id
    return obj


async def pay_invoice(client, stripe_customer: str, invoice_id: str, legacy_shape: bool, **kwargs) -> tuple[str, str]:
    """invoice.paid (and, for the current API, the invoice_payment.paid naming its charge). Returns (payment intent, charge)."""
    if legacy_shape:
        await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer, legacy_shape=True, **kwargs)))
        return f"pi_{invoice_id}", f"ch_{invoice_id}"
    intent, charge_id = f"pi_{invoice_id}", f"ch_{invoice_id}"
    payment = {
        "id": f"inpay_{invoice_id}",
        "object": "invoice_payment",
        "invoice": invoice_id,
        "status": "paid",
        "amount_paid": 4900,
        "payment": {"type": "payment_intent", "payment_intent": intent, "charge": charge_id},
    }
    await relay(client, event("invoice_payment.paid", payment))
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer, **kwargs)))
    return intent, charge_id


async def scalar(db, query):
    async with db.connect() as connection:
        return (await connection.execute(query)).scalar()


async def rows(db, query) -> list:
    async with db.connect() as connection:
        return list(await connection.execute(query))


async def balance(db, customer_id: str) -> int | None:
    return await scalar(db, select(customers.c.balance).where(customers.c.customer_id == customer_id))


async def wait_balance(db, customer_id: str, expected: int, message: str = "") -> None:
    async def reached() -> bool:
        return await balance(db, customer_id) == expected

    await eventually(reached, timeout=20, message=message or f"{customer_id}'s balance to be {expected}")


async def wait_applied(db, stripe_event: dict, timeout: float = 20) -> None:
    """Until the worker has recorded the domain event the Stripe event became (applied or ignored).

    Fails as soon as the event is dead-lettered instead, naming the error.
    """
    event_id = f"stripe:{stripe_event['id']}"

    async def processed() -> bool:
        return await scalar(db, select(func.count()).where(processed_events.c.event_id == event_id)) == 1

    async def refused() -> list[str]:
        return [r.error for r in await rows(db, select(dead_letters)) if event_id in r.message]

    async def settled() -> bool:
        return await processed() or bool(await refused())

    await eventually(settled, timeout=timeout, message=f"{event_id} to be processed")
    assert await processed(), f"{event_id} was never applied; dead-lettered with: {await refused()}"


async def no_dead_letters(db) -> None:
    assert [r.error for r in await rows(db, select(dead_letters))] == []


async def stripe_event_rows(db) -> list:
    return await rows(db, select(stripe_events).order_by(stripe_events.c.received_at))


async def case_of(db, invoice_id: str):
    found = await rows(db, select(dunning_cases).where(dunning_cases.c.invoice_id == invoice_id))
    return found[0] if found else None


async def wait_case(db, invoice_id: str, predicate=lambda case: True):
    async def there() -> bool:
        case = await case_of(db, invoice_id)
        return case is not None and predicate(case)

    await eventually(there, timeout=20, message=f"the dunning case of {invoice_id}")
    return await case_of(db, invoice_id)


def moment(epoch: int) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def failed(
    invoice_id: str, stripe_customer: str, *, decline_code: str | None = None, message: str | None = None
) -> dict:
    """An unpaid invoice whose payment failed; the payment intent expanded with its last error when given."""
    body = invoice(invoice_id, stripe_customer, legacy_shape=True)
    if decline_code or message:
        body["payment_intent"] = {
            "id": f"pi_{invoice_id}",
            "object": "payment_intent",
            "last_payment_error": {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": decline_code,
                "message": message,
            },
        }
    body["attempt_count"] = 1
    return body


# --------------------------------------------------------------------------- invoice.paid


@SHAPES
async def test_invoice_paid_issues_plan_credits_times_quantity_once(db, client, legacy_shape):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    first = event("invoice.paid", paid(invoice_id, stripe_customer, quantity=3, legacy_shape=legacy_shape))

    await relay(client, first)
    await wait_balance(db, customer_id, 30)

    # Stripe delivers the same event again (it does, at least once): 200, nothing more.
    again = await deliver(client, first)
    assert again.status_code == 200
    assert again.json() == {"outcome": "duplicate", "detail": "already received"}
    # A second event about the same invoice (a different event id): still issued once.
    second = event("invoice.paid", paid(invoice_id, stripe_customer, quantity=3, legacy_shape=legacy_shape))
    assert second["id"] != first["id"]
    await relay(client, second)
    await wait_applied(db, second)

    assert await balance(db, customer_id) == 30
    [lot] = await rows(db, select(credit_lots).where(credit_lots.c.customer_id == customer_id))
    assert (lot.amount, lot.payment_id, lot.issued_at) == (30, invoice_id, moment(first["created"]))
    recorded = await stripe_event_rows(db)
    assert [r.event_id for r in recorded if r.type == "invoice.paid"] == [first["id"], second["id"]]
    assert sum(1 for r in recorded if r.event_id == first["id"]) == 1
    assert await reconciliation(db) == []


async def test_a_price_without_known_credits_is_parked_not_dropped(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = await relay(
        client, event("invoice.paid", paid(invoice_id, stripe_customer, price="price_unknown")), outcome="parked"
    )
    assert "STRIPE_PLAN_CREDITS" in body["detail"]
    # The price's own `credits` metadata is used for prices not in the plan table.
    _, _, other_invoice = ids()
    await relay(
        client,
        event(
            "invoice.paid",
            paid(
                other_invoice, stripe_customer, price="price_meta", price_metadata={"credits": "7"}, legacy_shape=True
            ),
        ),
    )
    await wait_balance(db, customer_id, 7)


async def test_invoice_paid_again_after_the_credits_were_spent_is_ignored(db, client):
    """BUG (same root cause): once the payment's lot is spent it is not loaded, so a second report
    of the payment (another invoice.paid, or our own dunning charge's PaymentSucceeded) tries to
    issue the credits again; the unique index on (customer_id, payment_id) refuses the insert and
    the event is dead-lettered as an IntegrityError instead of being recorded as ignored."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer)))
    await wait_balance(db, customer_id, 10)
    spent = JobCompleted(
        event_id=f"job-{uuid.uuid4().hex}",
        customer_id=customer_id,
        occurred_at=datetime.now(UTC),
        job_id="j-all",
        credits=10,
    )
    assert await handlers.apply_event(spent, SqlUnitOfWork(db), POLICY) == handlers.Outcome.APPLIED

    second = event("invoice.paid", paid(invoice_id, stripe_customer))
    await relay(client, second)
    await wait_applied(db, second)

    assert await balance(db, customer_id) == 0
    await no_dead_letters(db)


# --------------------------------------------------------------------------- forgeries


def _without(key: str):
    def make(body: dict) -> str:
        body.pop(key)
        return json.dumps(body)

    return make


def _flip_amount(payload: bytes) -> bytes:
    index = payload.index(b'"amount_paid": 4900') + len(b'"amount_paid": 4')
    return payload[:index] + bytes([payload[index] ^ 0x01]) + payload[index + 1 :]  # 4900 -> 4800


FORGERIES = {
    "wrong-secret": lambda body: signed(body, "whsec_" + uuid.uuid4().hex),
    "flipped-byte": lambda body: (lambda p, h: (_flip_amount(p), h))(*signed(body, NEW_SECRET)),
    "stale-timestamp": lambda body: signed(body, NEW_SECRET, timestamp=ago(301)),
    "missing-header": lambda body: (signed(body, NEW_SECRET)[0], {"Content-Type": "application/json"}),
    "malformed-header": lambda body: (
        signed(body, NEW_SECRET)[0],
        {"Stripe-Signature": "this is not a signature", "Content-Type": "application/json"},
    ),
    "other-scheme-only": lambda body: (
        signed(body, NEW_SECRET)[0],
        {
            "Stripe-Signature": signed(body, NEW_SECRET)[1]["Stripe-Signature"].replace(",v1=", ",v0="),
            "Content-Type": "application/json",
        },
    ),
    "signed-no-id": lambda body: signed(_without("id")(body), NEW_SECRET),
    "signed-no-type": lambda body: signed(_without("type")(body), NEW_SECRET),
    "signed-no-data": lambda body: signed(_without("data")(body), NEW_SECRET),
    "signed-not-an-event": lambda body: signed({"hello": "world"}, NEW_SECRET),
    "signed-not-json": lambda body: signed("not json at all", NEW_SECRET),
}
REASONS = {
    "wrong-secret": "signature does not match",
    "flipped-byte": "signature does not match",
    "stale-timestamp": "timestamp outside the tolerance",
    "missing-header": "missing Stripe-Signature header",
    "malformed-header": "malformed Stripe-Signature header",
    "other-scheme-only": "signature does not match",
    "signed-no-id": "malformed event: id",
    "signed-no-type": "malformed event: type",
    "signed-no-data": "malformed event: data",
    "signed-not-an-event": "malformed event",
    "signed-not-json": "malformed event",
}


@pytest.mark.parametrize("forgery", FORGERIES, ids=FORGERIES.keys())
async def test_forged_stale_or_malformed_deliveries_are_400_and_record_nothing(db, client, forgery):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = event("invoice.paid", paid(invoice_id, stripe_customer))
    payload, headers = FORGERIES[forgery](body)

    response = await client.post(WEBHOOK, content=payload, headers=headers)

    assert response.status_code == 400, response.text
    assert REASONS[forgery] in response.json()["detail"]
    assert [r.type for r in await stripe_event_rows(db)] == ["customer.created"]
    # Had anything been published, the worker would have issued the credits by now.
    await asyncio.sleep(0.3)
    assert await balance(db, customer_id) is None


@pytest.mark.parametrize("secret", ["old", "new"])
async def test_both_the_old_and_the_new_secret_are_accepted(db, client, secret):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(
        client,
        event("invoice.paid", paid(invoice_id, stripe_customer)),
        secret=OLD_SECRET if secret == "old" else NEW_SECRET,
    )
    await wait_balance(db, customer_id, 10)


async def test_a_header_carrying_a_signature_per_secret_is_accepted(db, client):
    """While a secret is rolled, Stripe signs with each active secret in one header: t=...,v1=<old>,v1=<new>."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = json.dumps(event("invoice.paid", paid(invoice_id, stripe_customer)))
    now = int(time.time())
    unknown = hmac.new(("whsec_" + uuid.uuid4().hex).encode(), f"{now}.{body}".encode(), hashlib.sha256).hexdigest()
    genuine = hmac.new(OLD_SECRET.encode(), f"{now}.{body}".encode(), hashlib.sha256).hexdigest()
    headers = {"Stripe-Signature": f"t={now},v1={unknown},v1={genuine}", "Content-Type": "application/json"}
    response = await client.post(WEBHOOK, content=body.encode(), headers=headers)
    assert response.status_code == 200, response.text
    await wait_balance(db, customer_id, 10)


async def test_an_unused_event_type_is_ignored(db, client):
    product = {"id": "prod_" + uuid.uuid4().hex[:8], "object": "product", "name": "Basic"}
    body = await relay(client, event("product.created", product), outcome="ignored")
    assert body["detail"] == "product.created is not used"
    [row] = await stripe_event_rows(db)
    assert (row.type, row.outcome, row.stripe_customer_id) == ("product.created", "ignored", None)
    assert row.resolved_at is not None


async def test_without_webhook_secrets_the_route_is_503(pg_url, redis_url):
    """Checked in process (the route answers before touching the database or Redis)."""
    for secrets_, redis in (((), redis_url), ((NEW_SECRET,), None)):
        settings = load_settings(
            database_url=pg_url,
            redis_url=redis,
            admin_api_token=ADMIN_TOKEN,
            frontend_api_token=FRONTEND_TOKEN,
            stripe_webhook_secrets=secrets_,
        )
        app = create_app(settings)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
                payload, headers = signed(event("product.created", {"id": "prod_1", "object": "product"}), NEW_SECRET)
                response = await http.post(WEBHOOK, content=payload, headers=headers)
        finally:
            if app.state.broker is not None:
                app.state.broker.close()
        assert response.status_code == 503, response.text
        assert ("STRIPE_WEBHOOK_SECRETS" if not secrets_ else "REDIS_URL") in response.json()["detail"]


# --------------------------------------------------------------------------- payment failed


async def test_payment_failed_opens_a_dunning_case_and_the_customer_sees_a_notice(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = event(
        "invoice.payment_failed",
        failed(
            invoice_id, stripe_customer, decline_code="insufficient_funds", message="Your card has insufficient funds."
        ),
    )

    await relay(client, body)
    case = await wait_case(db, invoice_id)

    failed_at = moment(body["created"])
    assert case.customer_id == customer_id
    assert case.status == "retrying"
    assert case.first_failed_at == failed_at
    assert case.next_retry_at == failed_at + timedelta(days=1)
    assert case.hosted_invoice_url == f"https://invoice.stripe.com/i/acct_1/{invoice_id}"
    assert (case.last_decline_code, case.last_failure_message) == (
        "insufficient_funds",
        "Your card has insufficient funds.",
    )
    assert case.subscription_id == "sub_1"

    response = await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)
    assert response.status_code == 200, response.text
    notice = response.json()
    assert notice["kind"] == "payment_failed"
    assert datetime.fromisoformat(notice["next_retry_at"]) == failed_at + timedelta(days=1)
    assert notice["attempts_left"] == 4
    assert notice["decline_code"] == "insufficient_funds"
    assert notice["failure_reason"] == "Your card has insufficient funds."
    assert notice["actions"] == [
        {"type": "update_payment_method", "url": case.hosted_invoice_url, "method": None, "path": None},
        {"type": "retry_payment", "url": None, "method": "POST", "path": f"/api/customers/{customer_id}/payment-retry"},
    ]


async def test_a_failure_reported_after_the_payment_never_opens_a_case(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer)))
    await wait_balance(db, customer_id, 10)

    late = event(
        "invoice.payment_failed",
        failed(invoice_id, stripe_customer, decline_code="insufficient_funds"),
        created=ago(60),
    )
    await relay(client, late)
    await wait_applied(db, late)

    assert await case_of(db, invoice_id) is None
    notice = (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()
    assert notice["kind"] == "none"


async def test_a_late_failure_for_a_paid_invoice_whose_credits_are_spent_opens_no_case(db, client):
    """BUG: the "already paid" check looks for the payment's lot among the open lots only; once the
    credits are spent, a failure reported late opens a dunning case for an invoice that is paid,
    and the customer is told their payment failed."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer)))
    await wait_balance(db, customer_id, 10)
    spent = JobCompleted(
        event_id=f"job-{uuid.uuid4().hex}",
        customer_id=customer_id,
        occurred_at=datetime.now(UTC),
        job_id="j-all",
        credits=10,
    )
    assert await handlers.apply_event(spent, SqlUnitOfWork(db), POLICY) == handlers.Outcome.APPLIED

    late = event(
        "invoice.payment_failed",
        failed(invoice_id, stripe_customer, decline_code="insufficient_funds"),
        created=ago(60),
    )
    await relay(client, late)
    await wait_applied(db, late)

    assert await case_of(db, invoice_id) is None, "a dunning case was opened for a paid invoice"
    assert (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()["kind"] != "payment_failed"


async def test_an_older_failure_after_the_payment_never_reopens_the_case(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(
        client,
        event(
            "invoice.payment_failed",
            failed(invoice_id, stripe_customer, decline_code="insufficient_funds"),
            created=ago(120),
        ),
    )
    await wait_case(db, invoice_id)
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer)))
    recovered = await wait_case(db, invoice_id, lambda case: case.status == "recovered")

    # Stripe's retry that failed a minute ago, delivered last.
    late = event(
        "invoice.payment_failed", failed(invoice_id, stripe_customer, decline_code="do_not_honor"), created=ago(60)
    )
    await relay(client, late)
    await wait_applied(db, late)

    case = await case_of(db, invoice_id)
    assert case.status == "recovered"
    assert (case.closed_at, case.next_retry_at) == (recovered.closed_at, None)
    assert case.last_decline_code == "insufficient_funds"
    assert await balance(db, customer_id) == 10
    assert (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()["kind"] == "none"


async def test_an_older_failure_does_not_overwrite_the_newer_decline(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    newer = event(
        "invoice.payment_failed",
        failed(invoice_id, stripe_customer, decline_code="insufficient_funds", message="newer"),
        created=ago(30),
    )
    older = event(
        "invoice.payment_failed",
        failed(invoice_id, stripe_customer, decline_code="try_again_later", message="older"),
        created=ago(90),
    )

    await relay(client, newer)
    await wait_case(db, invoice_id)
    await relay(client, older)
    await wait_applied(db, older)

    case = await case_of(db, invoice_id)
    assert case.status == "retrying"
    assert (case.last_decline_code, case.last_failure_message, case.last_failure_at) == (
        "insufficient_funds",
        "newer",
        moment(newer["created"]),
    )
    notice = (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()
    assert (notice["decline_code"], notice["failure_reason"]) == ("insufficient_funds", "newer")


async def test_payment_action_required_asks_the_customer_to_confirm(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(client, event("invoice.payment_action_required", invoice(invoice_id, stripe_customer)))
    case = await wait_case(db, invoice_id)

    assert (case.status, case.next_retry_at, case.last_decline_code) == (
        "action_required",
        None,
        "authentication_required",
    )
    notice = (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()
    assert notice["kind"] == "action_required"
    # Retrying without the customer cannot succeed: only the hosted page is offered.
    assert notice["actions"] == [
        {"type": "update_payment_method", "url": case.hosted_invoice_url, "method": None, "path": None}
    ]


# --------------------------------------------------------------------------- unknown Stripe customers


async def test_an_event_for_an_unknown_stripe_customer_is_parked_until_an_admin_links_it(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    body = event("invoice.paid", paid(invoice_id, stripe_customer))

    parked = await relay(client, body, outcome="parked")
    assert stripe_customer in parked["detail"]

    listing = await client.get("/api/admin/stripe-events/parked", headers=ADMIN)
    assert listing.status_code == 200, listing.text
    [entry] = listing.json()
    assert (entry["event_id"], entry["type"], entry["stripe_customer_id"]) == (
        body["id"],
        "invoice.paid",
        stripe_customer,
    )
    assert (
        entry["detail"]
        == f"unknown Stripe customer {stripe_customer!r}: link it to a customer (PUT /api/admin/stripe-customers/{stripe_customer})"
    )
    assert (await client.get("/api/admin/stripe-events/parked", headers=FRONT)).status_code == 401
    await asyncio.sleep(0.3)
    assert await balance(db, customer_id) is None

    linked = await client.put(
        f"/api/admin/stripe-customers/{stripe_customer}", json={"customer_id": customer_id}, headers=ADMIN
    )
    assert linked.status_code == 200, linked.text
    assert linked.json() == {
        "stripe_customer_id": stripe_customer,
        "customer_id": customer_id,
        "parked_events_relayed": 1,
    }
    await wait_balance(db, customer_id, 10)
    assert (await client.get("/api/admin/stripe-events/parked", headers=ADMIN)).json() == []
    [row] = await stripe_event_rows(db)
    assert (row.outcome, row.detail) == ("relayed", None)
    assert row.resolved_at is not None

    # Linking the same pair again is harmless; linking it to someone else is refused.
    again = await client.put(
        f"/api/admin/stripe-customers/{stripe_customer}", json={"customer_id": customer_id}, headers=ADMIN
    )
    assert again.status_code == 200 and again.json()["parked_events_relayed"] == 0
    other = await client.put(
        f"/api/admin/stripe-customers/{stripe_customer}", json={"customer_id": "someone-else"}, headers=ADMIN
    )
    assert other.status_code == 409, other.text
    # Nor may our customer be linked to a second Stripe customer.
    second = await client.put(
        f"/api/admin/stripe-customers/cus_{uuid.uuid4().hex[:10]}", json={"customer_id": customer_id}, headers=ADMIN
    )
    assert second.status_code == 409, second.text
    assert await balance(db, customer_id) == 10


async def test_customer_created_with_our_id_links_and_relays_what_was_parked(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer, created=ago(5))), outcome="parked")
    await relay(client, event("invoice.payment_failed", failed(f"{invoice_id}_2", stripe_customer)), outcome="parked")

    await link(client, stripe_customer, customer_id)

    await wait_balance(db, customer_id, 10)
    await wait_case(db, f"{invoice_id}_2")
    assert (await client.get("/api/admin/stripe-events/parked", headers=ADMIN)).json() == []


async def test_customer_created_naming_an_already_linked_customer_is_parked(db, client):
    customer_id, stripe_customer, _ = ids()
    await link(client, stripe_customer, customer_id)
    impostor = f"cus_{uuid.uuid4().hex[:12]}"
    obj = {"id": impostor, "object": "customer", "metadata": {"customer_id": customer_id}}

    body = await relay(client, event("customer.created", obj), outcome="parked")

    assert body["detail"] == f"customer {customer_id!r} is already linked to another Stripe customer"
    [entry] = (await client.get("/api/admin/stripe-events/parked", headers=ADMIN)).json()
    assert entry["stripe_customer_id"] == impostor
    # Payments of the other Stripe customer are not credited to ours.
    _, _, invoice_id = ids()
    await relay(client, event("invoice.paid", paid(invoice_id, impostor)), outcome="parked")


async def test_admin_relay_retranslates_every_parked_event(db, client):
    """POST /api/admin/stripe-events/parked/relay: what is still unknown stays parked."""
    customer_id, stripe_customer, invoice_id = ids()
    body = event("invoice.paid", paid(invoice_id, stripe_customer))
    await relay(client, body, outcome="parked")

    still = await client.post("/api/admin/stripe-events/parked/relay", headers=ADMIN)
    assert still.status_code == 200, still.text
    assert [r["outcome"] for r in still.json()] == ["parked"]

    async with db.begin() as connection:  # linked behind the relay's back (say, by a migration)
        await connection.execute(
            stripe_customers.insert().values(stripe_customer_id=stripe_customer, customer_id=customer_id)
        )
    relayed = await client.post("/api/admin/stripe-events/parked/relay", headers=ADMIN)
    assert [r["outcome"] for r in relayed.json()] == ["relayed"]
    await wait_balance(db, customer_id, 10)


# --------------------------------------------------------------------------- refunds and disputes


@SHAPES
async def test_refunds_take_back_credits_in_proportion_once(db, client, legacy_shape):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    intent, charge_id = await pay_invoice(client, stripe_customer, invoice_id, legacy_shape)
    await wait_balance(db, customer_id, 10)
    on_invoice = invoice_id if legacy_shape else None

    partial = event(
        "charge.refunded",
        charge(charge_id, stripe_customer, amount_refunded=2450, payment_intent=intent, invoice_id=on_invoice),
    )
    await relay(client, partial)
    await wait_balance(db, customer_id, 5, "half the payment's credits to be taken back")

    assert (await deliver(client, partial)).json()["outcome"] == "duplicate"
    # The partial refund reported again (a new event id): the total stated is cumulative, nothing more is taken.
    replay = event(
        "charge.refunded",
        charge(charge_id, stripe_customer, amount_refunded=2450, payment_intent=intent, invoice_id=on_invoice),
    )
    await relay(client, replay)
    await wait_applied(db, replay)
    assert await balance(db, customer_id) == 5

    full = event(
        "charge.refunded",
        charge(charge_id, stripe_customer, amount_refunded=4900, payment_intent=intent, invoice_id=on_invoice),
    )
    await relay(client, full)
    await wait_balance(db, customer_id, 0, "the rest to be taken back")
    await wait_applied(db, full)

    [lot] = await rows(db, select(credit_lots).where(credit_lots.c.customer_id == customer_id))
    assert (lot.amount, lot.remaining, lot.reversed) == (10, 0, 10)
    reversals = await rows(
        db,
        select(ledger_entries)
        .where(ledger_entries.c.customer_id == customer_id, ledger_entries.c.kind == "reversed")
        .order_by(ledger_entries.c.id),
    )
    assert [(e.credits, e.note) for e in reversals] == [(-5, f"payment {invoice_id} refunded")] * 2
    assert await scalar(db, select(customers.c.overdraft).where(customers.c.customer_id == customer_id)) == 0
    await no_dead_letters(db)
    assert await reconciliation(db) == []


async def test_a_late_refund_report_after_the_payment_was_fully_reversed_takes_nothing(db, client):
    """BUG: a payment lot with nothing left (spent, reversed, expired) is not loaded, so a reversal
    reported after the full refund raises PaymentNotApplied on every try and is dead-lettered,
    instead of being recorded as "nothing left to take"."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    intent, charge_id = await pay_invoice(client, stripe_customer, invoice_id, legacy_shape=True)
    await wait_balance(db, customer_id, 10)
    await relay(
        client,
        event("charge.refunded", charge(charge_id, stripe_customer, amount_refunded=4900, payment_intent=intent)),
    )
    await wait_balance(db, customer_id, 0)

    late = event(
        "charge.refunded",
        charge(charge_id, stripe_customer, amount_refunded=2450, payment_intent=intent),
        created=ago(60),
    )
    await relay(client, late)
    await wait_applied(db, late)

    assert await balance(db, customer_id) == 0
    await no_dead_letters(db)


async def test_refunding_spent_credits_leaves_an_overdraft(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    intent, charge_id = await pay_invoice(client, stripe_customer, invoice_id, legacy_shape=True)
    await wait_balance(db, customer_id, 10)
    spent = JobCompleted(
        event_id=f"job-{uuid.uuid4().hex}",
        customer_id=customer_id,
        occurred_at=datetime.now(UTC),
        job_id="j-1",
        credits=8,
    )
    assert await handlers.apply_event(spent, SqlUnitOfWork(db), POLICY) == handlers.Outcome.APPLIED

    await relay(
        client,
        event("charge.refunded", charge(charge_id, stripe_customer, amount_refunded=4900, payment_intent=intent)),
    )
    await wait_balance(db, customer_id, -8)

    assert await scalar(db, select(customers.c.overdraft).where(customers.c.customer_id == customer_id)) == 8
    [lot] = await rows(db, select(credit_lots).where(credit_lots.c.customer_id == customer_id))
    assert (lot.remaining, lot.reversed) == (0, 10)
    assert await reconciliation(db) == []

    # The next payment repays the overdraft first.
    _, _, next_invoice = ids()
    await relay(client, event("invoice.paid", paid(next_invoice, stripe_customer, legacy_shape=True)))
    await wait_balance(db, customer_id, 2)
    assert await scalar(db, select(customers.c.overdraft).where(customers.c.customer_id == customer_id)) == 0
    assert await reconciliation(db) == []


async def test_disputing_a_payment_whose_credits_are_all_spent_leaves_an_overdraft(db, client):
    """BUG: buy credits, spend them all, dispute the charge — the credits are never taken back.

    The account repository loads open lots only and ignores the `payment_ids` it is given, so
    the spent payment lot is invisible: PaymentReversed raises PaymentNotApplied until it is
    dead-lettered, and no overdraft is ever recorded.
    """
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    intent, charge_id = await pay_invoice(client, stripe_customer, invoice_id, legacy_shape=True)
    await wait_balance(db, customer_id, 10)
    spent = JobCompleted(
        event_id=f"job-{uuid.uuid4().hex}",
        customer_id=customer_id,
        occurred_at=datetime.now(UTC),
        job_id="j-all",
        credits=10,
    )
    assert await handlers.apply_event(spent, SqlUnitOfWork(db), POLICY) == handlers.Outcome.APPLIED

    dispute = {
        "id": f"dp_{invoice_id}",
        "object": "dispute",
        "charge": charge_id,
        "payment_intent": intent,
        "amount": 4900,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
    }
    disputed = event("charge.dispute.created", dispute)
    await relay(client, disputed)
    await wait_applied(db, disputed)

    assert await balance(db, customer_id) == -10
    assert await scalar(db, select(customers.c.overdraft).where(customers.c.customer_id == customer_id)) == 10
    await no_dead_letters(db)
    assert await reconciliation(db) == []


async def test_refunding_a_payment_whose_credits_expired_unused_writes_them_off(db, client):
    """BUG (same root cause): LEDGER_RULES says credits that expired unused are written off by a
    reversal. Once the expiry sweep has emptied the lot, it is not loaded any more, and the refund
    raises PaymentNotApplied until it is dead-lettered."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    paid_at = ago(395 * 86400)  # expired a month ago; still inside the 400-day event window
    body = paid(invoice_id, stripe_customer, created=paid_at, legacy_shape=True)
    await relay(client, event("invoice.paid", body))
    await wait_balance(db, customer_id, 10)
    swept = await handlers.expire_due_credits(lambda: SqlUnitOfWork(db), datetime.now(UTC), batch_size=100)
    assert swept.entries >= 1
    assert await balance(db, customer_id) == 0

    refund = event(
        "charge.refunded",
        charge(f"ch_{invoice_id}", stripe_customer, amount_refunded=4900, payment_intent=f"pi_{invoice_id}"),
    )
    await relay(client, refund)
    await wait_applied(db, refund)

    assert await balance(db, customer_id) == 0
    assert await scalar(db, select(customers.c.overdraft).where(customers.c.customer_id == customer_id)) == 0
    await no_dead_letters(db)
    assert await reconciliation(db) == []


@SHAPES
async def test_a_dispute_takes_back_the_credits(db, client, legacy_shape):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    intent, charge_id = await pay_invoice(client, stripe_customer, invoice_id, legacy_shape)
    await wait_balance(db, customer_id, 10)

    dispute = {
        "id": f"dp_{invoice_id}",
        "object": "dispute",
        "charge": charge_id,
        "payment_intent": intent,
        "amount": 4900,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
    }
    await relay(client, event("charge.dispute.created", dispute))
    await wait_balance(db, customer_id, 0)

    [entry] = await rows(
        db,
        select(ledger_entries).where(ledger_entries.c.customer_id == customer_id, ledger_entries.c.kind == "reversed"),
    )
    assert (entry.credits, entry.note) == (-10, f"payment {invoice_id} disputed")
    assert await reconciliation(db) == []


async def test_a_dispute_of_what_a_partial_refund_left_takes_back_the_rest(db, client):
    """Half the charge refunded, the other half disputed: the merchant keeps no money, so no credit may stay.

    The relay states reversals as a cumulative total per payment, but computes a dispute's
    total from the dispute amount alone (2450 of 4900 → 5 credits), which the refund already
    reached: nothing is taken back and the customer keeps 5 credits paid for by no one.
    """
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    intent, charge_id = await pay_invoice(client, stripe_customer, invoice_id, legacy_shape=True)
    await wait_balance(db, customer_id, 10)
    await relay(
        client,
        event("charge.refunded", charge(charge_id, stripe_customer, amount_refunded=2450, payment_intent=intent)),
    )
    await wait_balance(db, customer_id, 5)

    dispute = {
        "id": f"dp_{invoice_id}",
        "object": "dispute",
        "charge": charge_id,
        "payment_intent": intent,
        "amount": 2450,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
    }
    disputed = event("charge.dispute.created", dispute)
    await relay(client, disputed)
    await wait_applied(db, disputed)

    assert await balance(db, customer_id) == 0, "the disputed half of the payment still has its credits"


async def test_a_refund_for_an_unknown_charge_is_parked(db, client):
    customer_id, stripe_customer, _ = ids()
    await link(client, stripe_customer, customer_id)
    body = event(
        "charge.refunded",
        charge(
            "ch_" + uuid.uuid4().hex[:10],
            stripe_customer,
            amount_refunded=4900,
            payment_intent="pi_" + uuid.uuid4().hex[:10],
        ),
    )

    parked = await relay(client, body, outcome="parked")

    assert "no paid invoice known for this charge" in parked["detail"]
    [entry] = (await client.get("/api/admin/stripe-events/parked", headers=ADMIN)).json()
    assert (entry["event_id"], entry["type"], entry["stripe_customer_id"]) == (
        body["id"],
        "charge.refunded",
        stripe_customer,
    )
    assert entry["detail"] == parked["detail"]


# --------------------------------------------------------------------------- payment method


def _customer_updated(stripe_customer: str, customer_id: str, method: str) -> dict:
    obj = {
        "id": stripe_customer,
        "object": "customer",
        "metadata": {"customer_id": customer_id},
        "invoice_settings": {"default_payment_method": method},
    }
    return event(
        "customer.updated", obj, previous_attributes={"invoice_settings": {"default_payment_method": "pm_old"}}
    )


def _attached(stripe_customer: str, customer_id: str, method: str) -> dict:
    return event(
        "payment_method.attached",
        {"id": method, "object": "payment_method", "type": "card", "customer": stripe_customer},
    )


METHOD_EVENTS = {"customer.updated": _customer_updated, "payment_method.attached": _attached}


@pytest.mark.parametrize("make", METHOD_EVENTS.values(), ids=METHOD_EVENTS.keys())
async def test_a_new_payment_method_requests_an_immediate_charge_of_the_open_case(db, client, make):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(
        client, event("invoice.payment_failed", failed(invoice_id, stripe_customer, decline_code="insufficient_funds"))
    )
    case = await wait_case(db, invoice_id)

    body = make(stripe_customer, customer_id, "pm_new")
    await relay(client, body)
    await wait_applied(db, body)

    [attempt] = await rows(db, select(payment_attempts).where(payment_attempts.c.case_id == case.id))
    assert (attempt.kind, attempt.number) == ("payment_method", None)
    assert attempt.requested_at == moment(body["created"])
    # No STRIPE_API_KEY in the workers: the attempt waits, pending, for a worker that can charge.
    assert (attempt.finished_at, attempt.outcome) == (None, None)
    assert (await case_of(db, invoice_id)).status == "retrying"  # no scheduled retry used up


async def test_a_new_payment_method_with_nothing_owed_requests_nothing(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(client, event("invoice.paid", paid(invoice_id, stripe_customer)))
    await wait_balance(db, customer_id, 10)

    body = _customer_updated(stripe_customer, customer_id, "pm_new")
    await relay(client, body)
    await wait_applied(db, body)
    assert await rows(db, select(payment_attempts)) == []


async def test_customer_updated_without_a_payment_method_change_is_ignored(db, client):
    customer_id, stripe_customer, _ = ids()
    await link(client, stripe_customer, customer_id)
    obj = {
        "id": stripe_customer,
        "object": "customer",
        "metadata": {"customer_id": customer_id},
        "email": "new@example.com",
    }
    body = await relay(
        client, event("customer.updated", obj, previous_attributes={"email": "old@example.com"}), outcome="ignored"
    )
    assert body["detail"] == "no change we use"


# --------------------------------------------------------------------------- card changes, voided invoices, parked payments, malformed bodies


async def test_one_card_change_reported_twice_requests_one_charge_with_that_card(db, client):
    """A card change sends payment_method.attached and customer.updated for the same card."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(client, event("invoice.payment_failed", failed(invoice_id, stripe_customer, decline_code="lost_card")))
    case = await wait_case(db, invoice_id, lambda case: case.status == "needs_payment_method")

    for body in (
        _attached(stripe_customer, customer_id, "pm_card"),
        _customer_updated(stripe_customer, customer_id, "pm_card"),
    ):
        await relay(client, body)
        await wait_applied(db, body)

    [attempt] = await rows(db, select(payment_attempts).where(payment_attempts.c.case_id == case.id))
    assert (attempt.kind, attempt.payment_method_id, attempt.outcome) == ("payment_method", "pm_card", None)
    await no_dead_letters(db)


@pytest.mark.parametrize(
    ("stripe_type", "status", "reason"),
    [("invoice.voided", "void", "voided"), ("invoice.marked_uncollectible", "uncollectible", "uncollectible")],
)
async def test_a_voided_or_written_off_invoice_closes_its_case(db, client, stripe_type, status, reason):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    await relay(
        client,
        event(
            "invoice.payment_failed",
            failed(invoice_id, stripe_customer, decline_code="insufficient_funds"),
            created=ago(60),
        ),
    )
    await wait_case(db, invoice_id)
    assert (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()["kind"] == "payment_failed"

    closing = event(stripe_type, invoice(invoice_id, stripe_customer, status=status))
    await relay(client, closing)
    case = await wait_case(db, invoice_id, lambda case: case.status != "retrying")

    assert (case.status, case.next_retry_at) == ("closed", None)
    assert case.closed_at == moment(closing["created"])
    assert case.last_failure_message == f"invoice {reason} at the provider"
    notice = (await client.get(f"/api/customers/{customer_id}/notice", headers=FRONT)).json()
    assert notice["kind"] == "no_credits"  # nothing owed; the customer simply has no credits
    retry = await client.post(f"/api/customers/{customer_id}/payment-retry", headers=FRONT)
    assert retry.status_code == 409, retry.text
    assert await rows(db, select(payment_attempts)) == []
    report = (await client.get("/api/admin/dunning-report", headers=ADMIN)).json()
    assert invoice_id not in [row["invoice_id"] for row in report["invoices"]]
    await no_dead_letters(db)


async def test_a_refund_of_a_parked_payment_is_parked_with_it_and_both_stay_parked_on_relay(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    paid_body = event(
        "invoice.paid", paid(invoice_id, stripe_customer, price="price_unknown", legacy_shape=True), created=ago(30)
    )
    await relay(client, paid_body, outcome="parked")

    refund = event(
        "charge.refunded",
        charge(f"ch_{invoice_id}", stripe_customer, amount_refunded=4900, payment_intent=f"pi_{invoice_id}"),
    )
    parked = await relay(client, refund, outcome="parked")
    assert (
        parked["detail"]
        == f"the credits of invoice {invoice_id} are not known yet: relay the parked events once its invoice.paid is relayed"
    )

    listing = (await client.get("/api/admin/stripe-events/parked", headers=ADMIN)).json()
    assert [(e["event_id"], e["type"]) for e in listing] == [
        (paid_body["id"], "invoice.paid"),
        (refund["id"], "charge.refunded"),
    ]

    relayed = await client.post("/api/admin/stripe-events/parked/relay", headers=ADMIN)
    assert relayed.status_code == 200, relayed.text
    assert [r["outcome"] for r in relayed.json()] == ["parked", "parked"]
    after = (await client.get("/api/admin/stripe-events/parked", headers=ADMIN)).json()
    assert [(e["event_id"], e["detail"]) for e in after] == [(e["event_id"], e["detail"]) for e in listing]
    assert "STRIPE_PLAN_CREDITS" in after[0]["detail"]
    assert after[1]["detail"] == parked["detail"]
    await asyncio.sleep(0.3)
    assert await balance(db, customer_id) is None  # nothing issued, nothing reversed
    assert await rows(db, select(ledger_entries).where(ledger_entries.c.customer_id == customer_id)) == []


def _line(line_id: str, *, quantity: int, amount: int, price: str = "price_basic", **extra) -> dict:
    return {
        "id": line_id,
        "object": "line_item",
        "quantity": quantity,
        "amount": amount,
        "pricing": {"type": "price_details", "price_details": {"price": price, "product": "prod_1"}},
        **extra,
    }


async def test_proration_lines_carry_no_credits(db, client):
    """A mid-period upgrade: the unused time credited back, the remaining time charged, the new period."""
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = paid(invoice_id, stripe_customer)
    body["lines"]["data"] = [
        _line("il_unused", quantity=1, amount=-2450, proration=True),
        _line(
            "il_remaining",
            quantity=2,
            amount=4900,
            parent={
                "type": "subscription_item_details",
                "subscription_item_details": {"proration": True, "subscription": "sub_1"},
            },
        ),
        _line("il_remaining_legacy", quantity=3, amount=1000, proration=True),
        _line("il_period", quantity=1, amount=4900),
    ]
    first = event("invoice.paid", body)
    await relay(client, first)
    await wait_applied(db, first)

    assert await balance(db, customer_id) == 10
    [lot] = await rows(db, select(credit_lots).where(credit_lots.c.customer_id == customer_id))
    assert (lot.amount, lot.payment_id) == (10, invoice_id)


async def test_an_invoice_whose_lines_do_not_all_come_with_the_event_is_parked(db, client):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = paid(invoice_id, stripe_customer, quantity=2)
    body["lines"]["has_more"] = True

    parked = await relay(client, event("invoice.paid", body), outcome="parked")

    assert "no credits known" in parked["detail"]
    await asyncio.sleep(0.3)
    assert await balance(db, customer_id) is None


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
async def test_a_webhook_body_over_a_megabyte_is_413_and_records_nothing(db, client, streamed):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = paid(invoice_id, stripe_customer)
    body["metadata"] = {"padding": "x" * 1_000_000}
    payload, headers = signed(event("invoice.paid", body), NEW_SECRET)
    assert len(payload) > 1_000_000

    if streamed:

        async def chunks():
            for start in range(0, len(payload), 64 * 1024):
                yield payload[start : start + 64 * 1024]

        response = await client.post(WEBHOOK, content=chunks(), headers=headers)
    else:
        response = await client.post(WEBHOOK, content=payload, headers=headers)

    assert response.status_code == 413, response.text
    assert [r.type for r in await stripe_event_rows(db)] == ["customer.created"]
    await asyncio.sleep(0.3)
    assert await balance(db, customer_id) is None

    # Just under the cap, the same kind of delivery is accepted.
    body["metadata"] = {"padding": "x" * 990_000}
    payload, headers = signed(event("invoice.paid", body), NEW_SECRET)
    assert len(payload) < 1_000_000
    assert (await client.post(WEBHOOK, content=payload, headers=headers)).status_code == 200
    await wait_balance(db, customer_id, 10)


@pytest.mark.parametrize(
    "lines",
    [{"object": "list", "data": ["il_1"], "has_more": False}, ["il_1"], "il_1"],
    ids=["ids-in-data", "list", "string"],
)
async def test_invoice_lines_that_are_not_objects_are_parked_not_a_500(db, client, lines):
    customer_id, stripe_customer, invoice_id = ids()
    await link(client, stripe_customer, customer_id)
    body = paid(invoice_id, stripe_customer)
    body["lines"] = lines
    delivery = event("invoice.paid", body)

    response = await deliver(client, delivery)

    assert response.status_code == 200, response.text
    assert response.json()["outcome"] == "parked"
    [row] = [r for r in await stripe_event_rows(db) if r.event_id == delivery["id"]]
    assert (row.outcome, row.resolved_at) == ("parked", None)
    assert (await deliver(client, delivery)).json()["outcome"] == "duplicate"
    assert await balance(db, customer_id) is None


async def test_a_payment_already_issued_to_another_customer_is_dead_lettered(db, client):
    """The same invoice reported for two Stripe customers (two of ours): the second is refused."""
    first_customer, first_stripe, invoice_id = ids()
    second_customer, second_stripe, _ = ids()
    await link(client, first_stripe, first_customer)
    await link(client, second_stripe, second_customer)
    await relay(client, event("invoice.paid", paid(invoice_id, first_stripe)))
    await wait_balance(db, first_customer, 10)

    stolen = event("invoice.paid", paid(invoice_id, second_stripe))
    await relay(client, stolen)

    async def dead_lettered() -> bool:
        return any(f"stripe:{stolen['id']}" in r.message for r in await rows(db, select(dead_letters)))

    await eventually(dead_lettered, timeout=20, message="the second customer's PaymentSucceeded to be dead-lettered")
    [letter] = await rows(db, select(dead_letters))
    assert "uq_credit_lots_payment" in letter.error
    assert await balance(db, first_customer) == 10
    assert await balance(db, second_customer) is None
    assert await rows(db, select(credit_lots).where(credit_lots.c.customer_id == second_customer)) == []
