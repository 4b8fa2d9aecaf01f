"""Configuration from the environment or `.env`, validated once at start."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from functools import lru_cache
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from domain import CreditPolicy, EventWindow
from domain.dunning import DunningRules, RetryNowLimit, RetrySchedule
from domain.referrals import FraudRules, PayoutCalendar, ReferralRules, ReferrerKind

EMBEDDED_DATABASE_URL = "sqlite+aiosqlite:///credits.sqlite3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    #: Unset: the embedded default (SQLite file). Set: PostgreSQL via asyncpg.
    database_url: str | None = None
    #: Unset: an in-process Redis (fakeredis) behind the real RedisBroker.
    redis_url: str | None = None
    #: The message broker: amqp:// (RabbitMQ) or redis://. Unset: REDIS_URL is the broker.
    #: With RabbitMQ, REDIS_URL (optional) only lets several schedulers share ticks.
    broker_url: str | None = None

    admin_api_token: SecretStr | None = None
    frontend_api_token: SecretStr | None = None

    credit_expiration_months: int = Field(12, ge=1, le=120)
    allow_unlimited_rollover: bool = True
    rollover_cap: int | None = Field(None, ge=0)
    hold_ttl_days: int = Field(30, ge=1, le=365)
    depleted_report_days: int = Field(14, ge=0, le=3650)

    expire_credits_every_minutes: int = Field(60, ge=1)
    lapse_holds_every_minutes: int = Field(15, ge=1)
    sweep_batch_size: int = Field(500, ge=1, le=100_000)

    #: Events dated further ahead than this, or older than EVENT_MAX_AGE_DAYS, are refused.
    event_max_future_seconds: int = Field(300, ge=0, le=86_400)
    event_max_age_days: int = Field(400, ge=1)

    event_max_retries: int = Field(20, ge=0)
    #: While the database is unreachable, keep retrying (at the max back-off) this many times:
    #: with 10-minute back-off, about 69 days. Nothing is dead-lettered by an outage.
    event_max_outage_retries: int = Field(10_000, ge=0)
    event_min_backoff_ms: int = Field(1_000, ge=1)
    event_max_backoff_ms: int = Field(600_000, ge=1)
    #: Group commit: up to this many job and adjustment events that reach a worker process
    #: together share one transaction (1 turns it off), in at most EVENT_BATCH_IN_FLIGHT
    #: transactions at once per process. A process holds one event per worker thread
    #: (`credits worker --threads`, 64): two batches of 32 in flight use them all.
    event_batch_size: int = Field(32, ge=1, le=1_000)
    event_batch_in_flight: int = Field(2, ge=1, le=100)

    #: Redis broker: a worker process silent this long is dead, and the messages it had fetched
    #: go back on their queue. Every worker process heartbeats and runs that check (Dramatiq's own
    #: maintenance) every REDIS_MAINTENANCE_INTERVAL_SECONDS, so a dead process's messages are back
    #: within timeout + interval (docs/OPERATIONS.md, "Supervision").
    redis_heartbeat_timeout_seconds: int = Field(30, ge=5, le=3600)
    redis_maintenance_interval_seconds: float = Field(5.0, ge=0.5, le=600)

    # ------------------------------------------------------------ Stripe and dunning
    #: Unset: no payment provider; retries wait (nothing is lost) and webhooks answer 503.
    stripe_api_key: SecretStr | None = None
    #: Where the Stripe SDK sends API requests (tests point it at a local fake Stripe).
    stripe_api_base: str | None = None
    stripe_timeout_seconds: float = Field(20, gt=0, le=120)
    #: Webhook signing secrets, comma-separated: every one is accepted, so a secret can be rotated.
    stripe_webhook_secrets: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    stripe_webhook_tolerance_seconds: int = Field(300, ge=1, le=3600)
    #: Credits per unit of each Stripe price, as JSON: {"price_123": 10}. A price's own
    #: `credits` metadata is used for prices not listed here.
    stripe_plan_credits: Annotated[dict[str, int], NoDecode] = {}
    #: Stripe's customer-portal login link: where a customer updates their payment method.
    stripe_billing_portal_url: str | None = None

    #: Days after the first failed payment on which it is retried: 3-5 retries within 7-14 days.
    dunning_retry_days: Annotated[tuple[int, ...], NoDecode] = (1, 3, 7, 14)
    #: When the schedule is exhausted: keep the subscription (past due), or cancel it at Stripe.
    dunning_end_action: Literal["keep", "cancel_subscription"] = "keep"
    collect_payments_every_minutes: int = Field(5, ge=1, le=1440)
    #: "Retry now" and payment-method updates charge at once at most this often per customer.
    payment_retry_now_limit: int = Field(3, ge=1, le=100)
    payment_retry_now_window_minutes: int = Field(60, ge=1, le=10_080)

    # ------------------------------------------------------------ referrals and payouts
    #: Reward per qualified referral in cents, by referrer kind (JSON).
    referral_rewards_cents: Annotated[dict[str, int], NoDecode] = {
        "customer": 2_000,
        "employee": 1_000,
        "partner": 5_000,
    }
    referral_hold_days: int = Field(14, ge=0, le=180)
    referral_velocity_limit: int = Field(5, ge=1, le=10_000)
    referral_velocity_window_hours: int = Field(24, ge=1, le=24 * 90)
    payout_currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    payout_minimum_cents: int = Field(1_000, ge=1)
    #: Payouts are weekly on Fridays in this time zone.
    payout_timezone: str = "America/New_York"
    #: Payout method → gateway (JSON): stripe_connect (Stripe Connect transfers) or manual (CSV for operations).
    payout_gateways: Annotated[dict[str, str], NoDecode] = {
        "stripe_connect": "stripe_connect",
        "cash_app": "manual",
        "manual": "manual",
    }
    pay_referrals_every_minutes: int = Field(60, ge=1, le=1440)

    # ------------------------------------------------------------ notifications and retention
    #: Unset: notifications wait in the outbox (nothing is lost) until an SMTP server is configured.
    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    #: starttls (port 587), tls (implicit, port 465) or none (a local relay).
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_from: str = Field("Credits <no-reply@example.com>", min_length=3, max_length=320)
    smtp_timeout_seconds: float = Field(20, gt=0, le=300)
    #: Customers are warned this many days before a lot of their credits expires.
    notify_expiry_days_before: int = Field(30, ge=1, le=365)
    send_notifications_every_minutes: int = Field(1, ge=1, le=1440)
    warn_expiring_credits_every_minutes: int = Field(1440, ge=1, le=10_080)
    notice_retention_every_minutes: int = Field(15, ge=1, le=1440)
    #: The admin page's session cookie is Secure (HTTPS only) unless this is false (local use).
    admin_cookie_secure: bool = True
    #: How often the admin page's live bubble re-reads the count (server-sent events).
    admin_live_interval_seconds: float = Field(2.0, ge=0.2, le=300)
    #: An admin page session ends after this long without a request, and in any case this long after sign-in.
    admin_session_idle_minutes: int = Field(30, ge=1, le=1440)
    admin_session_max_hours: int = Field(8, ge=1, le=168)
    #: Sign-in attempts allowed per client address, and from everyone together, per window; more answer 429.
    admin_sign_in_limit_per_address: int = Field(10, ge=1, le=10_000)
    admin_sign_in_limit_total: int = Field(100, ge=1, le=1_000_000)
    admin_sign_in_window_minutes: int = Field(15, ge=1, le=1440)
    #: Where the admin page is served from (scheme://host[:port], comma-separated): a state-changing
    #: admin request must come from one of them. Unset: from the host the request was sent to.
    admin_allowed_origins: Annotated[tuple[str, ...], NoDecode] = ()

    # ------------------------------------------------------------ metrics (Prometheus)
    #: Worker processes serve their metrics on this port (Dramatiq's exposition server); 0: none.
    metrics_port: int = Field(9191, ge=0, le=65535)
    metrics_host: str = Field("0.0.0.0", min_length=1)
    #: Where worker processes keep prometheus-client's multiprocess files. Unset: a directory
    #: per metrics port under the system's temporary directory. Emptied when a worker run starts.
    metrics_dir: str | None = None
    #: The web's /metrics reads the business figures from the database at most this often.
    metrics_cache_seconds: float = Field(5.0, ge=0, le=3600)
    #: ... and gives those queries at most this long (PostgreSQL statement timeout).
    metrics_query_timeout_ms: int = Field(2_000, ge=100, le=60_000)
    #: Set: the web's /metrics asks for `Authorization: Bearer <token>` (business figures are
    #: not for the public). Unset: /metrics is open; keep it off the public network.
    metrics_token: SecretStr | None = None
    # ------------------------------------------------------------ HTTP request limits
    #: `credits web` answers 414 to a longer request line (method, URL, version), before parsing it.
    http_max_request_line_bytes: int = Field(8_192, ge=256, le=1_048_576)
    #: ... and 431 to header lines longer than this together.
    http_max_header_bytes: int = Field(16_384, ge=1_024, le=1_048_576)
    #: Request bodies of every route not named below (the JSON API): larger is refused with 413.
    http_max_body_bytes: int = Field(65_536, ge=1_024, le=104_857_600)
    #: Stripe's events are a few kilobytes; an unauthenticated body is read no further than this.
    stripe_webhook_max_body_bytes: int = Field(1_000_000, ge=65_536, le=104_857_600)
    #: The admin page's sign-in form holds one token.
    admin_login_max_body_bytes: int = Field(4_096, ge=256, le=1_048_576)

    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    #: Every logged string is cut to this many characters (start and end kept) before masking.
    log_max_value_chars: int = Field(2_000, ge=200, le=100_000)
    #: A message larger than this (bytes, as stored in the broker) is dead-lettered unread.
    max_message_bytes: int = Field(65_536, ge=4_096, le=16_777_216)
    db_pool_size: int = Field(5, ge=1, le=100)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        if not url:
            raise ValueError("is empty; unset it for the embedded SQLite default")
        # The async driver is the one installed; accept the usual spellings of a PostgreSQL URL.
        for prefix in ("postgres://", "postgresql://"):
            if url.startswith(prefix):
                return "postgresql+asyncpg://" + url[len(prefix) :]
        if not url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError("must be a postgresql:// (asyncpg) or sqlite+aiosqlite:// URL")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL (unset it for the in-process Redis)")
        return url

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        url = url.strip()
        if not url.startswith(("amqp://", "amqps://", "redis://", "rediss://", "unix://")):
            raise ValueError("must be an amqp:// or amqps:// (RabbitMQ) or a redis:// URL (unset it to use REDIS_URL)")
        return url

    @field_validator(
        "stripe_api_key",
        "stripe_api_base",
        "stripe_billing_portal_url",
        "smtp_host",
        "smtp_username",
        "smtp_password",
        "metrics_dir",
        "metrics_token",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # Compose and .env files spell "not set" as an empty value.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("stripe_webhook_secrets", mode="before")
    @classmethod
    def _secrets(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip() for part in value.split(",") if part.strip())
        for secret in value or ():
            text = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)
            if not text.startswith("whsec_"):
                raise ValueError("each secret must be a Stripe webhook signing secret (whsec_...)")
        return value

    @field_validator("admin_allowed_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = tuple(part.strip().rstrip("/").lower() for part in value.split(",") if part.strip())
        for origin in value or ():
            if not re.fullmatch(r"https?://[a-z0-9.\-]+(:[0-9]{1,5})?", str(origin)):
                raise ValueError(
                    f"{origin!r} is not an origin such as https://admin.example.com (scheme, host, optional port; no path)"
                )
        return value

    @field_validator("stripe_plan_credits", mode="before")
    @classmethod
    def _plan_credits(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as error:
                raise ValueError(f'must be a JSON object such as {{"price_123": 10}}: {error}') from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and type(v) is int and v > 0 for k, v in value.items()
        ):
            raise ValueError('must map Stripe price ids to positive whole credits, e.g. {"price_123": 10}')
        return value

    @field_validator("referral_rewards_cents", "payout_gateways", mode="before")
    @classmethod
    def _json_object(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"must be a JSON object: {error}") from None
        return value

    @field_validator("referral_rewards_cents")
    @classmethod
    def _rewards(cls, value: dict[str, int]) -> dict[str, int]:
        kinds = {kind.value for kind in ReferrerKind}
        if set(value) != kinds or not all(type(v) is int and v >= 0 for v in value.values()):
            raise ValueError(f"must give whole cents >= 0 for exactly {sorted(kinds)}")
        return value

    @field_validator("payout_gateways")
    @classmethod
    def _gateways(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = set(value.values()) - {"stripe_connect", "manual"}
        if unknown or not value:
            raise ValueError(f"gateways must be stripe_connect or manual, got {sorted(unknown) or 'none'}")
        return value

    @field_validator("payout_timezone")
    @classmethod
    def _timezone(cls, name: str) -> str:
        try:
            ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {name!r} (use an IANA name such as America/New_York)") from None
        return name

    @field_validator("dunning_retry_days", mode="before")
    @classmethod
    def _retry_days(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                value = tuple(int(part) for part in value.split(","))
            except ValueError:
                raise ValueError("must be whole days separated by commas, e.g. 1,3,7,14") from None
        RetrySchedule(tuple(value))  # raises ValueError naming what is wrong
        return value

    @field_validator("stripe_api_base", "stripe_billing_portal_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL")
        return url

    @model_validator(mode="after")
    def _coherent(self) -> Settings:
        if not self.allow_unlimited_rollover and self.rollover_cap is None:
            raise ValueError("ROLLOVER_CAP is required when ALLOW_UNLIMITED_ROLLOVER is false")
        if self.broker_url and not self.uses_rabbitmq and self.redis_url and self.broker_url != self.redis_url:
            raise ValueError("BROKER_URL and REDIS_URL name two different Redis servers: set one of them")
        if self.redis_maintenance_interval_seconds * 3 > self.redis_heartbeat_timeout_seconds:
            # A live process must heartbeat several times per timeout, or a busy one is taken for dead.
            raise ValueError(
                "REDIS_MAINTENANCE_INTERVAL_SECONDS must be at most a third of REDIS_HEARTBEAT_TIMEOUT_SECONDS"
            )
        if self.event_min_backoff_ms > self.event_max_backoff_ms:
            raise ValueError("EVENT_MIN_BACKOFF_MS must not exceed EVENT_MAX_BACKOFF_MS")
        for name in ("admin_api_token", "frontend_api_token"):
            token = getattr(self, name)
            if token is not None and len(token.get_secret_value()) < 16:
                raise ValueError(f"{name.upper()} must be at least 16 characters")
        if self.admin_api_token is not None and self.admin_api_token == self.frontend_api_token:
            raise ValueError("ADMIN_API_TOKEN and FRONTEND_API_TOKEN must differ")
        return self

    @property
    def broker_address(self) -> str | None:
        """Where messages travel; None: the embedded in-process Redis."""
        return self.broker_url or self.redis_url

    @property
    def uses_rabbitmq(self) -> bool:
        return bool(self.broker_url and self.broker_url.startswith(("amqp://", "amqps://")))

    @property
    def effective_database_url(self) -> str:
        return self.database_url or EMBEDDED_DATABASE_URL

    @property
    def event_window(self) -> EventWindow:
        return EventWindow(timedelta(seconds=self.event_max_future_seconds), timedelta(days=self.event_max_age_days))

    @property
    def dunning(self) -> DunningRules:
        return DunningRules(
            RetrySchedule(self.dunning_retry_days),
            RetryNowLimit(self.payment_retry_now_limit, timedelta(minutes=self.payment_retry_now_window_minutes)),
        )

    @property
    def referrals(self) -> ReferralRules:
        return ReferralRules(
            rewards_cents={ReferrerKind(kind): cents for kind, cents in self.referral_rewards_cents.items()},
            hold=timedelta(days=self.referral_hold_days),
            fraud=FraudRules(self.referral_velocity_limit, timedelta(hours=self.referral_velocity_window_hours)),
            currency=self.payout_currency,
            minimum_payout_cents=self.payout_minimum_cents,
            calendar=PayoutCalendar(ZoneInfo(self.payout_timezone)),
        )

    @property
    def policy(self) -> CreditPolicy:
        return CreditPolicy(
            credit_expiration_months=self.credit_expiration_months,
            allow_unlimited_rollover=self.allow_unlimited_rollover,
            rollover_cap=self.rollover_cap,
            hold_ttl_days=self.hold_ttl_days,
        )


class SettingsError(SystemExit):
    """Invalid configuration: stop the process with a message naming each bad setting."""


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']).upper() or 'settings'}: {e['msg']}" for e in error.errors()
        )
        raise SettingsError(f"invalid configuration: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
