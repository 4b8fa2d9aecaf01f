"""Operators read these logs: APScheduler and alembic say only what matters (warnings and
above), as JSON like every other line, and a missing optional setting is said once at start."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from tests.support import ROOT, stop_process, wait_until
from tests.support.logs import json_lines

CREDITS = str(Path(sys.executable).with_name("credits"))
QUIET = ("apscheduler", "alembic")
LOUD_ENOUGH = {"warning", "error", "critical"}


def quiet_library_lines(records: list[dict]) -> list[dict]:
    return [r for r in records if str(r.get("logger", "")).startswith(QUIET) and r.get("level") not in LOUD_ENOUGH]


def test_migrate_prints_json_only_and_no_alembic_bookkeeping(empty_database, service_env):
    env = {**service_env, "DATABASE_URL": empty_database}
    result = subprocess.run([CREDITS, "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    records = json_lines(result.stdout + result.stderr)
    assert quiet_library_lines(records) == []
    [migrated] = [r for r in records if r.get("event") == "database_migrated"]
    assert migrated["level"] == "info" and migrated["head"]


@pytest.mark.slow
def test_scheduler_prints_json_only_and_no_apscheduler_bookkeeping(service_env, redis_client, tmp_path):
    log_path = tmp_path / "scheduler.log"
    scheduler = subprocess.Popen(
        [CREDITS, "scheduler"],
        cwd=ROOT,
        env=service_env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Every job fires once at start: 8 enqueued (or skipped) ticks, then a few quiet seconds.
        wait_until(
            lambda: log_path.read_text().count('"periodic_') >= 8, timeout=60, message="the scheduler's first ticks"
        )
        time.sleep(3)
        assert scheduler.poll() is None, log_path.read_text()
    finally:
        stop_process(scheduler)
    records = json_lines(log_path.read_text())
    assert quiet_library_lines(records) == [], quiet_library_lines(records)[:3]
    assert sum(r.get("event") == "periodic_enqueued" for r in records) == 8
    assert any(r.get("event") == "scheduler_started" for r in records)


@pytest.mark.slow
def test_a_missing_smtp_host_is_one_warning_at_start(service_env, redis_url, redis_client, tmp_path):
    env = {k: v for k, v in service_env.items() if k not in ("SMTP_HOST", "STRIPE_API_KEY")}
    log_path = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [CREDITS, "worker", "--processes", "2", "--threads", "2"],
        cwd=ROOT,
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    broker = RedisBroker(url=redis_url)
    try:
        wait_until(
            lambda: log_path.read_text().count("Worker process is ready for action") >= 2,
            timeout=90,
            message="two worker processes",
        )
        # Three runs of the job, as the scheduler makes one a minute.
        for _ in range(3):
            broker.enqueue(
                dramatiq.Message(
                    queue_name="credit_notifications", actor_name="send_notifications", args=(), kwargs={}, options={}
                )
            )
        queue = redis.Redis.from_url(redis_url)
        wait_until(
            lambda: queue.hlen("dramatiq:credit_notifications.msgs") == 0,
            timeout=60,
            message="the three runs to be done",
        )
        time.sleep(1)
    finally:
        broker.close()
        stop_process(worker)
    log = log_path.read_text()
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    smtp = [r for r in records if r.get("event") == "notifications_not_sent"]
    assert len(smtp) == 1 and smtp[0]["level"] == "warning" and "SMTP_HOST is not set" in smtp[0]["reason"], smtp
    assert sum(r.get("event") == "payments_not_collected" for r in records) == 1
    assert "alembic" not in log  # the workers' schema check at boot says nothing at info
