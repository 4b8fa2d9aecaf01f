"""The workers' Prometheus metrics: Dramatiq's own plus the ledger's event counts, timings and lag.

Dramatiq's Prometheus middleware runs prometheus-client in multiprocess mode: every worker
process writes its values to files in one directory, and a Dramatiq fork process serves them
all, merged, on METRICS_PORT. prometheus-client picks its multiprocess mode when it is first
imported, so nothing here imports it before ``after_process_boot`` has pointed it at the
directory.
"""

from __future__ import annotations

import contextvars
import fcntl
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import structlog
from dramatiq.middleware import prometheus as dramatiq_prometheus
from dramatiq.middleware.prometheus import Prometheus

from infra import metrics as catalogue
from infra.settings import Settings
from messages.events import EVENT_TYPES
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG

log = structlog.get_logger("credits.metrics")

#: The delivery being processed: set by the middleware on the worker thread, filled in by the
#: actor. Its coroutine runs on the event-loop thread in a copy of this thread's context, so it
#: sees (and fills) the same dict. (Returning the outcome would make Dramatiq warn: no Results.)
_delivery: contextvars.ContextVar[dict | None] = contextvars.ContextVar("credits_delivery", default=None)


def record_outcome(outcome: str) -> None:
    """Called by the actor once the event is committed: applied, duplicate or ignored."""
    delivery = _delivery.get()
    if delivery is not None:
        delivery["outcome"] = outcome


def metrics_dir(settings: Settings) -> Path:
    """One directory per metrics port: two worker runs on one host cannot share a port either."""
    return Path(settings.metrics_dir or Path(tempfile.gettempdir()) / f"credits-metrics-{settings.metrics_port}")


def point_dramatiq_at(settings: Settings) -> Path:
    """Dramatiq reads its directory, host and port from the environment once, when its module is
    imported; set them on the module, so the settings win whenever it was imported."""
    directory = metrics_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    dramatiq_prometheus.DB_PATH = str(directory)
    dramatiq_prometheus.HTTP_HOST = settings.metrics_host
    dramatiq_prometheus.HTTP_PORT = settings.metrics_port
    return directory


def start_run(directory: Path) -> None:
    """Empty the directory of an earlier worker run's files, once per run.

    The worker processes of one run share a parent (the dramatiq main process); the first of
    them to boot empties the directory and marks it with the run, the others find the mark.
    Files of the run's own processes are never removed (a counter must not go backwards).
    """
    run = _run_identity()
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = directory / ".run"
        if marker.exists() and marker.read_text() == run:
            return
        for leftover in directory.glob("*.db"):
            leftover.unlink(missing_ok=True)
        marker.write_text(run)


def _run_identity() -> str:
    """The parent's pid and start time (pids are reused; the pair is not)."""
    parent = os.getppid()
    try:
        # Field 22 of /proc/<pid>/stat, counted after the parenthesised command name.
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "?"
    return f"{parent}:{started}"


def serve_worker_metrics() -> int:
    """A Dramatiq fork process: serve every worker process's metrics, merged, on METRICS_PORT."""
    from infra.logging import configure_logging
    from infra.settings import get_settings

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_max_value_chars)
    point_dramatiq_at(settings)
    try:
        return dramatiq_prometheus._run_exposition_server()
    except OSError as error:
        # Another worker run holds the port: this run works on, unobserved; say so once.
        log.error("worker_metrics_not_served", host=settings.metrics_host, port=settings.metrics_port, error=str(error))
        return 1


def event_type(message) -> str:
    """The event's type, or "unknown" (a label takes known values only: input is hostile)."""
    raw = message.kwargs.get(EVENT_KWARG) if isinstance(message.kwargs, dict) else None
    try:
        kind = json.loads(raw).get("type")
    except (TypeError, ValueError, AttributeError):
        return "unknown"
    return kind if isinstance(kind, str) and kind in EVENT_TYPES else "unknown"


def outcome(message, recorded: str | None, exception) -> str:
    if exception is None:
        return recorded if recorded in catalogue.WORKER_OUTCOMES else "applied"
    # Retries has already decided (this middleware comes before it, so its hook runs after).
    return "rejected" if message.failed else "retried"


class _EventMetrics:
    """credits_events_total, credits_event_apply_seconds, credits_event_lag_seconds."""

    def __init__(self) -> None:
        import prometheus_client as prom

        # In multiprocess mode the values live in the directory's files; the registry is unused.
        registry = prom.CollectorRegistry()
        specs = catalogue.WORKER_METRICS
        events = catalogue.spec("credits_events_total", specs)
        self.events = prom.Counter(events.family, events.help, events.labels, registry=registry)
        apply = catalogue.spec("credits_event_apply_seconds", specs)
        self.apply_seconds = prom.Histogram(
            apply.name, apply.help, apply.labels, buckets=catalogue.APPLY_SECONDS_BUCKETS, registry=registry
        )
        lag = catalogue.spec("credits_event_lag_seconds", specs)
        self.lag_seconds = prom.Histogram(
            lag.name, lag.help, lag.labels, buckets=catalogue.LAG_SECONDS_BUCKETS, registry=registry
        )

    def observe(self, message, started: float | None, what: str) -> None:
        kind = event_type(message)
        self.events.labels(kind, what).inc()
        if started is not None:
            self.apply_seconds.labels(kind).observe(time.perf_counter() - started)
        if what == "applied":
            # The actor has returned, so its transaction has committed.
            lag_ms = time.time() * 1000 - message.message_timestamp
            self.lag_seconds.labels(kind).observe(max(lag_ms, 0) / 1000)


def _booted_only(hook):
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        if self.booted:
            return hook(self, *args, **kwargs)
        return None

    return guarded


class WorkerMetrics(Prometheus):
    """Dramatiq's Prometheus middleware plus the event metrics, served on METRICS_PORT.

    Inert until ``after_process_boot``, which only the dramatiq command emits: the scheduler,
    the CLI and the demo's in-process worker share this broker and export nothing.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.booted = False
        self._events: _EventMetrics | None = None

    @property
    def forks(self):
        return [serve_worker_metrics]

    def after_process_boot(self, broker) -> None:
        start_run(point_dramatiq_at(self.settings))
        super().after_process_boot(broker)  # sets PROMETHEUS_MULTIPROC_DIR, then imports prometheus-client
        self._events = _EventMetrics()
        self.booted = True

    @_booted_only
    def before_process_message(self, broker, message) -> None:
        super().before_process_message(broker, message)
        if message.actor_name == APPLY_EVENT_ACTOR:
            _delivery.set({"started": time.perf_counter()})

    @_booted_only
    def after_process_message(self, broker, message, *, result=None, exception=None) -> None:
        super().after_process_message(broker, message, result=result, exception=exception)
        delivery = _delivery.get()
        if message.actor_name == APPLY_EVENT_ACTOR and delivery is not None:
            _delivery.set(None)
            self._events.observe(message, delivery["started"], outcome(message, delivery.get("outcome"), exception))

    @_booted_only
    def after_skip_message(self, broker, message) -> None:
        # Skipped (too old, say): Dramatiq fails it, so it is dead-lettered.
        Prometheus.after_skip_message(self, broker, message)
        if message.actor_name == APPLY_EVENT_ACTOR:
            _delivery.set(None)
            self._events.observe(message, None, "rejected")


for _hook in ("after_worker_shutdown", "after_nack", "after_enqueue", "before_delay_message"):
    setattr(WorkerMetrics, _hook, _booted_only(getattr(Prometheus, _hook)))
