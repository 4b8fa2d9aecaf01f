"""Which event times the ledger accepts, relative to now.

The ledger catches up to every event's own time and never rewrites history, so one event
dated years ahead (a typo) would expire every lot the customer owns. Such events are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class EventWindow:
    max_future: timedelta = timedelta(minutes=5)
    max_age: timedelta = timedelta(days=400)

    def problem(self, occurred_at: datetime, now: datetime) -> str | None:
        """Why ``occurred_at`` is refused at ``now``, or None when it is acceptable."""
        if occurred_at > now + self.max_future:
            return f"occurred_at {occurred_at.isoformat()} is more than {self.max_future} in the future"
        if occurred_at < now - self.max_age:
            return f"occurred_at {occurred_at.isoformat()} is more than {self.max_age.days} days old"
        return None
