"""`/healthz`, `/readyz` and the offline API docs, on a real uvicorn server (or the ASGI app
itself where the server would refuse to start) over real PostgreSQL and Redis."""

from __future__ import annotations

import re
import secrets
from urllib.parse import urljoin, urlsplit

import httpx

from api.app import create_app
from infra.db import Database
from infra.db.engine import head_revision
from infra.settings import Settings
from tests.support import InProcessServer, free_port

TOKENS = {"admin_api_token": "admin-" + secrets.token_hex(16), "frontend_api_token": "front-" + secrets.token_hex(16)}


def settings_for(database_url: str, redis_url: str) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, **TOKENS)


async def test_ready_when_the_database_is_migrated_and_redis_answers(pg_url, redis_url):
    async with (
        InProcessServer(create_app(settings_for(pg_url, redis_url))) as server,
        httpx.AsyncClient(base_url=server.base_url) as http,
    ):
        alive = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok"}}


async def test_not_ready_while_redis_is_unreachable(pg_url):
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with (
        InProcessServer(create_app(settings_for(pg_url, closed))) as server,
        httpx.AsyncClient(base_url=server.base_url) as http,
    ):
        alive = await http.get("/healthz")
        ready = await http.get("/readyz")
    assert alive.status_code == 200  # alive: restarting it would not help
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready" and body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("unreachable (") and "ConnectionError" in body["checks"]["broker"], body
    assert body["reasons"] == [f"broker: {body['checks']['broker']}"]


async def test_not_ready_on_a_database_behind_on_migrations(empty_database, redis_url):
    # `credits web` refuses to start on it; a database restored from an old backup under a
    # running web is the same case. The app itself, on that database, answers the probe.
    db = Database(empty_database)
    try:
        app = create_app(settings_for(empty_database, redis_url), db=db)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://credits.test") as http:
            ready = await http.get("/readyz")
    finally:
        await db.dispose()
    assert ready.status_code == 503
    body = ready.json()
    assert body["checks"]["broker"] == "ok"
    expected = f"not migrated: at an empty schema, needs {head_revision()} (run `credits migrate`)"
    assert body["checks"]["database"] == expected
    assert body["reasons"] == [f"database: {expected}"]


async def test_docs_load_everything_from_our_own_origin(pg_url, redis_url):
    async with (
        InProcessServer(create_app(settings_for(pg_url, redis_url))) as server,
        httpx.AsyncClient(base_url=server.base_url) as http,
    ):
        page = await http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        # Every URL the page names (src, href, and the ones its inline script passes to Swagger UI).
        urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url:\s*['"]([^'"]+)['"]""", html)
        assert any(u.endswith(".js") for u in urls) and any(u.endswith(".css") for u in urls), html
        for url in urls:
            absolute = urljoin(server.base_url + "/docs", url)
            assert urlsplit(absolute).netloc == urlsplit(server.base_url).netloc, f"/docs loads {url} from elsewhere"
        assert "cdn" not in html.lower()
        expected = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
        for url in urls:
            asset = await http.get(url)
            assert asset.status_code == 200, url
            kind = next(v for k, v in expected.items() if url.endswith(k))
            assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
            assert len(asset.content) > 100, url
        spec = await http.get("/openapi.json")
    assert spec.json()["info"]["title"] == "credits"
