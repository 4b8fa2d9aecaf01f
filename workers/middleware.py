"""Dramatiq middleware: small, one job each (as in Dramatiq's own middleware package)."""

from __future__ import annotations

import os
import threading

import dramatiq
import structlog
from dramatiq.asyncio import get_event_loop_thread
from dramatiq.middleware import Middleware
from sqlalchemy import insert

from infra.db import require_current_schema_now
from infra.db.tables import dead_letters
from infra.logging import scrub
from workers.metrics import WorkerMetrics
from workers.runtime import get_runtime

log = structlog.get_logger("credits.workers")


class LogContext(Middleware):
    """Bind message id and actor to every log line written while a message is processed."""

    def before_process_message(self, broker, message):
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(message_id=message.message_id, actor=message.actor_name)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        structlog.contextvars.clear_contextvars()

    after_skip_message = after_process_message


class RequireMigratedSchema(Middleware):
    """Refuse to start a worker on a database that is not migrated to head."""

    def before_worker_boot(self, broker, worker):
        require_current_schema_now(get_runtime().settings.effective_database_url)


class ArchiveDeadLetters(Middleware):
    """Copy every dead-lettered message into PostgreSQL.

    Redis keeps dead letters for a week and loses them on restart; the table keeps them
    for an operator to inspect and replay.
    """

    def after_process_message(self, broker, message, *, result=None, exception=None):
        if not message.failed:
            return
        error = scrub(f"{type(exception).__name__}: {exception}") if exception else None
        row = {
            "message_id": message.message_id,
            "queue_name": message.queue_name,
            "actor_name": message.actor_name,
            "message": message.encode().decode("utf-8", "replace"),
            "error": error,
        }

        async def archive() -> None:
            async with get_runtime().db.begin() as connection:
                await connection.execute(insert(dead_letters).values(**row))

        try:
            get_event_loop_thread().run_coroutine(archive())
            log.error("message_dead_lettered", error=error)
        except Exception:
            log.exception("dead_letter_archive_failed", error=error)

    def after_skip_message(self, broker, message):
        # Skipped messages (e.g. too old) are failed by Dramatiq too.
        self.after_process_message(broker, message)


class RedisHeartbeat(Middleware):
    """Heartbeat and run Dramatiq's Redis maintenance every few seconds, on a thread of its own.

    Whatever the load, this process stays alive in Redis's eyes, and a process that died (kill -9,
    out of memory, lost host) has its fetched messages put back on their queues within
    REDIS_HEARTBEAT_TIMEOUT_SECONDS + REDIS_MAINTENANCE_INTERVAL_SECONDS by any survivor, or by
    the group that replaces it.
    """

    def __init__(self, interval_seconds: float) -> None:
        self.interval = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def after_worker_boot(self, broker, worker):
        log.info(
            "worker_heartbeat_started",
            broker_id=broker.broker_id,
            pid=os.getpid(),
            heartbeat_timeout_ms=broker.heartbeat_timeout,
            interval_seconds=self.interval,
        )
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(broker,), name="redis-heartbeat", daemon=True)
        self._thread.start()

    def after_worker_shutdown(self, broker, worker):
        self._stop.set()

    def _run(self, broker) -> None:
        while True:
            try:
                broker.maintain()
            except Exception as error:  # Redis away: the consumers report it; try again next beat
                log.warning("worker_heartbeat_failed", error=f"{type(error).__name__}: {error}")
            if self._stop.wait(self.interval):
                return


def worker_middleware(broker: dramatiq.Broker) -> list[Middleware]:
    """Middleware the workers add on top of Dramatiq's defaults; see ``install`` for where.

    RequireMigratedSchema comes before AsyncIO: ``before_worker_boot`` hooks run in list order,
    and once AsyncIO has started its (non-daemon) event-loop thread, a refusal to boot would
    leave the worker process hanging on that thread instead of exiting.
    """
    from dramatiq.middleware.asyncio import AsyncIO

    from infra.broker import DeadLetteringRedisBroker

    settings = get_runtime().settings
    middleware = [RequireMigratedSchema(), AsyncIO(), LogContext(), ArchiveDeadLetters()]
    if settings.metrics_port:
        middleware.append(WorkerMetrics(settings))
    if isinstance(broker, DeadLetteringRedisBroker) and settings.broker_address:
        # (The embedded default's one process has no other process to die or to watch.)
        middleware.append(RedisHeartbeat(settings.redis_maintenance_interval_seconds))
    return middleware


#: Dramatiq runs ``after_*`` hooks in *reverse* list order, so these go *before* Retries:
#: ArchiveDeadLetters and WorkerMetrics must run after Retries has decided (``message.failed``),
#: and LogContext must clear the log context last, after Retries and ArchiveDeadLetters have logged.
_BEFORE_RETRIES = (LogContext, ArchiveDeadLetters, WorkerMetrics)


def install(broker: dramatiq.Broker) -> dramatiq.Broker:
    from dramatiq.middleware import Retries

    has_retries = any(isinstance(m, Retries) for m in broker.middleware)
    for middleware in worker_middleware(broker):
        if has_retries and isinstance(middleware, _BEFORE_RETRIES):
            broker.add_middleware(middleware, before=Retries)
        else:
            broker.add_middleware(middleware)
    return broker
