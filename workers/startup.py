"""Optional settings a worker deployment runs without: said once, when `credits worker` starts.

Without them nothing is lost (notifications wait in the outbox, due payment retries in the
database), so the periodic jobs that would use them stay quiet instead of warning every run.
"""

from __future__ import annotations

import structlog

from infra.settings import Settings

log = structlog.get_logger("credits.workers")

#: (setting, event, what waits while it is unset)
OPTIONAL_SETTINGS = (
    (
        "smtp_host",
        "notifications_not_sent",
        "SMTP_HOST is not set: customer notifications wait in the outbox until it is",
    ),
    (
        "stripe_api_key",
        "payments_not_collected",
        "STRIPE_API_KEY is not set: due payment retries wait in the database until it is",
    ),
)


def warn_unset_optional_settings(settings: Settings) -> int:
    """One warning per unset optional setting. Returns how many."""
    unset = [(event, reason) for name, event, reason in OPTIONAL_SETTINGS if not getattr(settings, name)]
    for event, reason in unset:
        log.warning(event, reason=reason)
    return len(unset)
