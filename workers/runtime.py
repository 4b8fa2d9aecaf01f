"""What a worker process shares: settings, the database, the clock.

The database is created on first use, from the event-loop thread that runs the async
actors, because asyncpg connections belong to the loop that opened them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from infra.clock import Clock, SystemClock
from infra.db import Database
from infra.settings import Settings, get_settings
from service_layer import events
from service_layer.apply import Rules
from service_layer.unit_of_work import SqlUnitOfWork
from workers.batching import EventBatcher


@dataclass
class Runtime:
    settings: Settings
    clock: Clock = field(default_factory=SystemClock)
    _db: Database | None = None
    _provider: object | None = None
    _payout_gateways: dict | None = None
    _mailer: object | None = None
    _event_batcher: EventBatcher | None = None

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.settings.effective_database_url, pool_size=self.settings.db_pool_size)
        return self._db

    @property
    def provider(self):
        """The payment provider (Stripe), or None when STRIPE_API_KEY is not set."""
        if self._provider is None and self.settings.stripe_api_key is not None:
            from infra.stripe.client import StripeProvider

            self._provider = StripeProvider(self.settings)
        return self._provider

    @property
    def payout_gateways(self) -> dict:
        if self._payout_gateways is None:
            from infra.payouts import payout_gateways

            self._payout_gateways = payout_gateways(self.settings)
        return self._payout_gateways

    @property
    def mailer(self):
        """The SMTP mailer, or None when SMTP_HOST is not set."""
        if self._mailer is None and self.settings.smtp_host:
            from infra.mail import SmtpMailer

            self._mailer = SmtpMailer(self.settings)
        return self._mailer

    @property
    def rules(self) -> Rules:
        """The business's rules every use case here applies (from the settings)."""
        return Rules(self.settings.policy, self.settings.dunning, self.settings.referrals)

    @property
    def event_batcher(self) -> EventBatcher:
        """Group commit for this process's batchable events (created on the actors' event loop)."""
        if self._event_batcher is None:
            settings = self.settings
            rules = (settings.policy, settings.dunning, settings.referrals)
            self._event_batcher = EventBatcher(
                lambda batch: events.apply_events(batch, self.new_uow(), *rules),
                lambda event: events.apply_event(event, self.new_uow(), *rules),
                max_batch=settings.event_batch_size,
                in_flight=settings.event_batch_in_flight,
            )
        return self._event_batcher

    def new_uow(self) -> SqlUnitOfWork:
        return SqlUnitOfWork(self.db)


_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(get_settings())
    return _runtime


def configure_runtime(runtime: Runtime) -> None:
    """Replace the process's runtime (the demo and tests use a movable clock)."""
    global _runtime
    _runtime = runtime
