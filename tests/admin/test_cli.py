"""`credits`, the operator's command line: it explains itself, refuses a bad --as-of before
enqueueing anything, and shows a dead letter whole with personal data masked."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dramatiq
import pytest

import workers.cli
from messages import CustomerSignedUp
from messages.wire import APPLY_EVENT_ACTOR, EVENT_KWARG, EVENTS_QUEUE
from tests.support import ROOT
from tests.support.delivery import archive

CREDITS = str(Path(sys.executable).with_name("credits"))
SWEEPS = "dramatiq:credit_sweeps"


def credits(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([CREDITS, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


class Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def every_parser(parser: argparse.ArgumentParser, path: str = "credits"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from every_parser(sub, f"{path} {name}")


def test_every_option_says_what_it_does_and_its_default(monkeypatch):
    def capture(self, *args, **kwargs):
        raise Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        workers.cli.main(["demo"])
    checked = 0
    for path, parser in every_parser(parsed.value.parser):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help and len(action.help) > 10, f"{path} {name} has no help"
            if action.option_strings:
                assert "default" in action.help, f"{path} {name} does not say its default: {action.help!r}"
                parser.format_help()  # every %(default)s expands
            checked += 1
    assert checked >= 14


def test_dead_letters_help_lists_show():
    result = credits(["dead-letters", "--help"], {})
    assert result.returncode == 0 and re.search(r"^\s+show\s+print one dead letter", result.stdout, re.M), result.stdout


@pytest.mark.parametrize(
    ("as_of", "says"),
    [
        ((datetime.now(UTC) + timedelta(days=365)).isoformat(), "is in the future"),
        ("2030-01-01T00:00:00Z", "is in the future"),
        ("2025-06-01T00:00:00", "must carry a timezone"),
        ("yesterday", "must be an ISO 8601 timestamp"),
    ],
)
def test_a_bad_as_of_is_refused_before_anything_is_enqueued(service_env, redis_client, as_of, says):
    result = credits(["run", "expire_credits", "--as-of", as_of], service_env)
    assert result.returncode == 2, result.stderr
    assert "argument --as-of: as_of" in result.stderr and says in result.stderr, result.stderr
    assert "enqueued" not in result.stderr
    assert redis_client.llen(SWEEPS) == 0 and redis_client.hlen(f"{SWEEPS}.msgs") == 0


def test_a_past_as_of_is_enqueued(service_env, redis_client):
    result = credits(["run", "expire_credits", "--as-of", "2025-06-01T00:00:00Z"], service_env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"enqueued expire_credits as message [0-9a-f-]{36}", result.stderr)
    [message] = [dramatiq.Message.decode(data) for data in redis_client.hgetall(f"{SWEEPS}.msgs").values()]
    assert message.kwargs == {"as_of": "2025-06-01T00:00:00+00:00"}


LONG_ERROR = (
    "invalid event: the customer jane.doe@example.com was refused because the payment fingerprint "
    "matched three other referred customers, and the referral window closed before the first paid "
    "invoice arrived; the last line of this error is THE-END"
)


async def dead_letter_with_personal_data(db) -> int:
    event = CustomerSignedUp(
        event_id="signup-1",
        customer_id="cust-dl",
        occurred_at=datetime(2026, 1, 5, tzinfo=UTC),
        email="jane.doe@example.com",
        phone="+1 555 0100",
    )
    message = dramatiq.Message(
        queue_name=EVENTS_QUEUE,
        actor_name=APPLY_EVENT_ACTOR,
        args=(),
        kwargs={EVENT_KWARG: event.model_dump_json()},
        options={},
    )
    return await archive(db, message, LONG_ERROR)


async def test_show_prints_the_whole_error_and_the_message_masked(db, service_env):
    dead_letter_id = await dead_letter_with_personal_data(db)
    result = credits(["dead-letters", "show", str(dead_letter_id)], service_env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"dead letter {dead_letter_id}" in out and APPLY_EVENT_ACTOR in out
    assert "the last line of this error is THE-END" in out  # whole, not cut
    assert '"event_id": "signup-1"' in out and '"customer_id": "cust-dl"' in out  # the event, decoded
    assert "jane.doe" not in out and "example.com" not in out
    assert '"email": "[redacted]"' in out


async def test_show_an_unknown_id(db, service_env):
    result = credits(["dead-letters", "show", "424242"], service_env)
    assert result.returncode == 1 and "no dead letter 424242" in result.stderr


async def test_list_cuts_errors_at_a_word_and_says_how_to_see_them_whole(db, service_env):
    dead_letter_id = await dead_letter_with_personal_data(db)
    result = credits(["dead-letters", "list"], service_env)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.lstrip().startswith(str(dead_letter_id))]
    shown = line.split(APPLY_EVENT_ACTOR, 1)[1].strip()
    assert shown.endswith("…") and len(shown) <= 100
    kept = shown[:-1]
    assert LONG_ERROR.replace("jane.doe@example.com", "[email]").startswith(kept)
    assert LONG_ERROR.replace("jane.doe@example.com", "[email]")[len(kept)] == " "  # the cut is at a word boundary
    assert "jane.doe" not in result.stdout
    assert "`credits dead-letters show ID` prints one whole" in result.stderr
