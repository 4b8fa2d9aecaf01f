"""Payment and dunning settings: set through the environment, refused at start when wrong.

Like tests/operations/test_settings.py, every case sets the operator's environment variables and calls
`load_settings`; a bad value raises SettingsError (a SystemExit) naming the setting.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from domain.dunning import RetryNowLimit, RetrySchedule
from infra.settings import Settings, SettingsError, load_settings

SETTINGS_ENV = frozenset(name.upper() for name in Settings.model_fields)


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    """No credits setting in the environment and no `.env` in the working directory."""
    for name in list(os.environ):
        if name.upper() in SETTINGS_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_payment_defaults(bare_env):
    settings = load_settings()
    assert settings.dunning_retry_days == (1, 3, 7, 14)
    assert settings.dunning.schedule == RetrySchedule((1, 3, 7, 14))
    assert settings.dunning.retry_now == RetryNowLimit(3, timedelta(hours=1))
    assert settings.dunning_end_action == "keep"
    assert settings.stripe_api_key is None and settings.stripe_api_base is None
    assert settings.stripe_webhook_secrets == ()
    assert settings.stripe_plan_credits == {}


INVALID = [
    ("DUNNING_RETRY_DAYS", "1,3,20", "7 to 14 days"),
    ("DUNNING_RETRY_DAYS", "1,2", "3 to 5 attempts"),
    ("DUNNING_RETRY_DAYS", "1,2,3,4,5,6", "3 to 5 attempts"),
    ("DUNNING_RETRY_DAYS", "3,1,7", "strictly increasing"),
    ("DUNNING_RETRY_DAYS", "0,3,7", "strictly increasing"),
    ("DUNNING_RETRY_DAYS", "a,b", "whole days separated by commas"),
    ("DUNNING_RETRY_DAYS", "", "whole days separated by commas"),
    ("STRIPE_WEBHOOK_SECRETS", "not_a_whsec", "whsec_"),
    ("STRIPE_WEBHOOK_SECRETS", "whsec_good,sk_live_pasted_by_mistake", "whsec_"),  # one bad one is enough
    ("STRIPE_PLAN_CREDITS", '{"price": 0}', "positive whole credits"),
    ("STRIPE_PLAN_CREDITS", '{"price": -5}', "positive whole credits"),
    ("STRIPE_PLAN_CREDITS", '{"price": 2.5}', "positive whole credits"),
    ("STRIPE_PLAN_CREDITS", '{"price": true}', "positive whole credits"),
    ("STRIPE_PLAN_CREDITS", '{"price": "10"}', "positive whole credits"),
    ("STRIPE_PLAN_CREDITS", "[1]", "positive whole credits"),
    ("STRIPE_PLAN_CREDITS", "not json", "must be a JSON object"),
    ("STRIPE_API_BASE", "ftp://x", "http(s)://"),
    ("STRIPE_BILLING_PORTAL_URL", "billing.stripe.com/p/login", "http(s)://"),
    ("DUNNING_END_ACTION", "delete_customer", ""),
    ("PAYMENT_RETRY_NOW_LIMIT", "0", ""),
    ("PAYMENT_RETRY_NOW_WINDOW_MINUTES", "0", ""),
]


@pytest.mark.parametrize(("name", "value", "reason"), INVALID, ids=[f"{name}={value!r}" for name, value, _ in INVALID])
def test_invalid_payment_settings_are_refused_naming_the_setting(bare_env, name, value, reason):
    bare_env.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    message = str(refused.value)
    assert isinstance(refused.value, SystemExit)
    assert message.startswith(f"invalid configuration: {name}: ")
    assert reason in message


def test_a_refused_webhook_secret_is_not_echoed(bare_env):
    bare_env.setenv("STRIPE_WEBHOOK_SECRETS", "sk_live_pasted_by_mistake")
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert "sk_live_pasted_by_mistake" not in str(refused.value)


@pytest.mark.parametrize(
    ("value", "days"),
    [("1,2,4,8,13", (1, 2, 4, 8, 13)), ("2,4,7", (2, 4, 7)), (" 1, 3 ,7 ,14 ", (1, 3, 7, 14))],
)
def test_retry_days_from_the_environment_make_the_schedule(bare_env, value, days):
    bare_env.setenv("DUNNING_RETRY_DAYS", value)
    settings = load_settings()
    assert settings.dunning_retry_days == days
    assert settings.dunning.schedule.days == days
    assert settings.dunning.schedule.attempts == len(days)


def test_retry_now_limit_from_the_environment(bare_env):
    bare_env.setenv("PAYMENT_RETRY_NOW_LIMIT", "5")
    bare_env.setenv("PAYMENT_RETRY_NOW_WINDOW_MINUTES", "30")
    assert load_settings().dunning.retry_now == RetryNowLimit(max_attempts=5, window=timedelta(minutes=30))


def test_webhook_secrets_are_a_comma_separated_list_with_spaces_trimmed(bare_env):
    bare_env.setenv("STRIPE_WEBHOOK_SECRETS", "whsec_a, whsec_b ")
    settings = load_settings()
    assert [secret.get_secret_value() for secret in settings.stripe_webhook_secrets] == ["whsec_a", "whsec_b"]
    assert "whsec_a" not in repr(settings) and "whsec_b" not in repr(settings)


def test_plan_credits_map_price_ids_to_credits(bare_env):
    bare_env.setenv("STRIPE_PLAN_CREDITS", '{"price_a": 10}')
    assert load_settings().stripe_plan_credits == {"price_a": 10}
    bare_env.setenv("STRIPE_PLAN_CREDITS", '{"price_a": 10, "price_b": 250}')
    assert load_settings().stripe_plan_credits == {"price_a": 10, "price_b": 250}


def test_stripe_urls_and_end_action_from_the_environment(bare_env):
    bare_env.setenv("STRIPE_API_BASE", "http://127.0.0.1:12111")
    bare_env.setenv("STRIPE_BILLING_PORTAL_URL", "https://billing.stripe.com/p/login/abc")
    bare_env.setenv("DUNNING_END_ACTION", "cancel_subscription")
    settings = load_settings()
    assert settings.stripe_api_base == "http://127.0.0.1:12111"
    assert settings.stripe_billing_portal_url == "https://billing.stripe.com/p/login/abc"
    assert settings.dunning_end_action == "cancel_subscription"


def test_payment_settings_in_a_dotenv_file(bare_env, tmp_path):
    (tmp_path / ".env").write_text("DUNNING_RETRY_DAYS=2,5,9\nSTRIPE_WEBHOOK_SECRETS=whsec_x\n")
    settings = load_settings()
    assert settings.dunning.schedule.days == (2, 5, 9)
    assert [s.get_secret_value() for s in settings.stripe_webhook_secrets] == ["whsec_x"]
