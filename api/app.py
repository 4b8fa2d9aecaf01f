"""HTTP entry point: assembles the app from its routers (one module per area). Routes stay
thin: authenticate, validate, call the service layer."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from api import admin, admin_page, console, customers, errors, health, ledger, metrics, referrals, webhooks
from api.body_limits import BodyLimits, limit_for
from infra.broker import is_embedded, make_broker
from infra.clock import Clock, SystemClock
from infra.db import Database, require_current_schema
from infra.settings import Settings, SettingsError, get_settings


def create_app(settings: Settings | None = None, *, clock: Clock | None = None, db: Database | None = None) -> FastAPI:
    settings = settings or get_settings()
    if settings.admin_api_token is None or settings.frontend_api_token is None:
        raise SettingsError(
            "invalid configuration: ADMIN_API_TOKEN and FRONTEND_API_TOKEN must both be set to serve HTTP"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = db is None
        app.state.db = db or Database(settings.effective_database_url, pool_size=settings.db_pool_size)
        await require_current_schema(app.state.db)
        try:
            yield
        finally:
            if owned:
                await app.state.db.dispose()
            if app.state.broker is not None:
                app.state.broker.close()

    # /docs and /redoc load Swagger UI and ReDoc from our own origin (fastapi-offline), never a CDN.
    app = FastAPIOffline(title="credits", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.clock = clock or SystemClock()
    app.state.db = db
    # Webhooks and "retry now" hand work to the workers over the broker; without one (the
    # embedded default) no worker could receive it, so those routes answer 503 rather than lose it.
    app.state.broker = None if is_embedded(settings) else make_broker(settings, middleware=[])
    errors.install(app)
    for area in (health, referrals, ledger, console, admin_page, metrics, customers, admin, webhooks):
        app.include_router(area.router)
    admin_page.install_session(app, settings)
    # Added last, so it runs first: before sessions, routing and every token check.
    app.add_middleware(BodyLimits, limit_for=limit_for(settings))
    return app


def app_factory() -> FastAPI:
    """For ``uvicorn --factory api.app:app_factory``."""
    from infra.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_max_value_chars)
    return create_app(settings)
