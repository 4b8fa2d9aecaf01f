"""Reading the JSON log lines the processes write, and checking nothing personal leaked into them."""

from __future__ import annotations

import json

EMAIL = "jane.doe@example.com"
LEAKS = (EMAIL, "jane.doe%40example.com", "jane.doe")


def json_lines(text: str) -> list[dict]:
    """Every line parsed as JSON; a line that is not JSON fails the test."""
    records = []
    for line in text.splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON log line: {line!r}") from None
    return records


def assert_no_leaks(text: str, *secrets: str) -> None:
    for secret in (*LEAKS, *secrets):
        assert secret not in text, f"{secret!r} leaked into the log"
