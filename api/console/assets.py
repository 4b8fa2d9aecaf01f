"""The console's own script and style sheet, served by us (no CDN), from a fixed list."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import Response

ASSETS = Path(__file__).resolve().parent.parent / "static" / "console"
TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript; charset=utf-8"}
CONTENT = {name: (ASSETS / name).read_bytes() for name in TYPES}

router = APIRouter(include_in_schema=False)


@router.get("/admin/assets/{name}")
async def asset(name: Literal["console.css", "console.js"]) -> Response:
    # Public (no session needed): the sign-in page may use them; nothing in them is secret.
    return Response(
        CONTENT[name],
        media_type=TYPES[name],
        headers={"Cache-Control": "public, max-age=300", "X-Content-Type-Options": "nosniff"},
    )
