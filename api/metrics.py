"""GET /metrics: the business read from the ledger, in Prometheus's text format.

A prometheus-client collector serves the figures of service_layer/business_figures.py. They
are read at scrape time, at most once per METRICS_CACHE_SECONDS whatever the number of
scrapers (concurrent scrapes wait for the one read), under METRICS_QUERY_TIMEOUT_MS.
"""

from __future__ import annotations

import asyncio
import time

import structlog
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy.exc import SQLAlchemyError

from api.auth import scraper
from infra import metrics as catalogue
from service_layer.business_figures import BusinessFigures, read_figures

log = structlog.get_logger("credits.metrics")
router = APIRouter()


class BusinessCollector:
    """A custom collector over the last figures read; ``refresh`` reads them when stale."""

    def __init__(self) -> None:
        self.figures: BusinessFigures | None = None
        self.read_at: float | None = None
        self.figures_at: float | None = None
        self._reading = asyncio.Lock()

    async def refresh(self, state) -> None:
        settings = state.settings
        async with self._reading:
            if self.read_at is not None and time.monotonic() - self.read_at < settings.metrics_cache_seconds:
                return
            try:
                self.figures = await read_figures(
                    state.db, state.clock.now(), settings.depleted_report_days, settings.metrics_query_timeout_ms
                )
                self.figures_at = time.monotonic()
            except (SQLAlchemyError, OSError) as error:
                # No stale figures: Prometheus sees credits_figures_up 0 and the gap.
                self.figures = None
                log.warning("metrics_figures_not_read", error=f"{type(error).__name__}: {error}"[:500])
            # A failed read waits out the period too: a struggling database is not asked again at once.
            self.read_at = time.monotonic()

    def describe(self):
        return []  # nothing to read at registration

    def collect(self):
        yield _gauge("credits_figures_up", 0 if self.figures is None else 1)
        if self.figures is None:
            return
        yield _gauge("credits_figures_age_seconds", time.monotonic() - self.figures_at)
        yield from _families(self.figures)


def _families(figures: BusinessFigures):
    yield _family("credits_events_total", figures.events)
    yield _family("credits_dead_letters_total", figures.dead_letters)
    yield _family("credits_dead_letters_waiting", figures.dead_letters_waiting)
    yield _gauge("credits_outbox_pending", figures.outbox_pending)
    yield _gauge("credits_outbox_oldest_due_seconds", figures.outbox_oldest_due_seconds)
    yield _family("credits_dunning_cases", figures.dunning_cases)
    yield _family("credits_payouts_total", figures.payouts)
    yield _gauge("credits_at_risk_customers", figures.at_risk_customers)


def _gauge(name: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, catalogue.spec(name, catalogue.WEB_METRICS).help, value=value)


def _family(name: str, values: dict):
    spec = catalogue.spec(name, catalogue.WEB_METRICS)
    if spec.kind == "counter":
        family = CounterMetricFamily(spec.family, spec.help, labels=spec.labels)
    else:
        family = GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
    for key, value in sorted(values.items()):
        family.add_metric(key if isinstance(key, tuple) else (key,), value)
    return family


def _registry(state) -> tuple[CollectorRegistry, BusinessCollector]:
    """One registry per app (tests run several apps in one process)."""
    if getattr(state, "metrics_registry", None) is None:
        collector = BusinessCollector()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        ProcessCollector(registry=registry)
        state.metrics_registry = (registry, collector)
    return state.metrics_registry


@router.get("/metrics", include_in_schema=False, dependencies=[scraper])
async def metrics(request: Request) -> Response:
    registry, collector = _registry(request.app.state)
    await collector.refresh(request.app.state)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
