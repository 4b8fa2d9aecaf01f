"""How the API answers input it cannot take: always a 4xx with a plain reason, never a 500."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import StatementError

from domain import CreditLimitExceeded, DomainError


async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input back, and cannot serialise NaN or Infinity.
    return JSONResponse(
        status_code=422, content={"detail": jsonable_encoder(error.errors(), custom_encoder={float: _finite})}
    )


async def _refused(request: Request, error: DomainError) -> JSONResponse:
    # A rule the ledger refuses (a balance past its bound, say) is the caller's conflict, never a 500.
    reason = "credit_limit" if isinstance(error, CreditLimitExceeded) else "refused"
    return JSONResponse(status_code=409, content={"detail": str(error), "reason": reason})


async def _overflow(request: Request, error: OverflowError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": "a date or number is out of range"})


async def _not_utf8(request: Request, error: UnicodeEncodeError) -> JSONResponse:
    # A lone surrogate ("\ud800") is valid JSON text but not storable text.
    return JSONResponse(status_code=422, content={"detail": "text must be valid Unicode (no lone surrogates)"})


async def _statement_error(request: Request, error: StatementError) -> JSONResponse:
    if isinstance(error.orig, UnicodeEncodeError):
        return await _not_utf8(request, error.orig)
    if isinstance(error.orig, OverflowError):
        return await _overflow(request, error.orig)
    raise error


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(DomainError, _refused)
    app.add_exception_handler(OverflowError, _overflow)
    app.add_exception_handler(UnicodeEncodeError, _not_utf8)
    app.add_exception_handler(StatementError, _statement_error)


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)
