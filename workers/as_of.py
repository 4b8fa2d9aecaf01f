"""The moment a periodic job runs "as of": checked the same way by `credits run` (before
anything is enqueued) and by the actors (for messages from anywhere else)."""

from __future__ import annotations

from datetime import datetime

from infra.masking import shape_of


def parse_as_of(text: object, now: datetime) -> datetime:
    """An ISO 8601 time with a zone, not after ``now``. Raises ValueError saying what is wrong."""
    try:
        moment = datetime.fromisoformat(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"as_of must be an ISO 8601 timestamp such as 2026-01-31T00:00:00Z, got {_quoted(text)}"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"as_of must carry a timezone (e.g. a trailing Z for UTC), got {_quoted(text)}")
    if moment > now:
        # Sweeping "as of" the future would expire credits customers still own.
        raise ValueError(f"as_of {text} is in the future (now is {now.isoformat(timespec='seconds')})")
    return moment


def _quoted(text: object) -> str:
    # Short text is quoted to help whoever typed it; anything else is described, never echoed.
    return repr(text) if isinstance(text, str) and len(text) <= 64 else shape_of(text)
