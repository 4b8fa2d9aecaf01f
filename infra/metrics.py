"""Every metric we export: its name, kind, labels, meaning, and which process serves it.

One list, so the code, docs/OPERATIONS.md, docs/alerts.yml and the tests agree on names.
The web's figures are read from PostgreSQL at scrape time (durable, the same from every web
process); the workers' are counted in the worker processes since the worker run started.
``credits_events_total`` is served by both, with different ``outcome`` values: see
docs/DECISIONS.md ("Metrics").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """The name prometheus-client's parser gives the family (a counter loses `_total`)."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


#: Worker outcomes of one delivery of an event (credits_events_total on the workers' port).
WORKER_OUTCOMES = ("applied", "ignored", "duplicate", "rejected", "retried")
#: Ledger outcomes of an event (credits_events_total on the web): the ledger's own records.
LEDGER_OUTCOMES = ("recorded", "dead_lettered")

WEB_METRICS = (
    MetricSpec(
        "credits_events_total",
        "counter",
        "Events the ledger holds: recorded (processed_events: applied or ignored, once per event id) "
        "or dead_lettered (dead_letters, once per dead-lettering); durable, from PostgreSQL",
        ("type", "outcome"),
    ),
    MetricSpec(
        "credits_dead_letters_total",
        "counter",
        "Messages dead-lettered and archived in PostgreSQL, by actor",
        ("actor",),
    ),
    MetricSpec("credits_dead_letters_waiting", "gauge", "Dead letters not replayed yet, by actor", ("actor",)),
    MetricSpec("credits_outbox_pending", "gauge", "Customer notifications waiting in the outbox to be sent"),
    MetricSpec(
        "credits_outbox_oldest_due_seconds",
        "gauge",
        "How long the oldest due notification in the outbox has waited (0: none due)",
    ),
    MetricSpec("credits_dunning_cases", "gauge", "Unpaid-invoice (dunning) cases by state", ("state",)),
    MetricSpec(
        "credits_payouts_total",
        "gauge",
        "Referral payouts by current status (a count: a payout moves from pending to paid)",
        ("status",),
    ),
    MetricSpec(
        "credits_at_risk_customers", "gauge", "Customers out of credits for more than DEPLETED_REPORT_DAYS days"
    ),
    MetricSpec(
        "credits_figures_up",
        "gauge",
        "1 if the business figures above were read from the database, 0 if the read failed",
    ),
    MetricSpec(
        "credits_figures_age_seconds",
        "gauge",
        "Age of the business figures served (they are cached for METRICS_CACHE_SECONDS)",
    ),
)

#: Dramatiq's own (its Prometheus middleware), on the workers' port.
DRAMATIQ_METRICS = (
    MetricSpec("dramatiq_messages_total", "counter", "Messages processed", ("queue_name", "actor_name")),
    MetricSpec(
        "dramatiq_message_errors_total", "counter", "Messages whose processing raised", ("queue_name", "actor_name")
    ),
    MetricSpec(
        "dramatiq_message_retries_total", "counter", "Messages re-enqueued for a retry", ("queue_name", "actor_name")
    ),
    MetricSpec("dramatiq_message_rejects_total", "counter", "Messages dead-lettered", ("queue_name", "actor_name")),
    MetricSpec("dramatiq_messages_inprogress", "gauge", "Messages being processed now", ("queue_name", "actor_name")),
    MetricSpec(
        "dramatiq_delayed_messages_inprogress", "gauge", "Delayed messages held in memory", ("queue_name", "actor_name")
    ),
    MetricSpec(
        "dramatiq_message_duration_milliseconds",
        "histogram",
        "Time spent processing messages",
        ("queue_name", "actor_name"),
    ),
)

WORKER_METRICS = (
    MetricSpec(
        "credits_events_total",
        "counter",
        "Event deliveries handled by the worker processes since they started, by outcome: "
        "applied, ignored, duplicate, rejected (dead-lettered), retried (failed; will be retried)",
        ("type", "outcome"),
    ),
    MetricSpec(
        "credits_event_apply_seconds", "histogram", "Time to apply one event delivery (commit included)", ("type",)
    ),
    MetricSpec(
        "credits_event_lag_seconds",
        "histogram",
        "From the event's publication to its commit in the ledger (applied events)",
        ("type",),
    ),
    *DRAMATIQ_METRICS,
)

APPLY_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Lag spans milliseconds (normal) to hours (an outage retried until it ends).
LAG_SECONDS_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    21600.0,
    86400.0,
)


def spec(name: str, served_by: tuple[MetricSpec, ...]) -> MetricSpec:
    [found] = [m for m in served_by if m.name == name]
    return found


def all_names() -> frozenset[str]:
    return frozenset(m.name for m in (*WEB_METRICS, *WORKER_METRICS))
