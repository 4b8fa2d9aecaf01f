"""Which event times are accepted, and which failures are retried for how long."""

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from domain import EventWindow
from infra.db.errors import PERMANENT_ERRORS, is_connectivity_error
from infra.settings import load_settings

NOW = datetime(2026, 11, 21, 12, tzinfo=UTC)


def test_the_window_accepts_now_small_skew_and_the_recent_past():
    window = EventWindow(max_future=timedelta(minutes=5), max_age=timedelta(days=400))
    for moment in (NOW, NOW + timedelta(minutes=5), NOW - timedelta(days=400)):
        assert window.problem(moment, NOW) is None


def test_the_window_refuses_a_future_typo_and_an_ancient_date():
    window = EventWindow(max_future=timedelta(minutes=5), max_age=timedelta(days=400))
    assert "in the future" in window.problem(NOW + timedelta(minutes=5, seconds=1), NOW)
    assert "in the future" in window.problem(NOW.replace(year=2036), NOW)
    assert "400 days old" in window.problem(NOW - timedelta(days=400, seconds=1), NOW)
    assert "400 days old" in window.problem(datetime(1970, 1, 1, tzinfo=UTC), NOW)


def test_settings_build_the_window():
    window = load_settings(event_max_future_seconds=60, event_max_age_days=30).event_window
    assert window == EventWindow(timedelta(seconds=60), timedelta(days=30))


def _wrapped(cause: BaseException, kind=OperationalError):
    try:
        try:
            raise cause
        except BaseException as error:
            raise kind("SELECT 1", {}, error) from error
    except kind as wrapped:
        return wrapped


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        _wrapped(ConnectionResetError()),
    ],
)
def test_connectivity_errors_are_recognised(error):
    assert is_connectivity_error(error)


@pytest.mark.parametrize("error", [ValueError("bug"), KeyError("x"), _wrapped(ValueError("bad value"), DataError)])
def test_other_errors_are_not_connectivity_errors(error):
    assert not is_connectivity_error(error)


def test_data_and_integrity_errors_are_permanent():
    assert issubclass(DataError, PERMANENT_ERRORS) and issubclass(IntegrityError, PERMANENT_ERRORS)


def test_an_outage_is_retried_far_longer_than_a_bug():
    from workers import actors
    from workers.runtime import Runtime, configure_runtime, get_runtime

    previous = get_runtime()
    configure_runtime(Runtime(load_settings(event_max_retries=3, event_max_outage_retries=500)))
    try:
        outage = ConnectionRefusedError(111, "Connect call failed")
        assert actors.should_retry(2, ValueError("bug")) and not actors.should_retry(3, ValueError("bug"))
        assert actors.should_retry(499, outage) and not actors.should_retry(500, outage)
    finally:
        configure_runtime(previous)
