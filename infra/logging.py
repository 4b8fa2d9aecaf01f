"""structlog JSON logging; stdlib loggers (Dramatiq, uvicorn) are rendered the same way.

Each processor does one thing. ``redact`` keeps emails and tokens out of every line.
"""

from __future__ import annotations

import logging
import re
import sys

import structlog

SECRET_KEYS = frozenset({"authorization", "token", "password", "secret", "api_key", "email", "admin_api_token", "frontend_api_token"})
#: Also percent-encoded (``%40``), as uvicorn's access log writes a path holding an email.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"']+")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")


def scrub(text: str) -> str:
    """Mask email addresses, bearer tokens and URL passwords inside free text."""
    text = _EMAIL.sub("[email]", text)
    text = _BEARER.sub(r"\1[redacted]", text)
    return _URL_PASSWORD.sub(r"\1[redacted]@", text)


def _clean(key: object, value: object) -> object:
    if isinstance(key, str) and key.lower() in SECRET_KEYS:
        return "[redacted]"
    if isinstance(value, str):
        return scrub(value)
    # Nested values too: e.g. validation errors quote the producer's input in `msg` and `loc`.
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: _clean(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_clean(None, item) for item in value]
    return value


def redact(_logger, _method, event_dict: dict) -> dict:
    for key, value in list(event_dict.items()):
        event_dict[key] = _clean(key, value)
    return event_dict


def configure_logging(level: str = "INFO") -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    structlog.configure(
        # Drop below-level calls first, before any processor spends time on them.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[redact, structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries(root.getEffectiveLevel())


#: Libraries whose info lines are bookkeeping (APScheduler: every job it runs; alembic: its
#: plugins, each revision): only their warnings and errors make a line.
QUIET_LIBRARIES = ("apscheduler", "alembic")


def quiet_libraries(level: int = logging.WARNING) -> None:
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(max(logging.WARNING, level))
