"""Telling a database outage (retry until it is back) from a statement that can never succeed."""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InterfaceError, OperationalError

#: The statement itself is wrong for the data (bad bytes, a violated constraint): retrying cannot help.
PERMANENT_ERRORS = (DataError, IntegrityError)

_CONNECTIVITY = (
    OSError,  # refused, reset, unreachable (ConnectionError is an OSError)
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
)


def is_connectivity_error(error: BaseException) -> bool:
    """True when the database could not be reached or dropped the connection."""
    if isinstance(error, DBAPIError):
        if error.connection_invalidated or isinstance(error, (OperationalError, InterfaceError)):
            return True
        error = error.orig or error
    seen = 0
    while error is not None and seen < 5:  # the driver's cause sits a few links down
        if isinstance(error, _CONNECTIVITY):
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False
