"""Dramatiq actors. Thin: decode, validate, open a unit of work, call the domain, commit.

Run them with ``dramatiq workers.actors`` (or ``credits worker``).
"""

from __future__ import annotations

from infra.logging import quiet_libraries

# First: Dramatiq's worker processes log at INFO (its basicConfig) until workers.broker sets up
# ours, and importing alembic (infra.db) logs each of its plugins at INFO.
quiet_libraries()

from datetime import datetime

import dramatiq
import structlog
from pydantic import ValidationError

from domain import DomainError
from infra.broker import enqueue_charges
from infra.db.errors import PERMANENT_ERRORS, is_connectivity_error
from infra.masking import shape_of
from messages import parse_event
from messages.wire import APPLY_EVENT_ACTOR, CHARGE_ATTEMPTS_ACTOR, EVENT_KWARG, EVENTS_QUEUE, PAYMENTS_QUEUE
from service_layer import events, notifications, payments, payouts, retention, sweeps
from service_layer.errors import EventConflict
from workers.as_of import parse_as_of
from workers.broker import broker
from workers.metrics import record_outcome
from workers.runtime import get_runtime

log = structlog.get_logger("credits.workers")

SWEEPS_QUEUE = "credit_sweeps"
#: A sweep gives up its worker thread after this many batches and re-enqueues itself.
SWEEP_BATCHES_PER_MESSAGE = 200


class Rejected(Exception):
    """A message that can never succeed: it goes straight to the dead letters, never retried."""


def should_retry(retries: int, error: BaseException) -> bool:
    """Retry a database outage for as long as it lasts (bounded in weeks); anything else a few times."""
    settings = get_runtime().settings
    limit = settings.event_max_outage_retries if is_connectivity_error(error) else settings.event_max_retries
    return retries < limit


def _retry_options() -> dict:
    settings = get_runtime().settings
    return {
        "throws": (Rejected,),
        "retry_when": should_retry,
        "min_backoff": settings.event_min_backoff_ms,
        "max_backoff": settings.event_max_backoff_ms,
    }


@dramatiq.actor(actor_name=APPLY_EVENT_ACTOR, queue_name=EVENTS_QUEUE, **_retry_options())
async def apply_event(*args: object, **kwargs: object) -> None:
    """Apply one domain event. Bad input and conflicts are rejected; anything else is retried."""
    if args or set(kwargs) != {EVENT_KWARG} or not isinstance(kwargs[EVENT_KWARG], (str, bytes)):
        log.error(
            "event_rejected",
            reason="malformed message",
            detail=f"expected kwargs {{{EVENT_KWARG!r}: <JSON string>}}, got args={len(args)} kwargs={sorted(kwargs)}",
        )
        raise Rejected(
            f"malformed message: expected exactly one keyword argument {EVENT_KWARG!r} holding the event as a JSON string"
        )
    try:
        event = parse_event(kwargs[EVENT_KWARG])
    except ValidationError as error:
        # Where and what kind, never the input: a message may quote it (an email, a card number).
        problems = [
            {"loc": e["loc"], "type": e["type"]}
            for e in error.errors(include_url=False, include_input=False, include_context=False)
        ]
        log.error("event_rejected", reason="invalid event", errors=problems)
        # "type at field", not "field: type": a field named like a secret would mask its type.
        raise Rejected(
            "invalid event: "
            + "; ".join(f"{p['type']} at {'.'.join(map(str, p['loc'])) or 'the event'}" for p in problems)
        ) from None
    structlog.contextvars.bind_contextvars(
        customer_id=event.customer_id, event_id=event.event_id, event_type=event.type
    )
    runtime = get_runtime()
    problem = runtime.settings.event_window.problem(event.occurred_at, runtime.clock.now())
    if problem:
        log.error("event_rejected", reason="EventOutsideWindow", detail=problem)
        raise Rejected(problem)
    new_attempt_ids: list[int] = []
    try:
        if events.batchable(event) and runtime.settings.event_batch_size > 1:
            outcome = await runtime.event_batcher.apply(event)
        else:
            uow = runtime.new_uow()
            outcome = await events.apply_event(
                event, uow, runtime.settings.policy, runtime.settings.dunning, runtime.settings.referrals
            )
            new_attempt_ids = uow.dunning.new_attempt_ids
    except (EventConflict, DomainError, *PERMANENT_ERRORS) as error:
        detail = str(error.orig if isinstance(error, PERMANENT_ERRORS) else error)
        log.error("event_rejected", reason=type(error).__name__, detail=detail)
        raise Rejected(detail) from None
    log.info("event_" + outcome.value)
    record_outcome(outcome.value)
    enqueue_charges(broker, new_attempt_ids)


@dramatiq.actor(actor_name=CHARGE_ATTEMPTS_ACTOR, queue_name=PAYMENTS_QUEUE, **_retry_options())
async def charge_payment_attempts(attempt_ids: list[int]) -> None:
    """Charge requested payment attempts now ("retry now", a new payment method)."""
    if not isinstance(attempt_ids, list) or not all(type(i) is int for i in attempt_ids):
        raise Rejected(f"attempt_ids must be a list of integers, got {shape_of(attempt_ids)}")
    runtime = get_runtime()
    if runtime.provider is None:
        log.warning("payments_not_collected", reason="STRIPE_API_KEY is not set; the attempts wait in the database")
        return
    collector = payments.Collector(runtime.new_uow, runtime.provider, runtime.clock.now, runtime.rules)
    result = await payments.charge_pending(collector, attempt_ids=attempt_ids)
    log.info("payment_attempts_charged", attempt_ids=attempt_ids, charged=result.charged, postponed=result.postponed)


@dramatiq.actor(queue_name=PAYMENTS_QUEUE, **_retry_options())
async def collect_payments(as_of: str | None = None) -> None:
    """Periodic: request due scheduled retries, charge every pending attempt, apply the end action."""
    now = _sweep_time(as_of)
    runtime = get_runtime()
    settings = runtime.settings
    if runtime.provider is None:
        # Said once when the workers start (workers/startup.py), not every run.
        log.debug("payments_not_collected", reason="STRIPE_API_KEY is not set; due retries wait in the database")
        return
    scheduled = await payments.schedule_due_retries(runtime.new_uow, now, schedule=settings.dunning.schedule)
    clock = (lambda: now) if as_of is not None else runtime.clock.now
    result = await payments.charge_pending(payments.Collector(runtime.new_uow, runtime.provider, clock, runtime.rules))
    cancelled = 0
    if settings.dunning_end_action == "cancel_subscription":
        cancelled = await payments.cancel_past_due_subscriptions(runtime.new_uow, runtime.provider, clock)
    log.info(
        "payments_collected",
        as_of=now.isoformat(),
        scheduled=scheduled,
        charged=result.charged,
        postponed=result.postponed,
        subscriptions_cancelled=cancelled,
    )


@dramatiq.actor(queue_name=SWEEPS_QUEUE, **_retry_options())
async def expire_credits(as_of: str | None = None) -> None:
    """Periodic: expire every lot past its expiry date as of ``as_of`` (default: now)."""
    await _run_sweep(expire_credits, sweeps.expire_due_credits, as_of)


@dramatiq.actor(queue_name=SWEEPS_QUEUE, **_retry_options())
async def lapse_holds(as_of: str | None = None) -> None:
    """Periodic: lapse every hold not captured within its time to live."""
    await _run_sweep(lapse_holds, sweeps.lapse_due_holds, as_of)


async def _run_sweep(actor: dramatiq.Actor, sweep, as_of: str | None) -> None:
    now = _sweep_time(as_of)
    runtime = get_runtime()
    result = await sweep(runtime.new_uow, now, runtime.settings.sweep_batch_size, SWEEP_BATCHES_PER_MESSAGE)
    log.info(
        "sweep_done",
        sweep=actor.actor_name,
        as_of=now.isoformat(),
        customers=result.customers,
        entries=result.entries,
        more=result.more,
    )
    if result.more:
        # Give the worker thread back; the rest is done by a fresh message.
        actor.send(as_of=now.isoformat())


def _sweep_time(as_of: str | None) -> datetime:
    """The moment a periodic job runs as of: now, or an earlier ``as_of`` (catching up; the tests' movable clock)."""
    now = get_runtime().clock.now()
    if as_of is None:
        return now
    try:
        return parse_as_of(as_of, now)
    except ValueError as problem:
        raise Rejected(str(problem)) from None


#: A Friday of 100,000 payees takes minutes here and hours at a provider's pace: Dramatiq's
#: default ten minutes would cancel it midway, again and again. Every payout commits on its
#: own and overlapping runs skip each other's, so a long run is safe.
PAYOUT_RUN_TIME_LIMIT_MS = 12 * 60 * 60 * 1000


@dramatiq.actor(queue_name=PAYMENTS_QUEUE, time_limit=PAYOUT_RUN_TIME_LIMIT_MS, **_retry_options())
async def pay_referrals(as_of: str | None = None) -> None:
    """Periodic: release rewards whose hold is over, make today's payouts (same-day payees
    daily, everyone on Fridays in the business's time zone), send every unpaid payout."""
    now = _sweep_time(as_of)
    runtime = get_runtime()
    settings = runtime.settings
    # One run at a time: the scheduler enqueues every hour whether or not the last run ended,
    # and a long Friday must not fill every worker thread with runs doing the same work.
    async with runtime.db.alone("pay_referrals") as alone:
        if not alone:
            log.info("referrals_not_paid", reason="another pay_referrals run is in progress")
            return
        run = await payouts.pay_referrals(
            runtime.new_uow, runtime.payout_gateways, settings.payout_gateways, now, settings.referrals
        )
    log.info(
        "referrals_paid",
        as_of=now.isoformat(),
        released=run.released,
        payouts_created=len(run.created),
        held_back=len(run.held_back),
        sent=run.sent,
        failed=run.failed,
    )


NOTIFICATIONS_QUEUE = "credit_notifications"


@dramatiq.actor(queue_name=NOTIFICATIONS_QUEUE, **_retry_options())
async def send_notifications() -> None:
    """Periodic: send due notifications from the outbox (each at most once)."""
    runtime = get_runtime()
    if runtime.mailer is None:
        # Said once when the workers start (workers/startup.py), not every minute.
        log.debug("notifications_not_sent", reason="SMTP_HOST is not set; they wait in the outbox")
        return
    result = await notifications.deliver(runtime.new_uow, runtime.mailer, runtime.clock.now)
    log.info(
        "notifications_sent",
        sent=result.sent,
        retrying=result.retrying,
        failed=result.failed,
        uncertain=result.uncertain,
    )


@dramatiq.actor(queue_name=NOTIFICATIONS_QUEUE, **_retry_options())
async def warn_expiring_credits(as_of: str | None = None) -> None:
    """Periodic (daily): warn each customer once per lot that expires within NOTIFY_EXPIRY_DAYS_BEFORE days."""
    now = _sweep_time(as_of)
    runtime = get_runtime()
    queued = await notifications.warn_expiring_credits(runtime.new_uow, now, runtime.settings.notify_expiry_days_before)
    log.info("expiry_warnings_queued", as_of=now.isoformat(), queued=queued)
    if queued:
        send_notifications.send()


@dramatiq.actor(queue_name=SWEEPS_QUEUE, **_retry_options())
async def notice_retention_crossings(as_of: str | None = None) -> None:
    """Periodic: record customers who crossed the retention line (depleted for more than the
    report's days) with no event at all; the admin page's bubble counts them live."""
    now = _sweep_time(as_of)
    runtime = get_runtime()
    crossed = await retention.notice_crossings(runtime.new_uow(), now, runtime.settings.depleted_report_days)
    log.info("retention_crossings", as_of=now.isoformat(), crossed=len(crossed), customers=crossed[:50])


@dramatiq.actor(queue_name=SWEEPS_QUEUE, **_retry_options())
async def archive_dead_letters() -> None:
    """Periodic: copy into PostgreSQL any dead letter the broker holds that the table lacks (one
    refused while the database was down)."""
    from workers.dead_letters import archive_from_broker

    archived = await archive_from_broker(get_runtime().db, broker)
    if archived:
        log.warning("dead_letters_archived_late", archived=archived)


PERIODIC_ACTORS: dict[str, dramatiq.Actor] = {
    actor.actor_name: actor
    for actor in (
        expire_credits,
        lapse_holds,
        collect_payments,
        pay_referrals,
        send_notifications,
        warn_expiring_credits,
        notice_retention_crossings,
        archive_dead_letters,
    )
}

__all__ = [
    "PERIODIC_ACTORS",
    "Rejected",
    "apply_event",
    "broker",
    "charge_payment_attempts",
    "collect_payments",
    "expire_credits",
    "lapse_holds",
    "pay_referrals",
    "send_notifications",
    "warn_expiring_credits",
    "notice_retention_crossings",
    "archive_dead_letters",
]
