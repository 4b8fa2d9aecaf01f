"""Analytics: credits by month (issued, used, expired, outstanding), breakage, upcoming expirations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api.console.chart import monthly_chart
from api.console.pages import back, render, require_admin
from domain import add_months
from service_layer import analytics

router = APIRouter(include_in_schema=False)
MonthText = Annotated[str, Query(max_length=7, pattern=r"^(|2[0-9]{3}-(0[1-9]|1[0-2]))$")]


@router.get("/admin/analytics", dependencies=[Depends(require_admin)])
async def page(request: Request, since: MonthText = "", until: MonthText = ""):
    """``since`` and ``until`` are months (YYYY-MM, UTC), both included; the last twelve by default."""
    start = _month(since)
    end = add_months(_month(until), 1) if until else None
    if start and end and start >= end:
        return back(request, "/admin/analytics", "The first month must not be after the last.", ok=False)
    found = await analytics.credits_analytics(request.app.state.db, request.app.state.clock.now(), start, end)
    return await render(
        request, "analytics.html", "Analytics", found=found, chart=monthly_chart(found.months), since=since, until=until
    )


def _month(text: str) -> datetime | None:
    return datetime(int(text[:4]), int(text[5:7]), 1, tzinfo=UTC) if text else None
