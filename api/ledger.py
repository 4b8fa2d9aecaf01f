"""A customer's ledger history: paged JSON for the front end, the whole of it as CSV for admins."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse

from api.auth import admin, frontend
from api.schemas import Identifier
from service_layer import ledger_history
from service_layer.errors import CustomerNotFound

router = APIRouter()
Cursor = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page")]
Limit = Annotated[int, Query(ge=1, le=200)]


async def page_or_error(
    request: Request, customer_id: str, cursor: str | None, limit: int
) -> ledger_history.HistoryPage:
    """One page of history, or the 404 / 422 the API and the console both answer."""
    try:
        return await ledger_history.history_page(request.app.state.db, customer_id, cursor, limit)
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    except ledger_history.BadCursor as error:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(error)) from None


async def csv_download(request: Request, customer_id: str) -> StreamingResponse:
    """The whole history as CSV, streamed (no Content-Length), oldest first."""
    db = request.app.state.db
    try:
        await ledger_history.require_customer(db, customer_id)
    except CustomerNotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
    filename = "ledger-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in customer_id)[:100] + ".csv"
    return StreamingResponse(
        ledger_history.history_csv(db, customer_id),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "no-store"},
    )


@router.get(
    "/api/customers/{customer_id}/ledger",
    response_model=ledger_history.HistoryPage,
    dependencies=[frontend],
    responses={404: {"description": "No such customer"}},
)
async def ledger(
    customer_id: Identifier, request: Request, cursor: Cursor = None, limit: Limit = 50
) -> ledger_history.HistoryPage:
    """The customer's entries, newest first; follow ``next_cursor`` until it is null."""
    return await page_or_error(request, customer_id, cursor, limit)


@router.get(
    "/api/admin/customers/{customer_id}/ledger.csv",
    dependencies=[admin],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/csv": {}}}, 404: {"description": "No such customer"}},
)
async def ledger_csv(customer_id: Identifier, request: Request) -> StreamingResponse:
    return await csv_download(request, customer_id)
