"""The scheduler process: it only enqueues periodic messages (APScheduler, as Dramatiq's docs advise).

Several schedulers may run (a deploy overlap, a mistake): each tick of each job is claimed
in Redis with SET NX first, so only one of them enqueues it. The periodic actors are
idempotent anyway, so a double fire would waste work, not money.
"""

from __future__ import annotations

import signal
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dramatiq
import structlog
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.interval import IntervalTrigger

from infra.settings import Settings

log = structlog.get_logger("credits.scheduler")
LOCK_PREFIX = "credits:scheduler"


@dataclass(frozen=True)
class PeriodicJob:
    actor: dramatiq.Actor
    every: timedelta

    @property
    def name(self) -> str:
        return self.actor.actor_name


def periodic_jobs(settings: Settings) -> list[PeriodicJob]:
    from workers.actors import (
        archive_dead_letters,
        collect_payments,
        expire_credits,
        lapse_holds,
        notice_retention_crossings,
        pay_referrals,
        send_notifications,
        warn_expiring_credits,
    )

    return [
        PeriodicJob(expire_credits, timedelta(minutes=settings.expire_credits_every_minutes)),
        PeriodicJob(lapse_holds, timedelta(minutes=settings.lapse_holds_every_minutes)),
        PeriodicJob(collect_payments, timedelta(minutes=settings.collect_payments_every_minutes)),
        PeriodicJob(pay_referrals, timedelta(minutes=settings.pay_referrals_every_minutes)),
        PeriodicJob(send_notifications, timedelta(minutes=settings.send_notifications_every_minutes)),
        PeriodicJob(warn_expiring_credits, timedelta(minutes=settings.warn_expiring_credits_every_minutes)),
        PeriodicJob(notice_retention_crossings, timedelta(minutes=settings.notice_retention_every_minutes)),
        PeriodicJob(archive_dead_letters, timedelta(minutes=15)),
    ]


def fire(job: PeriodicJob, redis_client, owner: str, now: datetime | None = None) -> bool:
    """Enqueue ``job`` for the current tick unless another scheduler already has. Returns whether it did.

    ``redis_client`` None (RabbitMQ without REDIS_URL): no claim, so run one scheduler only.
    """
    now = now or datetime.now(UTC)
    seconds = int(job.every.total_seconds())
    tick = int(now.timestamp()) // seconds
    key = f"{LOCK_PREFIX}:{job.name}:{tick}"
    if redis_client is not None and not redis_client.set(key, owner, nx=True, ex=seconds * 2):
        log.info("periodic_skipped", job=job.name, tick=tick, reason="another scheduler fired this tick")
        return False
    job.actor.send()
    log.info("periodic_enqueued", job=job.name, tick=tick)
    return True


def tick_claims(settings: Settings, broker: dramatiq.Broker):
    """The Redis where ticks are claimed: the broker's own, or REDIS_URL beside RabbitMQ, or none."""
    if hasattr(broker, "client"):
        return broker.client
    if settings.redis_url:
        import redis

        return redis.Redis.from_url(settings.redis_url)
    log.warning("scheduler_ticks_unclaimed", reason="RabbitMQ broker and no REDIS_URL: run a single scheduler")
    return None


def run_scheduler(settings: Settings) -> None:
    from workers.broker import broker

    owner = f"scheduler-{uuid.uuid4()}"
    claims = tick_claims(settings, broker)
    scheduler = BlockingScheduler(timezone=UTC)
    for job in periodic_jobs(settings):
        scheduler.add_job(
            fire,
            IntervalTrigger(seconds=int(job.every.total_seconds()), timezone=UTC),
            args=(job, claims, owner),
            id=job.name,
            next_run_time=datetime.now(UTC),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=60,
        )
    signal.signal(signal.SIGTERM, lambda *_: scheduler.shutdown(wait=False))
    log.info("scheduler_started", owner=owner, jobs=[job.name for job in periodic_jobs(settings)])
    try:
        scheduler.start()
    except (KeyboardInterrupt, SystemExit):
        pass
