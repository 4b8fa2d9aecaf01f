"""The admin pages' app in-process over httpx, with a client that keeps cookies like a browser."""

from __future__ import annotations

from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select

from api.app import create_app
from domain import CreditPolicy
from infra.clock import FixedClock
from infra.db.tables import customer_notes
from infra.settings import load_settings
from messages import JobCompleted, PaymentSucceeded
from service_layer import handlers
from service_layer.unit_of_work import SqlUnitOfWork

ADMIN_TOKEN = "admin-token-page-api-0123456789abcdef"
FRONTEND_TOKEN = "frontend-token-page-api-0123456789abcdef"
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
COOKIE = "credits_admin"
JSON = {"Content-Type": "application/json"}


class Page:
    """The app in-process and a client that keeps cookies like a browser, recording every response."""

    def __init__(self, http: httpx.AsyncClient, clock: FixedClock, responses: list[httpx.Response], app=None) -> None:
        self.http = http
        self.clock = clock
        self.responses = responses
        self.app = app

    async def sign_in(self) -> httpx.Response:
        response = await self.http.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert response.status_code == 303, response.text
        return response


@asynccontextmanager
async def serving(db, pg_url: str, **overrides):
    settings = load_settings(
        **{
            "database_url": pg_url,
            "admin_api_token": ADMIN_TOKEN,
            "frontend_api_token": FRONTEND_TOKEN,
            "admin_cookie_secure": False,  # plain http in-process
            "admin_live_interval_seconds": 0.2,
            "redis_url": None,
            **overrides,
        }
    )
    clock = FixedClock(NOW)
    app = create_app(settings, db=db, clock=clock)
    responses: list[httpx.Response] = []

    async def record(response: httpx.Response) -> None:
        responses.append(response)

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            # A browser sends its page's Origin with every POST (api/same_origin.py checks it).
            transport=transport,
            base_url="http://credits.test",
            headers={"Origin": "http://credits.test"},
            event_hooks={"response": [record]},
        ) as http,
    ):
        yield Page(http, clock, responses, app)
    for response in responses:
        assert ADMIN_TOKEN not in str(response.url), response.url
        assert ADMIN_TOKEN not in str(response.request.url), response.request.url
        for name, value in response.headers.multi_items():
            assert ADMIN_TOKEN not in value, (
                f"the admin token in the {name} header of {response.request.method} {response.url}"
            )


def set_cookie(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


async def depleted(db, customer_id: str, since: datetime, credits: int = 2) -> None:
    """A customer whose credits ran out at ``since``."""
    policy = CreditPolicy()
    paid = PaymentSucceeded(
        event_id=f"pay-{customer_id}",
        occurred_at=since - timedelta(days=30),
        customer_id=customer_id,
        payment_id=f"in-{customer_id}",
        credits=credits,
    )
    used = JobCompleted(
        event_id=f"job-{customer_id}",
        occurred_at=since,
        customer_id=customer_id,
        job_id=f"job-{customer_id}",
        credits=credits,
    )
    for event in (paid, used):
        await handlers.apply_event(event, SqlUnitOfWork(db), policy)


async def notes(db) -> dict[str, str]:
    async with db.connect() as connection:
        return dict((await connection.execute(select(customer_notes.c.customer_id, customer_notes.c.note))).all())
