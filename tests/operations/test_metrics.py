"""Prometheus metrics, scraped from real processes and parsed with prometheus-client's parser.

The workers' port (Dramatiq's exposition server, multiprocess files of two worker processes)
and the web's /metrics (figures read from PostgreSQL at scrape time).
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, insert, select

from api.app import create_app
from infra import metrics as catalogue
from infra.db.tables import customers, dead_letters, dunning_cases, notifications, payouts, processed_events
from infra.settings import load_settings
from messages import JobCompleted, PaymentSucceeded, Publisher
from tests.support import eventually, free_port, wait_until
from tests.support.web import clean_env, start_web_server

ADMIN_TOKEN = "admin-token-for-metrics-tests"
FRONTEND_TOKEN = "frontend-token-for-metrics-tests"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def parse(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, sample: str, **labels: str) -> float:
    """The sum of the samples named ``sample`` whose labels include ``labels`` (0 if none)."""
    family = families.get(
        sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    )
    if family is None:
        family = families.get(sample)
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name == sample and labels.items() <= s.labels.items())


def scrape(url: str, **headers: str) -> dict:
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return parse(response.text)


def payment(event_id: str, customer: str, credits: int = 10) -> PaymentSucceeded:
    return PaymentSucceeded(
        event_id=event_id, customer_id=customer, occurred_at=T0, payment_id=f"in_{event_id}", credits=credits
    )


def job(event_id: str, customer: str) -> JobCompleted:
    return JobCompleted(
        event_id=event_id,
        customer_id=customer,
        occurred_at=T0 + timedelta(hours=1),
        job_id=f"job_{event_id}",
        credits=1,
    )


async def count(db, table) -> int:
    async with db.connect() as connection:
        return (await connection.execute(select(func.count()).select_from(table))).scalar_one()


# --------------------------------------------------------------------------- the workers' port


def worker_scrape_shows(url: str, expected: dict[tuple[str, str], float]) -> dict:
    """Poll the workers' port until credits_events_total has ``expected``; return the scrape."""
    seen: dict = {}

    def arrived() -> bool:
        nonlocal seen
        try:
            seen = parse(httpx.get(url, timeout=2).text)
        except httpx.TransportError:
            return False  # the exposition server starts once every worker process has booted
        return all(value(seen, "credits_events_total", type=t, outcome=o) == n for (t, o), n in expected.items())

    wait_until(arrived, timeout=60, interval=0.3, message=f"{url} to show {expected}")
    return seen


async def test_worker_port_serves_dramatiq_and_event_metrics_of_two_processes(db, start_workers, redis_url, tmp_path):
    port = free_port()
    directory = tmp_path / "worker-metrics"
    env = {"METRICS_PORT": str(port), "METRICS_DIR": str(directory)}
    workers = start_workers(processes=2, threads=2, env=env)
    url = f"http://127.0.0.1:{port}/metrics"
    publisher = Publisher.from_url(redis_url)
    try:
        for i in range(30):
            publisher.publish(payment(f"pay-{i}", f"cust-{i}"))
        await eventually(lambda: _has(db, processed_events, 30), timeout=60, message="30 payments applied")
        for i in range(30):
            publisher.publish(job(f"job-{i}", f"cust-{i}"))
        publisher.publish(payment("pay-0", "cust-0"))  # the same event again: a duplicate
        publisher.publish(payment("pay-1", "cust-1", credits=99))  # the same id, another payload: rejected
        expected = {
            ("payment.succeeded", "applied"): 30,
            ("job.completed", "applied"): 30,
            ("payment.succeeded", "duplicate"): 1,
            ("payment.succeeded", "rejected"): 1,
        }
        families = worker_scrape_shows(url, expected)
    finally:
        publisher.close()

    assert value(families, "credits_events_total") == 62, "no other outcome was counted"
    assert value(families, "credits_event_apply_seconds_count", type="payment.succeeded") == 32
    assert value(families, "credits_event_apply_seconds_count", type="job.completed") == 30
    assert value(families, "credits_event_apply_seconds_bucket", type="job.completed", le="+Inf") == 30
    # Lag is measured for applied events only, from the message's publication time.
    assert value(families, "credits_event_lag_seconds_count", type="payment.succeeded") == 30
    assert value(families, "credits_event_lag_seconds_count", type="job.completed") == 30
    assert 0 < value(families, "credits_event_lag_seconds_sum") < 60 * 60
    # Dramatiq's own metrics, from the same exposition server.
    assert value(families, "dramatiq_messages_total", actor_name="apply_event", queue_name="credit_events") == 62
    assert value(families, "dramatiq_message_rejects_total", actor_name="apply_event") == 1
    assert value(families, "dramatiq_message_duration_milliseconds_count", actor_name="apply_event") == 62
    served = set(families)
    required = {m.family for m in catalogue.WORKER_METRICS} - {
        "dramatiq_message_retries",
        "dramatiq_delayed_messages_inprogress",
    }
    assert required <= served, f"not served: {sorted(required - served)}"
    assert "workers.metrics:serve_worker_metrics' is ready for action" in workers.log()
    assert "Unexpected failure" not in workers.log() and "returned a value" not in workers.log()
    # Both worker processes observed events: the port merges their multiprocess files.
    pids = {re.match(r"histogram_(\d+)\.db", p.name).group(1) for p in directory.glob("histogram_*.db")}
    assert len(pids) == 2, f"histogram files of processes {pids}"

    # A new worker run starts from zero: the last run's files are removed, not added in.
    workers.stop()
    start_workers(processes=1, threads=2, env=env)
    publisher = Publisher.from_url(redis_url)
    try:
        publisher.publish(payment("pay-new", "cust-new"))
        families = worker_scrape_shows(url, {("payment.succeeded", "applied"): 1})
    finally:
        publisher.close()
    assert value(families, "credits_events_total") == 1
    assert value(families, "dramatiq_messages_total") == 1


async def _has(db, table, n: int) -> bool:
    return await count(db, table) >= n


def test_worker_metrics_port_zero_serves_nothing(db, start_workers, tmp_path):
    workers = start_workers(processes=1, threads=1, env={"METRICS_PORT": "0", "METRICS_DIR": str(tmp_path / "m")})
    time.sleep(1.5)  # the exposition server's fork process would have started by now
    assert "ready for action" in workers.log()
    assert "serve_worker_metrics" not in workers.log(), "no exposition server"
    assert not (tmp_path / "m").exists(), "no multiprocess files"


# --------------------------------------------------------------------------- the web's /metrics


async def seed_business(db, now: datetime) -> None:
    """Cases, payouts, notifications and customers the figures count (set up directly)."""
    async with db.begin() as connection:
        for i, status in enumerate(("retrying", "retrying", "past_due", "recovered")):
            await connection.execute(
                insert(dunning_cases).values(
                    customer_id=f"dun-{i}", invoice_id=f"in_dun_{i}", status=status, first_failed_at=now
                )
            )
        for i, status in enumerate(("paid", "paid", "failed")):
            await connection.execute(
                insert(payouts).values(
                    payee_id=f"payee-{i}",
                    period="week-2026-03-06",
                    method="manual",
                    gateway="manual",
                    amount_cents=2_000,
                    currency="USD",
                    status=status,
                    idempotency_key=f"payout-{i}",
                    created_at=now,
                )
            )
        for i, (status, due) in enumerate(
            (
                ("pending", now - timedelta(minutes=10)),
                ("pending", now + timedelta(days=1)),
                ("sent", now - timedelta(days=1)),
            )
        ):
            await connection.execute(
                insert(notifications).values(
                    key=f"note-{i}",
                    customer_id="cust-0",
                    kind="test",
                    subject="s",
                    body="b",
                    created_at=now,
                    status=status,
                    send_after=due,
                )
            )
        for i, days in enumerate((30, 20, 3)):
            await connection.execute(
                insert(customers).values(customer_id=f"quiet-{i}", credits_depleted_at=now - timedelta(days=days))
            )


async def test_web_metrics_show_the_business_after_real_workers(db, start_workers, pg_url, redis_url, tmp_path):
    start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    try:
        for i in range(3):
            publisher.publish(payment(f"pay-{i}", f"cust-{i}"))
        await eventually(lambda: _has(db, processed_events, 3), timeout=60, message="payments applied")
        publisher.publish(job("job-0", "cust-0"))
        publisher.publish(job("job-1", "cust-1"))
        publisher.publish(payment("pay-2", "cust-2", credits=99))  # conflicting: dead-lettered
        await eventually(lambda: _has(db, processed_events, 5), timeout=60, message="jobs applied")
        await eventually(lambda: _has(db, dead_letters, 1), timeout=60, message="the conflict dead-lettered")
    finally:
        publisher.close()
    await seed_business(db, datetime.now(UTC))

    env = clean_env(
        DATABASE_URL=pg_url, ADMIN_API_TOKEN=ADMIN_TOKEN, FRONTEND_API_TOKEN=FRONTEND_TOKEN, METRICS_CACHE_SECONDS="0"
    )
    web = start_web_server(env, tmp_path / "web.log")
    try:
        families = scrape(f"{web.base_url}/metrics")
    finally:
        web.stop()

    events = {
        (s.labels["type"], s.labels["outcome"]): s.value
        for s in families["credits_events"].samples
        if s.name == "credits_events_total"
    }
    assert {k: v for k, v in events.items() if v} == {
        ("payment.succeeded", "recorded"): 3,
        ("job.completed", "recorded"): 2,
        ("payment.succeeded", "dead_lettered"): 1,
    }
    assert events[("credits.gifted", "recorded")] == 0, "every known type is served, from zero"
    assert value(families, "credits_dead_letters_total", actor="apply_event") == 1
    assert value(families, "credits_dead_letters_waiting", actor="apply_event") == 1
    assert value(families, "credits_outbox_pending") == 2
    assert 590 <= value(families, "credits_outbox_oldest_due_seconds") <= 700
    assert value(families, "credits_dunning_cases", state="retrying") == 2
    assert value(families, "credits_dunning_cases", state="past_due") == 1
    assert value(families, "credits_dunning_cases", state="action_required") == 0
    assert value(families, "credits_payouts_total", status="paid") == 2
    assert value(families, "credits_payouts_total", status="failed") == 1
    assert value(families, "credits_at_risk_customers") == 2  # depleted 30 and 20 days ago; not 3
    assert value(families, "credits_figures_up") == 1
    served = set(families)
    required = {m.family for m in catalogue.WEB_METRICS}
    assert required <= served, f"not served: {sorted(required - served)}"
    assert not any(name.startswith("dramatiq_") for name in served), "Dramatiq's metrics are the workers'"


# --------------------------------------------------------------------------- bounds: cache, timeout, token


def in_process_app(db, pg_url: str, **settings):
    values = dict(database_url=pg_url, admin_api_token=ADMIN_TOKEN, frontend_api_token=FRONTEND_TOKEN, redis_url=None)
    app = create_app(load_settings(**values, **settings), db=db)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://metrics.test", timeout=10)


async def scrape_app(client, **headers) -> dict:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return parse(response.text)


async def test_web_figures_are_cached_between_scrapes(db, pg_url):
    now = datetime.now(UTC)
    async with in_process_app(db, pg_url, metrics_cache_seconds=60) as client:
        assert value(await scrape_app(client), "credits_at_risk_customers") == 0
        await seed_business(db, now)
        # Many scrapes at once: one read, all served from it.
        scrapes = await asyncio.gather(*(scrape_app(client) for _ in range(20)))
        assert {value(s, "credits_at_risk_customers") for s in scrapes} == {0}
        assert value(scrapes[-1], "credits_figures_age_seconds") > 0
    async with in_process_app(db, pg_url, metrics_cache_seconds=0) as client:
        assert value(await scrape_app(client), "credits_at_risk_customers") == 2


async def test_a_slow_database_fails_the_figures_quickly_not_the_scrape(db, pg_url):
    dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    blocker = await asyncpg.connect(dsn)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE")
        async with in_process_app(db, pg_url, metrics_cache_seconds=0, metrics_query_timeout_ms=300) as client:
            started = time.monotonic()
            families = await scrape_app(client)
            assert time.monotonic() - started < 5
            assert value(families, "credits_figures_up") == 0
            assert "credits_events" not in families, "no stale or partial figures"
            await transaction.rollback()
            assert value(await scrape_app(client), "credits_figures_up") == 1
    finally:
        await blocker.close()


async def test_metrics_token_when_set(db, pg_url):
    token = "scraper-token-0123456789"
    async with in_process_app(db, pg_url, metrics_token=token) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers={"Authorization": "Bearer wrong"})).status_code == 401
        families = await scrape_app(client, Authorization=f"Bearer {token}")
        assert value(families, "credits_figures_up") == 1
    async with in_process_app(db, pg_url) as client:
        assert (await client.get("/metrics")).status_code == 200, "open when METRICS_TOKEN is unset"
