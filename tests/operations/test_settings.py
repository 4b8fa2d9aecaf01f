"""Settings: documented defaults, environment overrides, and a clear refusal to start on bad ones.

Bad configuration is checked twice: through `infra.settings.load_settings` (SettingsError
names the setting) and through the real `credits` console script, which must exit non-zero
with that message before doing anything else.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from domain import CreditPolicy
from infra.settings import EMBEDDED_DATABASE_URL, Settings, SettingsError, load_settings

CREDITS_SCRIPT = str(Path(sys.executable).with_name("credits"))
SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)
POSTGRES_ADMIN_DSN = os.environ.get("TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ADMIN_TOKEN = "admin-token-0123456789abcdef"
FRONTEND_TOKEN = "front-token-0123456789abcdef"


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    """No credits setting in the environment and no `.env` in the working directory."""
    for name in list(os.environ):
        if name.upper() in SETTINGS_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def run_credits(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k.upper() not in SETTINGS_ENV}
    return subprocess.run(
        [CREDITS_SCRIPT, *args], cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- in process


def test_defaults(bare_env):
    settings = load_settings()
    assert settings.credit_expiration_months == 12
    assert settings.allow_unlimited_rollover is True
    assert settings.rollover_cap is None
    assert settings.hold_ttl_days == 30
    assert settings.depleted_report_days == 14
    assert settings.database_url is None and settings.redis_url is None
    assert settings.effective_database_url == EMBEDDED_DATABASE_URL
    assert settings.admin_api_token is None and settings.frontend_api_token is None
    assert settings.policy == CreditPolicy(12, True, None, 30)


def test_environment_overrides(bare_env):
    bare_env.setenv("CREDIT_EXPIRATION_MONTHS", "6")
    bare_env.setenv("ALLOW_UNLIMITED_ROLLOVER", "false")
    bare_env.setenv("ROLLOVER_CAP", "3")
    bare_env.setenv("hold_ttl_days", "7")  # names are case-insensitive
    bare_env.setenv("DEPLETED_REPORT_DAYS", "30")
    bare_env.setenv("DATABASE_URL", "postgresql+asyncpg://u@h/db")
    bare_env.setenv("ADMIN_API_TOKEN", ADMIN_TOKEN)
    bare_env.setenv("FRONTEND_API_TOKEN", FRONTEND_TOKEN)

    settings = load_settings()

    assert settings.policy == CreditPolicy(
        credit_expiration_months=6, allow_unlimited_rollover=False, rollover_cap=3, hold_ttl_days=7
    )
    assert settings.policy.carry_limit == 3
    assert settings.depleted_report_days == 30
    assert settings.effective_database_url == "postgresql+asyncpg://u@h/db"
    assert settings.admin_api_token.get_secret_value() == ADMIN_TOKEN
    # Secrets never show in a repr (and so never in a log line that prints the settings).
    assert ADMIN_TOKEN not in repr(settings) and FRONTEND_TOKEN not in repr(settings)


def test_dotenv_file_in_the_working_directory(bare_env, tmp_path):
    (tmp_path / ".env").write_text("HOLD_TTL_DAYS=9\nDEPLETED_REPORT_DAYS=21\n")
    settings = load_settings()
    assert (settings.hold_ttl_days, settings.depleted_report_days) == (9, 21)
    bare_env.setenv("HOLD_TTL_DAYS", "10")  # the environment wins over .env
    assert load_settings().hold_ttl_days == 10


INVALID = [
    ({"HOLD_TTL_DAYS": "0"}, "HOLD_TTL_DAYS"),
    ({"HOLD_TTL_DAYS": "366"}, "HOLD_TTL_DAYS"),
    ({"CREDIT_EXPIRATION_MONTHS": "0"}, "CREDIT_EXPIRATION_MONTHS"),
    ({"CREDIT_EXPIRATION_MONTHS": "twelve"}, "CREDIT_EXPIRATION_MONTHS"),
    ({"ALLOW_UNLIMITED_ROLLOVER": "false"}, "ROLLOVER_CAP is required when ALLOW_UNLIMITED_ROLLOVER is false"),
    ({"ALLOW_UNLIMITED_ROLLOVER": "perhaps"}, "ALLOW_UNLIMITED_ROLLOVER"),
    ({"ALLOW_UNLIMITED_ROLLOVER": "false", "ROLLOVER_CAP": "-1"}, "ROLLOVER_CAP"),
    ({"DEPLETED_REPORT_DAYS": "-1"}, "DEPLETED_REPORT_DAYS"),
    (
        {"EVENT_MIN_BACKOFF_MS": "5000", "EVENT_MAX_BACKOFF_MS": "100"},
        "EVENT_MIN_BACKOFF_MS must not exceed EVENT_MAX_BACKOFF_MS",
    ),
    ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
    ({"BROKER_URL": "http://rabbit:5672"}, "BROKER_URL"),
    (
        {"BROKER_URL": "redis://a:6379/0", "REDIS_URL": "redis://b:6379/0"},
        "BROKER_URL and REDIS_URL name two different Redis servers",
    ),
    (
        {"REDIS_MAINTENANCE_INTERVAL_SECONDS": "20"},
        "REDIS_MAINTENANCE_INTERVAL_SECONDS must be at most a third of REDIS_HEARTBEAT_TIMEOUT_SECONDS",
    ),
    ({"ADMIN_API_TOKEN": "too-short-tok"}, "ADMIN_API_TOKEN must be at least 16 characters"),
    (
        {"ADMIN_API_TOKEN": ADMIN_TOKEN, "FRONTEND_API_TOKEN": ADMIN_TOKEN},
        "ADMIN_API_TOKEN and FRONTEND_API_TOKEN must differ",
    ),
]


@pytest.mark.parametrize(
    "env,named", INVALID, ids=[next(iter(env)) + "=" + next(iter(env.values())) for env, _ in INVALID]
)
def test_invalid_settings_raise_naming_the_setting(bare_env, env, named):
    for name, value in env.items():
        bare_env.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert message.startswith("invalid configuration: ")
    assert named in message
    assert isinstance(raised.value, SystemExit)  # a process stops with this message
    assert "too-short-tok" not in message and ADMIN_TOKEN not in message  # no secret in the message


def test_the_broker_is_broker_url_or_else_redis_url(bare_env):
    from infra.broker import is_embedded, make_broker

    assert load_settings().broker_address is None and is_embedded(load_settings())
    bare_env.setenv("REDIS_URL", "redis://redis:6379/0")
    assert (load_settings().broker_address, load_settings().uses_rabbitmq) == ("redis://redis:6379/0", False)
    bare_env.setenv("BROKER_URL", "amqp://guest:guest@rabbit:5672/%2F")
    settings = load_settings()
    assert (settings.broker_address, settings.uses_rabbitmq) == ("amqp://guest:guest@rabbit:5672/%2F", True)
    broker = make_broker(settings, middleware=[])  # no connection until first used
    assert type(broker).__name__ == "RabbitmqBroker" and broker.confirm_delivery is True


def test_keyword_overrides_are_validated_too(bare_env):
    assert load_settings(hold_ttl_days=3).hold_ttl_days == 3
    with pytest.raises(SettingsError, match="SWEEP_BATCH_SIZE"):
        load_settings(sweep_batch_size=0)


# --------------------------------------------------------------------------- the real commands


@pytest.mark.parametrize(
    "env,named",
    [
        ({"HOLD_TTL_DAYS": "0"}, "invalid configuration: HOLD_TTL_DAYS"),
        ({"ALLOW_UNLIMITED_ROLLOVER": "false"}, "ROLLOVER_CAP is required when ALLOW_UNLIMITED_ROLLOVER is false"),
        ({"ADMIN_API_TOKEN": None}, "ADMIN_API_TOKEN and FRONTEND_API_TOKEN must both be set"),
        ({"FRONTEND_API_TOKEN": None}, "ADMIN_API_TOKEN and FRONTEND_API_TOKEN must both be set"),
        (
            {"ADMIN_API_TOKEN": None, "FRONTEND_API_TOKEN": None},
            "ADMIN_API_TOKEN and FRONTEND_API_TOKEN must both be set",
        ),
        ({"FRONTEND_API_TOKEN": "short"}, "FRONTEND_API_TOKEN must be at least 16 characters"),
    ],
    ids=["hold-ttl-0", "rollover-without-cap", "no-admin-token", "no-frontend-token", "no-tokens", "short-token"],
)
def test_credits_web_refuses_bad_configuration(pg_url, tmp_path, env, named):
    full = {"DATABASE_URL": pg_url, "ADMIN_API_TOKEN": ADMIN_TOKEN, "FRONTEND_API_TOKEN": FRONTEND_TOKEN, **env}
    result = run_credits(
        ["web", "--host", "127.0.0.1", "--port", "0"], {k: v for k, v in full.items() if v is not None}, tmp_path
    )
    assert result.returncode != 0
    assert named in result.stderr
    assert "Uvicorn running" not in result.stderr + result.stdout  # it never served


@pytest.mark.parametrize("command", [["worker"], ["scheduler"], ["run", "expire_credits"], ["migrate"]])
def test_other_commands_refuse_bad_configuration(redis_url, tmp_path, command):
    result = run_credits(
        command,
        {"REDIS_URL": redis_url, "DATABASE_URL": "sqlite+aiosqlite:///never.sqlite3", "HOLD_TTL_DAYS": "0"},
        tmp_path,
    )
    assert result.returncode == 1
    assert "invalid configuration: HOLD_TTL_DAYS: Input should be greater than or equal to 1" in result.stderr
    assert not (tmp_path / "never.sqlite3").exists()


def test_credits_web_refuses_an_unmigrated_database(empty_database, tmp_path):
    env = {"DATABASE_URL": empty_database, "ADMIN_API_TOKEN": ADMIN_TOKEN, "FRONTEND_API_TOKEN": FRONTEND_TOKEN}
    result = run_credits(["web", "--host", "127.0.0.1", "--port", "0"], env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "is not migrated (at an empty schema" in output
    assert "run `credits migrate` first" in output
    assert "Traceback" not in output  # one readable line, before the server starts


def test_credits_web_refuses_an_unreachable_database_without_showing_its_password(tmp_path):
    env = {
        "DATABASE_URL": "postgresql+asyncpg://postgres:hunter2-secret@127.0.0.1:1/credits",
        "ADMIN_API_TOKEN": ADMIN_TOKEN,
        "FRONTEND_API_TOKEN": FRONTEND_TOKEN,
    }
    result = run_credits(["web", "--host", "127.0.0.1", "--port", "0"], env, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cannot reach the database at postgresql+asyncpg://postgres:***@127.0.0.1:1/credits" in output
    assert "hunter2-secret" not in output


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("postgres://u:p@db:5432/credits", "postgresql+asyncpg://u:p@db:5432/credits"),
        ("postgresql://u:p@db/credits", "postgresql+asyncpg://u:p@db/credits"),
        ("postgresql+asyncpg://u@db/credits", "postgresql+asyncpg://u@db/credits"),
        ("sqlite+aiosqlite:///credits.sqlite3", "sqlite+aiosqlite:///credits.sqlite3"),
    ],
)
def test_database_urls_in_their_usual_spellings_use_the_async_driver(given, stored):
    assert load_settings(database_url=given).database_url == stored


@pytest.mark.parametrize("url", ["", "   ", "nonsense", "mysql://db/credits", "sqlite:///credits.sqlite3"])
def test_unusable_database_urls_are_refused_at_start(url):
    with pytest.raises(SettingsError) as refused:
        load_settings(database_url=url)
    assert "DATABASE_URL" in str(refused.value)


@pytest.mark.parametrize("url", ["localhost:6379", "http://redis", ""])
def test_unusable_redis_urls_are_refused_at_start(url):
    with pytest.raises(SettingsError) as refused:
        load_settings(redis_url=url)
    assert "REDIS_URL" in str(refused.value)
