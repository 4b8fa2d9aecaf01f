"""Logs are JSON lines with the message context bound, and never carry emails or tokens.

Checked on real processes: `configure_logging` in a fresh interpreter, a real dramatiq worker
applying (and refusing) events for a customer whose id is an email address, and a real
`credits web` whose access log sees emails in paths and bearer tokens in headers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta

import dramatiq
import httpx
from dramatiq.brokers.redis import RedisBroker

from messages import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE, PaymentSucceeded, Publisher
from tests.support import ROOT, wait_until
from tests.support.logs import (
    EMAIL,
    assert_no_leaks,
    json_lines,
)
from tests.support.web import ADMIN_TOKEN, FRONTEND_TOKEN, start_web_server

# --------------------------------------------------------------------------- configure_logging


LOGGING_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    import structlog
    from pydantic import SecretStr
    from infra.logging import configure_logging

    configure_logging("INFO")
    token = sys.argv[1]
    log = structlog.get_logger("credits.test")
    structlog.contextvars.bind_contextvars(message_id="m-1", actor="apply_event", customer_id="jane.doe@example.com")
    log.info("event_applied", note="paid by jane.doe@example.com")
    log.info("headers", authorization=f"Bearer {token}", admin_api_token=SecretStr(token), frontend_api_token=token, Email="jane.doe@example.com")
    log.info("free text", detail=f"retrying with Authorization: Bearer {token} at postgresql://app:{token}@db/credits")
    log.error("event_rejected", errors=[{"loc": ("job.completed", "jane.doe@example.com"), "msg": "Input tag 'jane.doe@example.com'"}],
              nested={"token": token, "who": ["jane.doe@example.com"]})
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:1", "GET", "/api/customers/jane.doe%40example.com/credits", "1.1", 404)
    try:
        raise RuntimeError(f"cannot charge jane.doe@example.com with Bearer {token}")
    except RuntimeError:
        log.exception("crashed")
        logging.getLogger("dramatiq.worker").exception("stdlib crashed")
    structlog.contextvars.clear_contextvars()
    log.warning("unbound")
    log.debug("below the level")
    """
)


def test_configure_logging_writes_redacted_json_lines():
    token = "tok-" + "s3cr3t" * 4
    result = subprocess.run(
        [sys.executable, "-c", LOGGING_SCRIPT, token], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # logs go to stderr
    records = json_lines(result.stderr)
    assert_no_leaks(result.stderr, token)
    by_event = {record["event"]: record for record in records}
    assert list(by_event) == [
        "event_applied",
        "headers",
        "free text",
        "event_rejected",
        '127.0.0.1:1 - "GET /api/customers/[email]/credits HTTP/1.1" 404',
        "crashed",
        "stdlib crashed",
        "unbound",
    ]  # and nothing below INFO

    applied = by_event["event_applied"]
    assert (applied["message_id"], applied["actor"], applied["customer_id"]) == ("m-1", "apply_event", "[email]")
    assert applied["note"] == "paid by [email]"
    assert (applied["level"], applied["logger"]) == ("info", "credits.test")
    assert datetime.fromisoformat(applied["timestamp"]).utcoffset() == timedelta(0)

    headers = by_event["headers"]
    assert {
        k: headers[k] for k in ("authorization", "admin_api_token", "frontend_api_token", "Email")
    } == dict.fromkeys(("authorization", "admin_api_token", "frontend_api_token", "Email"), "[redacted]")
    assert (
        by_event["free text"]["detail"]
        == "retrying with Authorization: Bearer [redacted] at postgresql://app:[redacted]@db/credits"
    )
    rejected = by_event["event_rejected"]
    assert rejected["errors"] == [{"loc": ["job.completed", "[email]"], "msg": "Input tag '[email]'"}]
    assert rejected["nested"] == {"token": "[redacted]", "who": ["[email]"]}

    # Context reaches stdlib loggers (Dramatiq's, uvicorn's) too, and is gone once cleared.
    access = records[4]
    assert (access["logger"], access["message_id"], access["customer_id"]) == ("uvicorn.access", "m-1", "[email]")
    for name in ("crashed", "stdlib crashed"):
        assert "RuntimeError: cannot charge [email] with Bearer [redacted]" in by_event[name]["exception"]
    assert "message_id" not in by_event["unbound"] and by_event["unbound"]["level"] == "warning"


# --------------------------------------------------------------------------- a real worker


def _records_for(log: str, message_id: str) -> list[dict]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{") and message_id in line]


def test_worker_lines_carry_the_message_context_and_mask_the_email(db, redis_client, redis_url, start_workers):
    workers = start_workers(processes=1, threads=2)
    publisher = Publisher.from_url(redis_url)
    try:
        paid = publisher.publish(
            PaymentSucceeded(
                event_id="pay-jane",
                customer_id=EMAIL,
                occurred_at=datetime.now(UTC) - timedelta(hours=1),
                payment_id="in_jane",
                credits=2,
            )
        )
        # A malformed event whose error message quotes the producer's input (the email).
        bad = dramatiq.Message(
            queue_name=EVENTS_QUEUE,
            actor_name=APPLY_EVENT_ACTOR,
            args=(),
            kwargs={
                EVENT_KWARG: json.dumps(
                    {"type": EMAIL, "event_id": "bad-jane", "customer_id": EMAIL, "occurred_at": "2026-01-01T00:00:00Z"}
                )
            },
            options={},
        )
        refused = RedisBroker(url=redis_url, middleware=[]).enqueue(bad).message_id
    finally:
        publisher.close()

    def both_logged() -> bool:
        log = workers.log()
        return any(r.get("event") == "event_applied" for r in _records_for(log, paid)) and any(
            r.get("event") == "event_rejected" for r in _records_for(log, refused)
        )

    wait_until(both_logged, timeout=30, message="the worker to log both outcomes")
    workers.stop()
    log = workers.log()

    [applied] = [r for r in _records_for(log, paid) if r["event"] == "event_applied"]
    assert applied["message_id"] == paid
    assert applied["actor"] == "apply_event"
    assert applied["customer_id"] == "[email]"
    assert (applied["event_id"], applied["event_type"]) == ("pay-jane", "payment.succeeded")
    assert (applied["level"], applied["logger"]) == ("info", "credits.workers")

    [rejected] = [r for r in _records_for(log, refused) if r["event"] == "event_rejected"]
    assert (rejected["actor"], rejected["level"], rejected["reason"]) == ("apply_event", "error", "invalid event")
    # By location and type: pydantic's message ("Input tag '…' found") would quote the email.
    assert rejected["errors"] == [{"loc": [], "type": "union_tag_invalid"}]

    # Every line written while a message was processed is JSON with its context bound.
    for message_id in (paid, refused):
        for record in _records_for(log, message_id):
            assert record["message_id"] == message_id and record["actor"] == "apply_event"
    assert_no_leaks(log)


# --------------------------------------------------------------------------- a real web server


async def test_web_log_never_shows_tokens_or_emails(db, service_env, tmp_path):
    env = {**service_env, "ADMIN_API_TOKEN": ADMIN_TOKEN, "FRONTEND_API_TOKEN": FRONTEND_TOKEN}
    server = start_web_server(env, tmp_path / "web.log")
    try:
        with httpx.Client(base_url=server.base_url, timeout=10) as http:
            front = {"Authorization": f"Bearer {FRONTEND_TOKEN}"}
            assert http.get(f"/api/customers/{EMAIL}/credits", headers=front).status_code == 404
            assert http.get("/api/customers/jane.doe%40example.com/credits", headers=front).status_code == 404
            assert (
                http.get(
                    f"/api/customers/{EMAIL}/credits", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
                ).status_code
                == 401
            )
            assert http.post(f"/api/customers/{EMAIL}/holds", json={"job_id": EMAIL}, headers=front).status_code == 404
            assert (
                http.get(
                    "/api/admin/credits-report",
                    params={"email": EMAIL},
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                ).status_code
                == 200
            )
            assert http.get("/api/admin/at-risk-count", headers=front).status_code == 401

        def all_requests_logged() -> bool:
            return server.log().count('"logger": "uvicorn.access"') - server.log().count("/healthz") >= 6

        wait_until(all_requests_logged, timeout=10, message="the access log lines")
    finally:
        server.stop()
    log = server.log()
    records = json_lines(log)
    access = [r["event"] for r in records if r["logger"] == "uvicorn.access" and "/healthz" not in r["event"]]
    assert '"GET /api/customers/[email]/credits HTTP/1.1" 404' in access[0]
    assert '"GET /api/customers/[email]/credits HTTP/1.1" 404' in access[1]
    assert '"GET /api/admin/credits-report HTTP/1.1" 200' in access[4]  # the path without its query
    assert_no_leaks(log, ADMIN_TOKEN, FRONTEND_TOKEN)
