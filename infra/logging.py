"""structlog JSON logging; stdlib loggers (Dramatiq, uvicorn) are rendered the same way.

Each processor or filter does one thing. What a line may carry (docs/SECURITY.md, "What is logged"):
- never a message's arguments: Dramatiq formats a message as ``actor(args, kwargs)`` in its lines
  ("Failed to process message …"); ``HideMessageArguments`` puts the actor and id in its place;
- never a request's query string: ``HideQueryStrings`` logs uvicorn's access line with the path only;
- no secret or personal data: ``redact`` masks a field whose name says it is one (by structure),
  then cuts every string to LOG_MAX_VALUE_CHARS and masks what the patterns know (``infra.masking``).
"""

from __future__ import annotations

import logging
import sys

import structlog

from infra.masking import DEFAULT_MAX_CHARS, is_secret_field, scrub

__all__ = ["configure_logging", "redactor", "scrub"]

#: A traceback (the ``exception`` field) may be this many times LOG_MAX_VALUE_CHARS: its frames
#: are what an operator needs, and it is code's text more than the input's.
TRACEBACK_FACTOR = 4
#: A logged list or mapping keeps at most this many items.
MAX_ITEMS = 50
_PLAIN = (str, int, float, bool, type(None))
#: Fields this module's own processors write: nothing from outside is in them.
_OWN_FIELDS = frozenset({"timestamp", "level", "logger"})


def _clean(key: object, value: object, max_chars: int) -> object:
    if isinstance(key, str) and is_secret_field(key):
        return "[redacted]"
    if isinstance(value, str):
        return scrub(value, max_chars)
    if isinstance(value, _PLAIN):
        return value
    # Nested values too: e.g. an error list naming the producer's fields.
    if isinstance(value, dict):
        items = list(value.items())
        cleaned = {
            (scrub(k, max_chars) if isinstance(k, str) else k): _clean(k, v, max_chars) for k, v in items[:MAX_ITEMS]
        }
        if len(items) > MAX_ITEMS:
            cleaned["…"] = f"{len(items) - MAX_ITEMS} more"
        return cleaned
    if isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        cleaned = [_clean(None, item, max_chars) for item in items[:MAX_ITEMS]]
        return cleaned + ([f"…{len(items) - MAX_ITEMS} more"] if len(items) > MAX_ITEMS else [])
    # Anything else would be rendered by its repr, which no one has bounded or masked.
    return scrub(repr(value), max_chars)


def redactor(max_chars: int = DEFAULT_MAX_CHARS):
    """The processor that masks and bounds every value of a line (see the module's doc)."""

    def redact(_logger, _method, event_dict: dict) -> dict:
        for key, value in list(event_dict.items()):
            if key not in _OWN_FIELDS:
                event_dict[key] = _clean(key, value, max_chars * TRACEBACK_FACTOR if key == "exception" else max_chars)
        return event_dict

    return redact


class HideMessageArguments(logging.Filter):
    """Dramatiq's lines format a message (or its proxy) whole, arguments and all: log its actor and id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(_is_message(arg) for arg in record.args):
            record.args = tuple(
                f"{arg.actor_name}(message {arg.message_id})" if _is_message(arg) else arg for arg in record.args
            )
        return True


def _is_message(value: object) -> bool:
    return not isinstance(value, _PLAIN) and hasattr(value, "actor_name") and hasattr(value, "message_id")


class HideQueryStrings(logging.Filter):
    """uvicorn's access line holds the request's query string (``?token=…``): keep the path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, target, version, status = record.args
            if isinstance(target, str):
                record.args = (client, method, target.split("?", 1)[0], version, status)
        return True


def configure_logging(level: str = "INFO", max_value_chars: int = DEFAULT_MAX_CHARS) -> None:
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
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                redactor(max_value_chars),
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    # On the handler, not a logger: a logger's filters do not see its children's records.
    handler.addFilter(HideMessageArguments())
    handler.addFilter(HideQueryStrings())
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
