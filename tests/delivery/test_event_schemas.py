"""The wire schemas: strict, closed, UTC, and a fingerprint that ignores spelling."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from messages.events import (
    EVENT_TYPES,
    MAX_CREDITS,
    CreditsAdjusted,
    CreditsGifted,
    CustomerSignedUp,
    Event,
    InvoiceVoided,
    JobCancelled,
    JobCompleted,
    MembershipFrozen,
    MembershipUnfrozen,
    PaymentActionRequired,
    PaymentFailed,
    PaymentMethodUpdated,
    PaymentReversed,
    PaymentSucceeded,
    ReferralSubmitted,
    parse_event,
)

UTC = UTC

BASE = {"event_id": "evt-1", "occurred_at": "2025-03-01T10:00:00Z", "customer_id": "cust-1"}
VALID = {
    "job.completed": {**BASE, "type": "job.completed", "job_id": "job-1", "credits": 2},
    "job.cancelled": {**BASE, "type": "job.cancelled", "job_id": "job-1"},
    "payment.succeeded": {
        **BASE,
        "type": "payment.succeeded",
        "payment_id": "pi_1",
        "credits": 10,
        "amount_cents": 4900,
        "currency": "EUR",
    },
    "credits.adjusted": {**BASE, "type": "credits.adjusted", "credits": -3, "reason": "refund", "actor": "ops@x"},
    "payment.failed": {
        **BASE,
        "type": "payment.failed",
        "invoice_id": "in_1",
        "decline_code": "insufficient_funds",
        "failure_message": "Your card has insufficient funds.",
        "hosted_invoice_url": "https://invoice.stripe.com/i/in_1",
        "subscription_id": "sub_1",
    },
    "payment.action_required": {
        **BASE,
        "type": "payment.action_required",
        "invoice_id": "in_1",
        "hosted_invoice_url": None,
        "subscription_id": None,
    },
    "payment_method.updated": {**BASE, "type": "payment_method.updated", "payment_method_id": "pm_1"},
    "payment.reversed": {
        **BASE,
        "type": "payment.reversed",
        "payment_id": "in_1",
        "reason": "refund",
        "total_credits_reversed": 4,
    },
    "invoice.voided": {**BASE, "type": "invoice.voided", "invoice_id": "in_1", "reason": "uncollectible"},
    "customer.signed_up": {
        **BASE,
        "type": "customer.signed_up",
        "email": "jane@example.com",
        "phone": "+1 555 0100",
        "referral_code": "JANE-7K3PQ",
        "payment_fingerprint": "fp_1",
    },
    "referral.submitted": {
        **BASE,
        "type": "referral.submitted",
        "referral_code": "JANE-7K3PQ",
        "referred_customer_id": "cust-1",
    },
    "membership.frozen": {**BASE, "type": "membership.frozen"},
    "membership.unfrozen": {**BASE, "type": "membership.unfrozen"},
    "credits.gifted": {**BASE, "type": "credits.gifted", "to_customer_id": "cust-2", "credits": 3},
}
MODELS = {
    "job.completed": JobCompleted,
    "job.cancelled": JobCancelled,
    "payment.succeeded": PaymentSucceeded,
    "credits.adjusted": CreditsAdjusted,
    "payment.failed": PaymentFailed,
    "payment.action_required": PaymentActionRequired,
    "payment_method.updated": PaymentMethodUpdated,
    "payment.reversed": PaymentReversed,
    "invoice.voided": InvoiceVoided,
    "customer.signed_up": CustomerSignedUp,
    "referral.submitted": ReferralSubmitted,
    "membership.frozen": MembershipFrozen,
    "membership.unfrozen": MembershipUnfrozen,
    "credits.gifted": CreditsGifted,
}
ALL_TYPES = sorted(VALID)
WITH_CREDITS = ["job.completed", "payment.succeeded", "credits.adjusted", "credits.gifted"]


def test_a_gift_to_oneself_is_refused():
    with pytest.raises(ValidationError):
        parse_event(json.dumps({**VALID["credits.gifted"], "to_customer_id": "cust-1"}))


def test_payment_failed_refuses_a_link_that_is_not_https():
    with pytest.raises(ValidationError):
        parse_event(json.dumps({**VALID["payment.failed"], "hosted_invoice_url": "javascript:alert(1)"}))


def test_a_referral_names_its_customer_once():
    event = parse_event(json.dumps({k: v for k, v in VALID["referral.submitted"].items() if k != "customer_id"}))
    assert event.customer_id == event.referred_customer_id == "cust-1"
    with pytest.raises(ValidationError):
        parse_event(json.dumps({**VALID["referral.submitted"], "customer_id": "someone-else"}))


def test_payment_reversed_names_its_reason():
    with pytest.raises(ValidationError):
        parse_event(json.dumps({**VALID["payment.reversed"], "reason": "goodwill"}))


def raw(payload: dict) -> str:
    return json.dumps(payload)


def with_(kind: str, **changes) -> dict:
    return {**VALID[kind], **changes}


def without(kind: str, field: str) -> dict:
    return {k: v for k, v in VALID[kind].items() if k != field}


def refused(payload) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        parse_event(payload if isinstance(payload, (str, bytes)) else raw(payload))
    return caught.value


# --------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_each_type_decodes_to_its_model(kind):
    event = parse_event(raw(VALID[kind]))
    assert type(event) is MODELS[kind]
    assert isinstance(event, Event)
    assert event.type == kind
    assert event.event_id == "evt-1"
    assert event.customer_id == "cust-1"
    assert event.occurred_at == datetime(2025, 3, 1, 10, tzinfo=UTC)


def test_bytes_are_accepted():
    assert isinstance(parse_event(raw(VALID["job.cancelled"]).encode()), JobCancelled)


def test_event_types_registry_lists_every_type():
    assert EVENT_TYPES == MODELS


def test_defaults_apply_when_fields_are_omitted():
    completed = parse_event(raw(without("job.completed", "credits")))
    assert completed.credits == 1
    payment = parse_event(
        raw({k: v for k, v in VALID["payment.succeeded"].items() if k not in ("amount_cents", "currency")})
    )
    assert payment.amount_cents is None and payment.currency is None


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_round_trip_through_json(kind):
    event = parse_event(raw(VALID[kind]))
    again = parse_event(event.model_dump_json())
    assert again == event
    assert type(again) is type(event)
    assert again.fingerprint() == event.fingerprint()


def test_round_trip_of_models_built_in_python():
    event = PaymentSucceeded(
        event_id="evt-9",
        occurred_at=datetime(2025, 6, 30, 23, 59, 59, 123456, tzinfo=timezone(timedelta(hours=-7))),
        customer_id="cust-9",
        payment_id="pi_9",
        credits=MAX_CREDITS,
    )
    again = parse_event(event.model_dump_json())
    assert again == event
    assert again.occurred_at == datetime(2025, 7, 1, 6, 59, 59, 123456, tzinfo=UTC)


def test_events_are_immutable():
    event = parse_event(raw(VALID["job.completed"]))
    with pytest.raises(ValidationError):
        event.credits = 5  # type: ignore[misc]


# --------------------------------------------------------------------- refused input


def test_invalid_json_is_refused():
    assert refused('{"type": "job.completed", ')  # truncated
    assert refused("not json at all")
    assert refused("")


@pytest.mark.parametrize("payload", ["[]", '"job.completed"', "42", "null"])
def test_non_object_json_is_refused(payload):
    refused(payload)


def test_unknown_type_is_refused():
    error = refused(with_("job.completed", type="job.started"))
    assert error.errors()[0]["type"] == "union_tag_invalid"


def test_missing_type_is_refused():
    error = refused(without("job.completed", "type"))
    assert error.errors()[0]["type"] == "union_tag_not_found"


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_extra_fields_are_refused(kind):
    error = refused(with_(kind, priority="high"))
    assert any(e["type"] == "extra_forbidden" for e in error.errors())


@pytest.mark.parametrize("kind", ALL_TYPES)
@pytest.mark.parametrize("field", ["event_id", "occurred_at", "customer_id"])
def test_common_fields_are_required(kind, field):
    # A referral's customer is its referred_customer_id, which is required instead.
    missing = "referred_customer_id" if (kind, field) == ("referral.submitted", "customer_id") else field
    error = refused(without(kind, missing))
    assert any(e["type"] == "missing" and e["loc"][-1] == missing for e in error.errors())


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("job.completed", "job_id"),
        ("job.cancelled", "job_id"),
        ("payment.succeeded", "payment_id"),
        ("payment.succeeded", "credits"),
        ("credits.adjusted", "credits"),
        ("credits.adjusted", "reason"),
        ("credits.adjusted", "actor"),
    ],
)
def test_type_specific_fields_are_required(kind, field):
    refused(without(kind, field))


# event_id


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_event_id_of_255_characters_is_accepted(kind):
    assert parse_event(raw(with_(kind, event_id="e" * 255))).event_id == "e" * 255


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_event_id_of_256_characters_is_refused(kind):
    error = refused(with_(kind, event_id="e" * 256))
    assert error.errors()[0]["type"] == "string_too_long"


def test_event_id_of_one_character_is_accepted_and_empty_refused():
    assert parse_event(raw(with_("job.cancelled", event_id="x"))).event_id == "x"
    assert refused(with_("job.cancelled", event_id="")).errors()[0]["type"] == "string_too_short"


@pytest.mark.parametrize("bad", [123, None, ["evt"]])
def test_event_id_must_be_a_string(bad):
    refused(with_("job.cancelled", event_id=bad))


# customer_id


@pytest.mark.parametrize("bad", [42, None, "", {"id": "c"}])
def test_customer_id_must_be_a_non_empty_string(bad):
    refused(with_("job.completed", customer_id=bad))


# occurred_at


@pytest.mark.parametrize("naive", ["2025-03-01T10:00:00", "2025-03-01T10:00:00.123456", "2025-03-01 10:00:00"])
def test_naive_timestamps_are_refused(naive):
    error = refused(with_("job.completed", occurred_at=naive))
    assert error.errors()[0]["type"] == "timezone_aware"


def test_naive_datetime_is_refused_in_python_too():
    with pytest.raises(ValidationError):
        JobCancelled(event_id="e", occurred_at=datetime(2025, 3, 1, 10), customer_id="c", job_id="j")


@pytest.mark.parametrize("bad", ["yesterday", "2025-02-30T10:00:00Z", 1740823200, None])
def test_occurred_at_must_be_a_real_timestamp(bad):
    refused(with_("job.completed", occurred_at=bad))


@pytest.mark.parametrize(
    ("spelled", "utc"),
    [
        ("2025-03-01T10:00:00+02:00", datetime(2025, 3, 1, 8, tzinfo=UTC)),
        ("2025-03-01T01:30:00-05:30", datetime(2025, 3, 1, 7, tzinfo=UTC)),
        ("2025-12-31T23:00:00-02:00", datetime(2026, 1, 1, 1, tzinfo=UTC)),  # crosses a year
        ("2025-03-01T10:00:00Z", datetime(2025, 3, 1, 10, tzinfo=UTC)),
        ("2025-03-01T10:00:00+00:00", datetime(2025, 3, 1, 10, tzinfo=UTC)),
    ],
)
def test_occurred_at_is_normalised_to_utc(spelled, utc):
    event = parse_event(raw(with_("job.completed", occurred_at=spelled)))
    assert event.occurred_at == utc
    # Not merely the same instant: the stored value itself is in UTC.
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert (event.occurred_at.hour, event.occurred_at.day) == (utc.hour, utc.day)
    assert event.model_dump(mode="json")["occurred_at"] == utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_python_datetimes_with_an_offset_are_normalised_to_utc():
    moment = datetime(2025, 3, 1, 10, tzinfo=timezone(timedelta(hours=9)))
    event = JobCancelled(event_id="e", occurred_at=moment, customer_id="c", job_id="j")
    assert event.occurred_at.utcoffset() == timedelta(0)
    assert event.occurred_at.hour == 1


# credits


@pytest.mark.parametrize("kind", ["job.completed", "payment.succeeded"])
@pytest.mark.parametrize("bad", [0, -1, -100])
def test_credits_must_be_positive(kind, bad):
    error = refused(with_(kind, credits=bad))
    assert error.errors()[0]["type"] == "greater_than"


@pytest.mark.parametrize("kind", ["job.completed", "payment.succeeded"])
def test_smallest_positive_credit_is_accepted(kind):
    assert parse_event(raw(with_(kind, credits=1))).credits == 1


@pytest.mark.parametrize("kind", WITH_CREDITS)
@pytest.mark.parametrize("bad", ["5", 5.0, 2.5, True, None])
def test_credits_must_be_a_json_integer(kind, bad):
    refused(with_(kind, credits=bad))


@pytest.mark.parametrize("kind", WITH_CREDITS)
def test_credits_are_bounded(kind):
    assert parse_event(raw(with_(kind, credits=MAX_CREDITS))).credits == MAX_CREDITS
    refused(with_(kind, credits=MAX_CREDITS + 1))


@pytest.mark.parametrize("credits", [-MAX_CREDITS, -5, -1, 1, 7, MAX_CREDITS])
def test_adjustment_may_be_negative_or_positive(credits):
    assert parse_event(raw(with_("credits.adjusted", credits=credits))).credits == credits


def test_adjustment_of_zero_is_refused():
    error = refused(with_("credits.adjusted", credits=0))
    assert "zero" in str(error)
    refused(with_("credits.adjusted", credits=-MAX_CREDITS - 1))


@pytest.mark.parametrize(("field", "bad"), [("reason", ""), ("reason", "r" * 501), ("actor", ""), ("actor", 7)])
def test_adjustment_reason_and_actor_are_checked(field, bad):
    refused(with_("credits.adjusted", **{field: bad}))


@pytest.mark.parametrize(
    ("field", "bad"), [("currency", "eur"), ("currency", "EURO"), ("amount_cents", -1), ("payment_id", "")]
)
def test_payment_fields_are_checked(field, bad):
    refused(with_("payment.succeeded", **{field: bad}))


@pytest.mark.parametrize(("kind", "field"), [("job.completed", "job_id"), ("job.cancelled", "job_id")])
def test_job_id_must_be_a_non_empty_string(kind, field):
    refused(with_(kind, **{field: ""}))
    refused(with_(kind, **{field: 17}))


# --------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_fingerprint_ignores_key_order(kind):
    payload = VALID[kind]
    reordered = dict(reversed(list(payload.items())))
    assert list(reordered) != list(payload)
    assert parse_event(raw(reordered)).fingerprint() == parse_event(raw(payload)).fingerprint()


def test_fingerprint_ignores_whitespace_and_explicit_defaults():
    implicit = parse_event(raw(without("job.completed", "credits") | {"credits": 1}))
    omitted = parse_event(raw(without("job.completed", "credits")))
    spaced = parse_event(json.dumps(with_("job.completed", credits=1), indent=4))
    assert implicit.fingerprint() == omitted.fingerprint() == spaced.fingerprint()

    bare = {k: v for k, v in VALID["payment.succeeded"].items() if k not in ("amount_cents", "currency")}
    explicit_nulls = {**bare, "amount_cents": None, "currency": None}
    assert parse_event(raw(bare)).fingerprint() == parse_event(raw(explicit_nulls)).fingerprint()


def test_fingerprint_ignores_how_the_instant_was_spelled():
    a = parse_event(raw(with_("job.completed", occurred_at="2025-03-01T10:00:00Z")))
    b = parse_event(raw(with_("job.completed", occurred_at="2025-03-01T12:00:00.000+02:00")))
    assert a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize(
    "changes",
    [
        {"event_id": "evt-2"},
        {"customer_id": "cust-2"},
        {"occurred_at": "2025-03-01T10:00:01Z"},
        {"job_id": "job-2"},
        {"credits": 3},
    ],
)
def test_fingerprint_differs_for_different_payloads(changes):
    original = parse_event(raw(VALID["job.completed"]))
    changed = parse_event(raw(with_("job.completed", **changes)))
    assert changed.fingerprint() != original.fingerprint()


def test_fingerprint_differs_between_event_types_with_the_same_fields():
    completed = parse_event(raw(without("job.completed", "credits")))
    cancelled = parse_event(raw(with_("job.cancelled")))
    assert completed.fingerprint() != cancelled.fingerprint()


def test_fingerprint_is_a_sha256_hex_digest():
    fingerprint = parse_event(raw(VALID["credits.adjusted"])).fingerprint()
    assert len(fingerprint) == 64
    int(fingerprint, 16)


# --------------------------------------------------------------------- property: round trip

_offsets = st.integers(-14 * 60, 14 * 60).map(lambda minutes: timezone(timedelta(minutes=minutes)))
_moments = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2099, 12, 30), timezones=_offsets)
_text_chars = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00")
_ids = st.text(_text_chars, min_size=1, max_size=255)
_common = {"event_id": _ids, "occurred_at": _moments, "customer_id": _ids}

_events = st.one_of(
    st.builds(JobCompleted, **_common, job_id=_ids, credits=st.integers(1, MAX_CREDITS)),
    st.builds(JobCancelled, **_common, job_id=_ids),
    st.builds(
        PaymentSucceeded,
        **_common,
        payment_id=_ids,
        credits=st.integers(1, MAX_CREDITS),
        amount_cents=st.none() | st.integers(0, 10**9),
        currency=st.none() | st.from_regex(r"\A[A-Z]{3}\Z"),
    ),
    st.builds(
        CreditsAdjusted,
        **_common,
        credits=st.integers(-MAX_CREDITS, MAX_CREDITS).filter(bool),
        reason=st.text(_text_chars, min_size=1, max_size=500),
        actor=_ids,
    ),
)


@settings(max_examples=200, deadline=None)
@given(_events)
def test_any_event_round_trips_with_a_stable_fingerprint(event):
    assert event.occurred_at.utcoffset() == timedelta(0)
    again = parse_event(event.model_dump_json())
    assert again == event
    assert again.fingerprint() == event.fingerprint()
    # Re-serialising with keys in another order changes nothing.
    shuffled = json.dumps(dict(sorted(json.loads(event.model_dump_json()).items(), reverse=True)))
    assert parse_event(shuffled).fingerprint() == event.fingerprint()


@pytest.mark.parametrize("field", ["event_id", "customer_id", "job_id"])
def test_a_nul_character_is_refused_because_postgresql_text_cannot_hold_it(field):
    fields = dict(VALID["job.completed"])
    fields[field] = "a\x00b"
    with pytest.raises(ValidationError) as refused:
        parse_event(raw(fields))
    assert refused.value.errors()[0]["type"] == "string_pattern_mismatch"
