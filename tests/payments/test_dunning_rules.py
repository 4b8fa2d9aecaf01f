"""Dunning rules: the retry schedule, the "retry now" limit, hard declines and one case's life.

Pure domain: every rule takes its moment explicitly, so no clock is read or faked.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.dunning import (
    MIN_RETRY_GAP,
    AttemptKind,
    AttemptOutcome,
    DunningCase,
    DunningRules,
    DunningStatus,
    RetryNowLimit,
    RetrySchedule,
    is_hard_decline,
)

UTC = UTC
FIRST_FAILURE = datetime(2025, 3, 10, 9, 30, tzinfo=UTC)
DEFAULT = RetrySchedule()
SCHEDULED, CUSTOMER, PAYMENT_METHOD = AttemptKind.SCHEDULED, AttemptKind.CUSTOMER, AttemptKind.PAYMENT_METHOD
DECLINED, ACTION = AttemptOutcome.DECLINED, AttemptOutcome.ACTION_REQUIRED


def day(n: float, minutes: int = 0) -> datetime:
    """``n`` days (and ``minutes``) after the first failure."""
    return FIRST_FAILURE + timedelta(days=n, minutes=minutes)


def new_case(schedule: RetrySchedule = DEFAULT) -> DunningCase:
    return DunningCase.open("cust-1", "in_1", FIRST_FAILURE, schedule)


def soft(
    case: DunningCase,
    kind: AttemptKind,
    at: datetime,
    code: str | None = "insufficient_funds",
    schedule: RetrySchedule = DEFAULT,
) -> None:
    case.attempt_failed(kind, DECLINED, at, code, "declined", schedule)


# --------------------------------------------------------------------------- RetrySchedule


def test_default_schedule_is_days_1_3_7_14():
    assert DEFAULT.days == (1, 3, 7, 14)
    assert DEFAULT.attempts == 4
    assert DunningRules().schedule == DEFAULT


@pytest.mark.parametrize("days", [(1, 3, 7), (2, 4, 7), (1, 2, 3, 14), (1, 2, 4, 8, 13), (1, 2, 3, 4, 7), (5, 10, 14)])
def test_valid_schedules_are_accepted(days):
    assert RetrySchedule(days).attempts == len(days)


@pytest.mark.parametrize(
    ("days", "complaint"),
    [
        ((1, 7), "3 to 5 attempts"),  # too few
        ((), "3 to 5 attempts"),
        ((1, 2, 3, 4, 5, 7), "3 to 5 attempts"),  # too many
        ((0, 3, 7), "strictly increasing from 1"),  # day 0 is the failure itself
        ((-1, 3, 7), "strictly increasing from 1"),
        ((1, 3, 3, 7), "strictly increasing from 1"),  # repeated day
        ((3, 1, 7), "strictly increasing from 1"),  # out of order
        ((1, 3, 6), "7 to 14 days"),  # gives up too soon
        ((1, 3, 15), "7 to 14 days"),  # drags on too long
        ((1, 3, 7, 20), "7 to 14 days"),
    ],
)
def test_invalid_schedules_are_refused_with_the_reason(days, complaint):
    with pytest.raises(ValueError, match=complaint):
        RetrySchedule(days)


def test_retry_at_counts_every_retry_from_the_first_failure():
    assert [DEFAULT.retry_at(FIRST_FAILURE, made) for made in range(4)] == [day(1), day(3), day(7), day(14)]


@pytest.mark.parametrize("made", [4, 5, 100])
def test_retry_at_is_none_once_the_schedule_is_used_up(made):
    assert DEFAULT.retry_at(FIRST_FAILURE, made) is None


# --------------------------------------------------------------------------- RetryNowLimit

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
LIMIT = RetryNowLimit(max_attempts=3, window=timedelta(hours=1))


def ago(minutes: float) -> datetime:
    return NOW - timedelta(minutes=minutes)


def test_retry_now_default_is_three_per_hour():
    assert RetryNowLimit() == LIMIT
    assert DunningRules().retry_now == LIMIT


@pytest.mark.parametrize("recent_minutes_ago", [[], [5], [50, 5]])
def test_retry_now_allowed_below_the_limit(recent_minutes_ago):
    assert LIMIT.retry_after([ago(m) for m in recent_minutes_ago], NOW) is None


def test_retry_now_refused_exactly_at_the_limit_until_the_oldest_leaves_the_window():
    recent = [ago(40), ago(10), ago(20)]  # order does not matter
    assert LIMIT.retry_after(recent, NOW) == timedelta(minutes=20)
    # Just before the oldest leaves the window: still refused, for one more second.
    assert LIMIT.retry_after(recent, NOW + timedelta(minutes=20) - timedelta(seconds=1)) == timedelta(seconds=1)
    # The moment it does, one more charge is allowed.
    assert LIMIT.retry_after(recent, NOW + timedelta(minutes=20)) is None


def test_an_attempt_exactly_one_window_ago_no_longer_counts():
    assert LIMIT.retry_after([ago(60), ago(30), ago(1)], NOW) is None
    assert LIMIT.retry_after([ago(59), ago(30), ago(1)], NOW) == timedelta(minutes=1)


def test_attempts_outside_the_window_never_count():
    assert LIMIT.retry_after([ago(61), ago(120), ago(600), ago(5), ago(6)], NOW) is None


def test_above_the_limit_the_wait_is_until_enough_attempts_have_left_the_window():
    """With 4 in the window and room for 3, the two oldest must leave: wait on the second oldest."""
    recent = [ago(50), ago(40), ago(30), ago(5)]
    assert LIMIT.retry_after(recent, NOW) == timedelta(minutes=20)


def test_a_limit_of_one_per_window():
    limit = RetryNowLimit(max_attempts=1, window=timedelta(minutes=10))
    assert limit.retry_after([ago(3)], NOW) == timedelta(minutes=7)
    assert limit.retry_after([ago(10)], NOW) is None


# --------------------------------------------------------------------------- hard declines


@pytest.mark.parametrize(
    "code",
    ["lost_card", "stolen_card", "incorrect_number", "revocation_of_authorization", "expired_card", "fraudulent"],
)
def test_hard_declines(code):
    assert is_hard_decline(code) is True


@pytest.mark.parametrize(
    "code",
    ["insufficient_funds", "generic_decline", "do_not_honor", "authentication_required", "try_again_later", None, ""],
)
def test_soft_declines(code):
    assert is_hard_decline(code) is False


# --------------------------------------------------------------------------- one case


def test_a_case_opens_retrying_with_its_first_retry_one_day_after_the_failure():
    case = new_case()
    assert case.status is DunningStatus.RETRYING
    assert case.attempts_made == 0
    assert case.first_failed_at == FIRST_FAILURE
    assert case.next_retry_at == day(1)
    assert case.owes and case.closed_at is None
    assert case.attempts_left(DEFAULT) == 4


def test_a_case_is_due_from_its_next_retry_on():
    case = new_case()
    assert not case.is_due(day(1) - timedelta(seconds=1))
    assert case.is_due(day(1))
    assert case.is_due(day(2))


def test_a_case_opens_on_the_schedule_it_is_given():
    assert new_case(RetrySchedule((2, 4, 7))).next_retry_at == day(2)


def test_scheduled_soft_declines_follow_the_schedule_from_the_first_failure_not_from_the_attempt():
    case = new_case()
    # Each retry runs late (the collector was down for hours): the schedule does not drift.
    for made, (attempted_at, next_at) in enumerate(
        [(day(1, 300), day(3)), (day(3, 45), day(7)), (day(7, 600), day(14))], start=1
    ):
        soft(case, SCHEDULED, attempted_at)
        assert case.attempts_made == made
        assert case.status is DunningStatus.RETRYING
        assert case.next_retry_at == next_at
        assert case.attempts_left(DEFAULT) == 4 - made
        assert case.last_failure_at == attempted_at
        assert case.last_decline_code == "insufficient_funds"


def test_the_last_scheduled_soft_decline_leaves_the_case_past_due():
    case = new_case()
    for n in (1, 3, 7, 14):
        soft(case, SCHEDULED, day(n))
    assert case.attempts_made == 4
    assert case.status is DunningStatus.PAST_DUE
    assert case.next_retry_at is None
    assert not case.is_due(day(30))
    assert case.attempts_left(DEFAULT) == 0
    assert case.owes  # past due is still owed: payment can still end it


def test_a_three_attempt_schedule_is_exhausted_after_three_declines():
    schedule = RetrySchedule((2, 4, 7))
    case = new_case(schedule)
    soft(case, SCHEDULED, day(2), schedule=schedule)
    soft(case, SCHEDULED, day(4), schedule=schedule)
    assert (case.status, case.next_retry_at) == (DunningStatus.RETRYING, day(7))
    soft(case, SCHEDULED, day(7), schedule=schedule)
    assert (case.status, case.next_retry_at, case.attempts_made) == (DunningStatus.PAST_DUE, None, 3)


@pytest.mark.parametrize("kind", [CUSTOMER, PAYMENT_METHOD])
def test_immediate_attempts_never_use_up_a_scheduled_attempt(kind):
    case = new_case()
    soft(case, SCHEDULED, day(1))
    for minutes in (10, 20, 30, 40, 50):
        soft(case, kind, day(1, minutes), code="generic_decline")
        assert case.attempts_made == 1
        assert case.status is DunningStatus.RETRYING
        assert case.next_retry_at == day(3)  # the schedule is where it was
        assert case.attempts_left(DEFAULT) == 3
    assert case.last_decline_code == "generic_decline"


@pytest.mark.parametrize("kind", [CUSTOMER, PAYMENT_METHOD])
def test_a_soft_declined_immediate_attempt_after_the_schedule_ran_out_stays_past_due(kind):
    case = new_case()
    for n in (1, 3, 7, 14):
        soft(case, SCHEDULED, day(n))
    soft(case, kind, day(15), code="do_not_honor")
    assert (case.status, case.next_retry_at, case.attempts_made) == (DunningStatus.PAST_DUE, None, 4)
    assert case.last_decline_code == "do_not_honor"


@pytest.mark.parametrize("kind", [SCHEDULED, CUSTOMER, PAYMENT_METHOD])
@pytest.mark.parametrize("code", ["lost_card", "stolen_card", "incorrect_number", "revocation_of_authorization"])
def test_a_hard_decline_stops_automatic_retries_until_a_new_payment_method(kind, code):
    case = new_case()
    case.attempt_failed(kind, DECLINED, day(1), code, "your card was declined", DEFAULT)
    assert case.status is DunningStatus.NEEDS_PAYMENT_METHOD
    assert case.next_retry_at is None
    assert not case.is_due(day(30))
    assert case.attempts_left(DEFAULT) == 0
    assert case.last_decline_code == code
    assert case.owes


def test_a_provider_reported_hard_decline_also_needs_a_payment_method():
    case = new_case()
    case.payment_failed(day(0, 5), "stolen_card", "stolen", DEFAULT)
    assert (case.status, case.next_retry_at) == (DunningStatus.NEEDS_PAYMENT_METHOD, None)


def test_a_provider_reported_soft_decline_leaves_the_schedule_alone():
    case = new_case()
    case.payment_failed(day(0, 5), "insufficient_funds", "no money", DEFAULT)
    assert (case.status, case.next_retry_at, case.attempts_made) == (DunningStatus.RETRYING, day(1), 0)
    assert case.last_decline_code == "insufficient_funds"


def test_a_soft_decline_of_a_new_payment_method_resumes_the_schedule_where_it_was():
    case = new_case()
    soft(case, SCHEDULED, day(1))  # 1 of 4 used
    case.attempt_failed(SCHEDULED, DECLINED, day(3), "expired_card", "expired", DEFAULT)  # 2 of 4 used
    assert case.status is DunningStatus.NEEDS_PAYMENT_METHOD
    soft(case, PAYMENT_METHOD, day(5), code="insufficient_funds")
    assert case.status is DunningStatus.RETRYING
    assert case.attempts_made == 2
    assert case.next_retry_at == day(7)
    assert case.attempts_left(DEFAULT) == 2


def test_a_soft_decline_of_a_new_payment_method_after_the_last_slot_gives_up():
    case = new_case()
    for n in (1, 3, 7):
        soft(case, SCHEDULED, day(n))
    case.attempt_failed(SCHEDULED, DECLINED, day(14), "lost_card", None, DEFAULT)
    soft(case, PAYMENT_METHOD, day(15))
    assert (case.status, case.next_retry_at) == (DunningStatus.PAST_DUE, None)


def test_a_hard_decline_of_the_new_payment_method_still_needs_one():
    case = new_case()
    case.attempt_failed(SCHEDULED, DECLINED, day(1), "lost_card", None, DEFAULT)
    case.attempt_failed(PAYMENT_METHOD, DECLINED, day(2), "incorrect_number", None, DEFAULT)
    assert (case.status, case.next_retry_at, case.last_decline_code) == (
        DunningStatus.NEEDS_PAYMENT_METHOD,
        None,
        "incorrect_number",
    )


@pytest.mark.parametrize("kind", [SCHEDULED, CUSTOMER, PAYMENT_METHOD])
def test_an_attempt_that_needs_authentication_waits_for_the_customer(kind):
    case = new_case()
    case.attempt_failed(kind, ACTION, day(1), None, None, DEFAULT)
    assert case.status is DunningStatus.ACTION_REQUIRED
    assert case.next_retry_at is None
    assert not case.is_due(day(30))
    assert case.last_decline_code == "authentication_required"
    assert case.last_failure_message  # a message the customer can act on
    assert case.attempts_made == (1 if kind is SCHEDULED else 0)


def test_the_provider_asking_for_authentication_stops_retries():
    case = new_case()
    case.action_required(day(0, 1), "confirm with your bank")
    assert (case.status, case.next_retry_at, case.last_failure_message) == (
        DunningStatus.ACTION_REQUIRED,
        None,
        "confirm with your bank",
    )


def test_a_soft_decline_after_authentication_was_asked_for_resumes_the_schedule():
    case = new_case()
    case.attempt_failed(SCHEDULED, ACTION, day(1), None, None, DEFAULT)
    soft(case, CUSTOMER, day(2))
    assert (case.status, case.attempts_made, case.next_retry_at) == (DunningStatus.RETRYING, 1, day(3))


@pytest.mark.parametrize("status_before", ["retrying", "past_due", "needs_payment_method", "action_required"])
def test_payment_closes_an_open_case_once(status_before):
    case = new_case()
    if status_before == "past_due":
        for n in (1, 3, 7, 14):
            soft(case, SCHEDULED, day(n))
    elif status_before == "needs_payment_method":
        case.payment_failed(day(0, 1), "lost_card", None, DEFAULT)
    elif status_before == "action_required":
        case.action_required(day(0, 1))
    assert case.status.value == status_before

    assert case.paid(day(20)) is True
    assert case.status is DunningStatus.RECOVERED
    assert (case.closed_at, case.next_retry_at) == (day(20), None)
    assert not case.owes
    assert case.attempts_left(DEFAULT) == 0

    assert case.paid(day(21)) is False  # a replayed payment report changes nothing
    assert case.closed_at == day(20)


def test_a_late_failure_report_never_reopens_a_paid_case():
    case = new_case()
    case.paid(day(2))
    case.payment_failed(day(3), "lost_card", "late report", DEFAULT)
    case.action_required(day(3), "late report")
    case.attempt_failed(SCHEDULED, DECLINED, day(3), "insufficient_funds", None, DEFAULT)
    case.attempt_failed(CUSTOMER, ACTION, day(3), None, None, DEFAULT)
    assert case.status is DunningStatus.RECOVERED
    assert case.next_retry_at is None
    assert case.attempts_made == 0
    assert case.last_failure_at is None and case.last_decline_code is None
    assert not case.is_due(day(30))


def test_a_closed_invoice_ends_the_case_and_payment_does_not_reopen_it():
    case = new_case()
    case.close(day(2), "voided")
    assert (case.status, case.closed_at, case.last_failure_message, case.owes) == (
        DunningStatus.CLOSED,
        day(2),
        "voided",
        False,
    )
    assert case.paid(day(3)) is False
    case.payment_failed(day(4), "insufficient_funds", None, DEFAULT)
    assert case.status is DunningStatus.CLOSED


def test_an_older_failure_report_never_overwrites_a_newer_ones_decline_code():
    case = new_case()
    case.payment_failed(day(2), "insufficient_funds", "newer", DEFAULT)
    case.payment_failed(day(1), "lost_card", "older", DEFAULT)  # arrives late
    assert (case.last_failure_at, case.last_decline_code, case.last_failure_message) == (
        day(2),
        "insufficient_funds",
        "newer",
    )
    assert case.status is DunningStatus.RETRYING  # nor does its hard decline stop the retries
    case.action_required(day(1, 30), "older")
    assert case.status is DunningStatus.RETRYING
    assert case.last_decline_code == "insufficient_funds"


def test_an_older_attempt_outcome_never_overwrites_a_newer_reports_decline_code():
    case = new_case()
    case.payment_failed(day(1, 10), "do_not_honor", "newer", DEFAULT)
    soft(case, SCHEDULED, day(1), code="insufficient_funds")
    assert (case.last_failure_at, case.last_decline_code) == (day(1, 10), "do_not_honor")
    assert (case.attempts_made, case.next_retry_at) == (1, day(3))  # the attempt still counts


def test_a_report_at_the_same_moment_counts_as_the_latest():
    case = new_case()
    case.payment_failed(day(1), "insufficient_funds", None, DEFAULT)
    case.payment_failed(day(1), "generic_decline", None, DEFAULT)
    assert case.last_decline_code == "generic_decline"


def test_attempts_left_is_zero_whenever_the_case_is_not_retrying():
    case = new_case()
    assert case.attempts_left(DEFAULT) == 4
    case.action_required(day(0, 1))
    assert case.attempts_left(DEFAULT) == 0


def test_a_scheduled_attempt_needing_authentication_never_leaves_the_case_due_at_the_slot_it_used():
    """Bug: with a later-dated failure report already noted (the provider's clock runs ahead of
    ours), the attempt's ACTION_REQUIRED outcome is dropped by `action_required`'s "latest report"
    guard, after `attempts_made` was already counted. The case stays RETRYING with
    `next_retry_at` still at the slot just used, so it is due at once and the collector charges
    again right away without the customer authenticating. A soft decline in the same order
    advances the schedule correctly (see the test above)."""
    case = new_case()
    case.payment_failed(day(1, 1), "authentication_required", "provider's report of our charge", DEFAULT)
    case.attempt_failed(SCHEDULED, ACTION, day(1), None, None, DEFAULT)
    assert case.attempts_made == 1
    assert not case.is_due(day(1, 5))
    assert case.status is DunningStatus.ACTION_REQUIRED


def test_an_older_soft_decline_never_resumes_retries_over_a_newer_hard_decline():
    """Bug: `attempt_failed`'s soft-decline branch changes the status whatever the order. A hard
    decline reported at 10:05 (the card is stolen) is overridden by our own soft decline dated
    10:00, recorded after it: the case goes back to RETRYING and keeps charging a stolen card,
    while its own last_decline_code still says stolen_card."""
    case = new_case()
    case.payment_failed(day(2, 5), "stolen_card", "newer", DEFAULT)
    soft(case, CUSTOMER, day(2), code="insufficient_funds")
    assert case.last_decline_code == "stolen_card"
    assert case.status is DunningStatus.NEEDS_PAYMENT_METHOD
    assert case.next_retry_at is None


# --------------------------------------------------------------------------- properties

schedules = (
    st.integers(min_value=7, max_value=14)
    .flatmap(
        lambda last: st.tuples(
            st.just(last), st.sets(st.integers(min_value=1, max_value=last - 1), min_size=2, max_size=4)
        )
    )
    .map(lambda pair: RetrySchedule(tuple(sorted(pair[1])) + (pair[0],)))
)
steps = st.lists(
    st.tuples(
        st.sampled_from([SCHEDULED, SCHEDULED, CUSTOMER, PAYMENT_METHOD]),
        st.sampled_from(["insufficient_funds", "generic_decline", "do_not_honor", "try_again_later", None]),
        st.integers(min_value=0, max_value=24 * 60),  # how late the attempt runs, in minutes
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(schedule=schedules, steps=steps)
def test_soft_declines_walk_the_schedule_and_end_past_due(schedule, steps):
    """Scheduled attempts run when the case is due (late by any amount), customers retry at any
    time; every decline is soft. The schedule is never exceeded, the next retry is the
    schedule's next day after the first failure — or a day after the last scheduled attempt,
    whichever is later (a customer's own retry moves nothing) — and the case is RETRYING until the last scheduled attempt, PAST_DUE after it."""
    case = new_case(schedule)
    clock = FIRST_FAILURE
    floor = FIRST_FAILURE  # a day after the last scheduled attempt: automatic charges keep apart
    for kind, code, late in steps:
        if kind is SCHEDULED:
            if not case.is_due(case.next_retry_at or clock):
                assert case.status is DunningStatus.PAST_DUE
                continue  # nothing scheduled is due: the collector requests nothing
            clock = max(clock, case.next_retry_at + timedelta(minutes=late))
        else:
            clock += timedelta(minutes=late)
        made_before = case.attempts_made
        soft(case, kind, clock, code=code, schedule=schedule)
        if kind is SCHEDULED:
            floor = clock + MIN_RETRY_GAP

        assert case.attempts_made == made_before + (kind is SCHEDULED)  # only scheduled attempts count
        assert 0 <= case.attempts_made <= schedule.attempts
        assert case.attempts_left(schedule) == (
            schedule.attempts - case.attempts_made if case.status is DunningStatus.RETRYING else 0
        )
        if case.attempts_made < schedule.attempts:
            assert case.status is DunningStatus.RETRYING
            assert case.next_retry_at == max(FIRST_FAILURE + timedelta(days=schedule.days[case.attempts_made]), floor)
        else:
            assert case.status is DunningStatus.PAST_DUE
            assert case.next_retry_at is None
        assert case.owes
        assert case.last_failure_at == clock and case.last_decline_code == code


@settings(max_examples=200, deadline=None)
@given(
    schedule=schedules, declines=st.integers(min_value=0, max_value=5), pay_late=st.integers(min_value=0, max_value=30)
)
def test_payment_at_any_point_ends_the_case_for_good(schedule, declines, pay_late):
    case = new_case(schedule)
    for _ in range(min(declines, schedule.attempts)):
        soft(case, SCHEDULED, case.next_retry_at, schedule=schedule)
    paid_at = day(pay_late)
    assert case.paid(paid_at) is True
    case.payment_failed(paid_at + timedelta(hours=1), "insufficient_funds", None, schedule)
    soft(case, CUSTOMER, paid_at + timedelta(hours=2), schedule=schedule)
    assert case.paid(paid_at + timedelta(hours=3)) is False
    assert (case.status, case.next_retry_at, case.closed_at) == (DunningStatus.RECOVERED, None, paid_at)


# --------------------------------------------------------------------------- past due, spacing


def exhausted_case() -> DunningCase:
    case = new_case()
    for n in (1, 3, 7, 14):
        soft(case, SCHEDULED, day(n))
    assert case.status is DunningStatus.PAST_DUE
    return case


@pytest.mark.parametrize("report", ["hard webhook", "action webhook", "hard retry-now", "action retry-now"])
def test_past_due_stays_past_due_whatever_declines_after_it(report):
    """The report and the end action must still see it: only payment or closing the invoice ends it."""
    case = exhausted_case()
    if report == "hard webhook":
        case.payment_failed(day(15), "lost_card", "lost", DEFAULT)
    elif report == "action webhook":
        case.action_required(day(15))
    elif report == "hard retry-now":
        case.attempt_failed(CUSTOMER, DECLINED, day(15), "stolen_card", "stolen", DEFAULT)
    else:
        case.attempt_failed(CUSTOMER, ACTION, day(15), "authentication_required", None, DEFAULT)
    assert case.status is DunningStatus.PAST_DUE
    assert case.next_retry_at is None
    assert case.paid(day(16)) is True
    assert case.status is DunningStatus.RECOVERED


@pytest.mark.parametrize("stop", ["hard decline", "authentication"])
def test_a_stopped_case_becomes_past_due_when_the_schedule_ends(stop):
    case = new_case()
    if stop == "hard decline":
        soft(case, SCHEDULED, day(1), code="lost_card")
    else:
        case.attempt_failed(SCHEDULED, ACTION, day(1), None, None, DEFAULT)
    assert case.schedule_ended(day(13, minutes=59 * 24), DEFAULT) is False  # 13 days 23:36 in
    assert case.status is not DunningStatus.PAST_DUE
    assert case.schedule_ended(day(14), DEFAULT) is True
    assert case.status is DunningStatus.PAST_DUE
    assert case.schedule_ended(day(15), DEFAULT) is False  # once


def test_a_retrying_or_settled_case_is_not_made_past_due_by_the_calendar():
    retrying = new_case()
    assert retrying.schedule_ended(day(30), DEFAULT) is False
    assert retrying.status is DunningStatus.RETRYING
    paid = new_case()
    paid.paid(day(2))
    assert paid.schedule_ended(day(30), DEFAULT) is False
    assert paid.status is DunningStatus.RECOVERED


def test_automatic_retries_stay_a_day_apart_when_the_schedule_is_behind():
    """A failure relayed 20 days late: every retry date is past, but the card is not charged
    four times in a row — each retry waits a day after the one before."""
    case = new_case()
    late = day(20)
    assert case.is_due(late)
    soft(case, SCHEDULED, late)
    assert case.next_retry_at == late + MIN_RETRY_GAP
    soft(case, SCHEDULED, case.next_retry_at)
    assert case.next_retry_at == late + 2 * MIN_RETRY_GAP
    soft(case, SCHEDULED, case.next_retry_at)
    soft(case, SCHEDULED, case.next_retry_at)
    assert case.status is DunningStatus.PAST_DUE


def test_a_customer_retry_leaves_the_schedule_where_it_was():
    case = new_case()
    soft(case, SCHEDULED, day(1, minutes=30))
    scheduled = case.next_retry_at
    soft(case, CUSTOMER, day(2))
    assert case.next_retry_at == scheduled == day(3)
    assert case.attempts_made == 1


def test_a_new_card_declined_softly_resumes_the_schedule_a_day_later_at_the_earliest():
    case = new_case()
    soft(case, SCHEDULED, day(1), code="lost_card")
    assert case.status is DunningStatus.NEEDS_PAYMENT_METHOD
    soft(case, PAYMENT_METHOD, day(5))
    assert case.status is DunningStatus.RETRYING
    assert case.next_retry_at == day(6)  # day 3 is past: not at once after the decline, a day after it
    soft(case, SCHEDULED, day(6))
    assert case.next_retry_at == day(7)


def test_an_earlier_failure_reported_late_moves_the_schedule_start():
    case = new_case()
    case.payment_failed(day(-2), "insufficient_funds", "older", DEFAULT)
    assert case.first_failed_at == day(-2)
    assert case.next_retry_at == day(-1)
    assert case.last_failure_message == "older"
