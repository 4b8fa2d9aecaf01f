"""Worked examples for the referral rules: pure domain, no I/O, no clock reads."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.referrals import (
    CODE_ALPHABET,
    CODE_PATTERN,
    FraudRules,
    Party,
    PayoutCalendar,
    PriorReferral,
    Referral,
    ReferralFacts,
    ReferralRuleError,
    ReferralRules,
    ReferralStatus,
    Referrer,
    ReferrerKind,
    Verdict,
    judge_referral,
    nearly_identical_emails,
    new_code,
    normalize_code,
    normalize_email,
    normalize_phone,
)

UTC = UTC
NEW_YORK = ZoneInfo("America/New_York")
RULES = FraudRules()
HOLD = timedelta(days=14)
T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def at(days: float = 0, hours: float = 0) -> datetime:
    return T0 + timedelta(days=days, hours=hours)


# ---------------------------------------------------------------- builders


def referrer(
    customer_id: str | None = "ref-1",
    *,
    email: str | None = "alice@example.com",
    phone: str | None = "15550000001",
    fingerprints: frozenset[str] = frozenset({"fp-alice"}),
    kind: ReferrerKind = ReferrerKind.CUSTOMER,
) -> Referrer:
    return Referrer(customer_id or "emp-1", kind, Party(customer_id, email, phone, fingerprints))


def referred(
    customer_id: str = "cust-1",
    *,
    email: str | None = "bob@example.com",
    phone: str | None = "15550000002",
    fingerprints: frozenset[str] = frozenset({"fp-bob"}),
) -> Party:
    return Party(customer_id, email, phone, fingerprints)


def prior(n: int, *, start: datetime = T0, step: timedelta = timedelta(minutes=1)) -> list[PriorReferral]:
    """``n`` earlier referrals with distinct, unrelated emails and cards."""
    words = [
        "xavier",
        "yolanda",
        "zachary",
        "walter",
        "victoria",
        "ursula",
        "theodore",
        "samantha",
        "quentin",
        "priscilla",
    ]
    return [
        PriorReferral(
            f"old-{i}",
            start + i * step,
            f"{words[i % len(words)]}{'q' * (i // len(words) * 3)}@elsewhere.org",
            frozenset({f"fp-old-{i}"}),
        )
        for i in range(n)
    ]


def judge(
    the_referrer: Referrer | None = None,
    code_active: bool = True,
    the_referred: Party | None = None,
    *,
    already_referred: bool = False,
    paid_before: bool = False,
    prior_referrals: list[PriorReferral] | None = None,
    other_customers_with_fingerprint: int = 0,
    when: datetime | None = None,
    rules: FraudRules = RULES,
    unknown: bool = False,
) -> Verdict:
    facts = ReferralFacts(
        None if unknown else (the_referrer or referrer()),
        code_active,
        the_referred or referred(),
        already_referred=already_referred,
        paid_before=paid_before,
        prior=prior_referrals or [],
        other_customers_with_fingerprint=other_customers_with_fingerprint,
    )
    return judge_referral(
        facts,
        at=when or at(1),
        rules=rules,
    )


def rejected(verdict: Verdict, reason_start: str) -> bool:
    return (
        verdict.status is ReferralStatus.REJECTED
        and verdict.reason is not None
        and verdict.reason.startswith(reason_start)
    )


def flagged_with(verdict: Verdict, prefix: str) -> list[str]:
    return [f for f in verdict.flags if f.startswith(prefix)]


# ---------------------------------------------------------------- email normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Jane@Example.COM", "jane@example.com"),
        ("  jane@example.com \n", "jane@example.com"),
        ("\tJANE@EXAMPLE.COM ", "jane@example.com"),
        ("jane+promo@example.com", "jane@example.com"),
        ("jane+a+b@example.com", "jane@example.com"),
        ("jane+@example.com", "jane@example.com"),
        ("jane+news@fastmail.fm", "jane@fastmail.fm"),
        ("Jane.Doe@example.com", "jane.doe@example.com"),  # dots count outside Gmail
        ("j.a.n.e@outlook.com", "j.a.n.e@outlook.com"),
        ("Jane.Doe@gmail.com", "janedoe@gmail.com"),
        ("j.a.n.e.d.o.e@GMAIL.com", "janedoe@gmail.com"),
        ("jane.doe+spam@gmail.com", "janedoe@gmail.com"),
        ("jane.doe@googlemail.com", "janedoe@gmail.com"),
        ("Jane.Doe+x@GoogleMail.Com", "janedoe@gmail.com"),
        ("jane.doe@gmail.co.uk", "jane.doe@gmail.co.uk"),  # not Gmail's domain
        ("jane.doe@mail.gmail.com", "jane.doe@mail.gmail.com"),
    ],
)
def test_normalize_email(raw: str, expected: str) -> None:
    assert normalize_email(raw) == expected


@pytest.mark.parametrize(
    "raw", [None, "", "   ", "no-at-sign", "@example.com", "+tag@example.com", "...@gmail.com", "jane@"]
)
def test_normalize_email_without_a_mailbox_is_none(raw: str | None) -> None:
    assert normalize_email(raw) is None


def test_normalize_email_is_idempotent() -> None:
    for raw in ["Jane.Doe+x@GoogleMail.Com", "bob+1@Example.org", " c.d@outlook.com "]:
        once = normalize_email(raw)
        assert normalize_email(once) == once


def test_gmail_variants_are_one_mailbox() -> None:
    variants = ["janedoe@gmail.com", "Jane.Doe@gmail.com", "j.anedoe+x@googlemail.com", " JANEDOE+1@GMAIL.COM "]
    assert {normalize_email(v) for v in variants} == {"janedoe@gmail.com"}


# ---------------------------------------------------------------- phone normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+1 (555) 123-4567", "15551234567"),
        ("555-123-4567", "15551234567"),  # 10 digits: North American, country code added
        ("(555) 123 4567", "15551234567"),
        ("555.123.4567", "15551234567"),
        ("1-555-123-4567", "15551234567"),
        ("001 555 123 4567", "15551234567"),  # international 00 prefix
        ("+44 20 7946 0958", "442079460958"),
        ("0044 20 7946 0958", "442079460958"),
        ("1234567", "1234567"),  # seven digits is the shortest kept
    ],
)
def test_normalize_phone(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize("raw", [None, "", "abc", "123456", "+1 23", "---"])
def test_normalize_phone_too_short_is_none(raw: str | None) -> None:
    assert normalize_phone(raw) is None


def test_phone_spellings_of_one_number_agree() -> None:
    spellings = ["+1 (555) 123-4567", "555-123-4567", "0015551234567", "5551234567", "1 555 123 4567"]
    assert {normalize_phone(s) for s in spellings} == {"15551234567"}


# ---------------------------------------------------------------- near-identical emails


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("jane1@example.com", "jane2@example.com"),  # one substitution
        ("jane@example.com", "jane1@example.com"),  # one insertion
        ("janedoe@gmail.com", "janeoe@gmail.com"),  # one deletion
        ("johnsmith@x.org", "johnsmyth@x.org"),
    ],
)
def test_one_edit_apart_is_near_identical(a: str, b: str) -> None:
    assert nearly_identical_emails(a, b)
    assert nearly_identical_emails(b, a)


def test_same_address_is_not_near_identical() -> None:
    assert not nearly_identical_emails("jane@example.com", "jane@example.com")


def test_different_domains_are_not_near_identical() -> None:
    assert not nearly_identical_emails("jane1@example.com", "jane2@example.org")
    assert not nearly_identical_emails("jane@example.com", "jane@example.org")


def test_two_edits_apart_is_not_near_identical() -> None:
    assert not nearly_identical_emails("jane12@example.com", "jane34@example.com")
    assert not nearly_identical_emails("alice@example.com", "bob@example.com")


@pytest.mark.parametrize(
    ("a", "b"),
    [("ab1@x.com", "ab2@x.com"), ("abc@x.com", "abd@x.com"), ("abc@x.com", "abcd@x.com"), ("a@x.com", "b@x.com")],
)
def test_very_short_locals_are_not_near_identical(a: str, b: str) -> None:
    assert not nearly_identical_emails(a, b)


def test_four_character_locals_are_long_enough() -> None:
    assert nearly_identical_emails("abcd@x.com", "abce@x.com")


# ---------------------------------------------------------------- codes

AMBIGUOUS = set("0O1IL")


def test_alphabet_has_no_ambiguous_characters() -> None:
    assert not AMBIGUOUS & set(CODE_ALPHABET)
    assert len(set(CODE_ALPHABET)) == len(CODE_ALPHABET)
    assert set(CODE_ALPHABET) == (set("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") - AMBIGUOUS)


def test_code_without_hint_is_the_random_body_only() -> None:
    for hint in (None, "", "123", "!!!"):
        code = new_code(hint)
        assert len(code) == 5
        assert "-" not in code
        assert set(code) <= set(CODE_ALPHABET)
        assert CODE_PATTERN.match(code)


@pytest.mark.parametrize(
    ("hint", "prefix"),
    [
        ("jane", "JANE"),
        ("Jane Doe", "JANEDOE"),
        ("jane.doe+promo", "JANEDOEP"),  # letters only, eight at most
        ("Bartholomew", "BARTHOLO"),
        ("o'brien-99", "OBRIEN"),
        ("x1", "X"),
    ],
)
def test_code_prefix_comes_from_the_name_hint(hint: str, prefix: str) -> None:
    code = new_code(hint)
    head, sep, body = code.partition("-")
    assert (head, sep) == (prefix, "-")
    assert len(body) == 5 and set(body) <= set(CODE_ALPHABET)
    assert CODE_PATTERN.match(code)


def test_code_body_length_is_configurable() -> None:
    assert len(new_code(None, length=8)) == 8
    assert len(new_code("ann", length=7).split("-")[1]) == 7


def test_many_codes_only_use_the_alphabet_and_are_mostly_distinct() -> None:
    codes = [new_code("jane") for _ in range(500)]
    for code in codes:
        assert re.fullmatch(r"JANE-[" + CODE_ALPHABET + r"]{5}", code)
        assert not AMBIGUOUS & set(code.split("-")[1])
    # 31**5 ≈ 28.6 million bodies: collisions are possible but must be rare.
    assert len(set(codes)) >= 495


def test_normalize_code_is_case_and_space_insensitive() -> None:
    assert normalize_code("  jane-7k3pq\n") == "JANE-7K3PQ"


@pytest.mark.parametrize("char", sorted(AMBIGUOUS))
def test_code_pattern_rejects_ambiguous_characters_in_the_body(char: str) -> None:
    """The code pattern should accept only the alphabet's characters in the random body."""
    assert CODE_PATTERN.match("JANE-7K3P" + "Q")
    assert not CODE_PATTERN.match("JANE-7K3P" + char)


# ---------------------------------------------------------------- rejections, each alone


def test_a_clean_referral_awaits_payment_without_flags() -> None:
    verdict = judge()
    assert verdict == Verdict(ReferralStatus.AWAITING_PAYMENT, None, ())


def test_unknown_code_is_rejected() -> None:
    verdict = judge(unknown=True)
    assert verdict.status is ReferralStatus.REJECTED
    assert verdict.reason == "unknown referral code"
    assert verdict.flags == ()


def test_inactive_code_is_rejected() -> None:
    verdict = judge(code_active=False)
    assert verdict.status is ReferralStatus.REJECTED
    assert verdict.reason == "the referral code is no longer active"


def test_second_referral_for_the_same_customer_is_rejected() -> None:
    verdict = judge(already_referred=True)
    assert verdict.status is ReferralStatus.REJECTED
    assert verdict.reason == "the customer already has a referrer"


def test_customer_who_paid_before_is_rejected() -> None:
    verdict = judge(paid_before=True)
    assert verdict.status is ReferralStatus.REJECTED
    assert verdict.reason == "the customer had already paid before being referred"


def test_self_referral_same_customer() -> None:
    verdict = judge(referrer("cust-1"), the_referred=referred("cust-1"))
    assert verdict.status is ReferralStatus.REJECTED
    assert verdict.reason == "self-referral: the referrer is the customer"


def test_self_referral_same_email() -> None:
    verdict = judge(referrer(email="bob@example.com"))
    assert verdict.reason == "self-referral: same email address"


def test_self_referral_same_email_after_gmail_normalisation() -> None:
    """Party carries normalised addresses: case, dots and +tags do not hide the same mailbox."""
    ref = referrer(email=normalize_email("Bob.Smith@gmail.com"))
    new = referred(email=normalize_email("bobsmith+promo@googlemail.com"))
    verdict = judge(ref, the_referred=new)
    assert rejected(verdict, "self-referral: same email address")


def test_self_referral_same_email_after_tag_and_case_normalisation() -> None:
    ref = referrer(email=normalize_email("Bob@Example.com"))
    new = referred(email=normalize_email(" bob+2@example.COM"))
    assert rejected(judge(ref, the_referred=new), "self-referral: same email address")


def test_self_referral_same_phone() -> None:
    ref = referrer(phone=normalize_phone("+1 (555) 000-0002"))
    new = referred(phone=normalize_phone("555-000-0002"))
    verdict = judge(ref, the_referred=new)
    assert verdict.reason == "self-referral: same phone number"


def test_self_referral_same_card() -> None:
    verdict = judge(
        referrer(fingerprints=frozenset({"fp-x", "fp-shared"})),
        the_referred=referred(fingerprints=frozenset({"fp-shared"})),
    )
    assert verdict.reason == "self-referral: same payment card"


def test_missing_contact_details_do_not_count_as_matching() -> None:
    """Two parties without an email, phone or card are not the same person for that reason."""
    ref = referrer(email=None, phone=None, fingerprints=frozenset())
    new = referred(email=None, phone=None, fingerprints=frozenset())
    assert judge(ref, the_referred=new).status is ReferralStatus.AWAITING_PAYMENT


def test_employee_referrer_without_customer_id_is_not_self_referral_of_anonymous() -> None:
    emp = referrer(None, email="staff@business.com", phone=None, fingerprints=frozenset(), kind=ReferrerKind.EMPLOYEE)
    assert judge(emp).status is ReferralStatus.AWAITING_PAYMENT
    # ... but an employee referring their own email is still a self-referral.
    assert rejected(judge(emp, the_referred=referred(email="staff@business.com")), "self-referral: same email address")


# ---------------------------------------------------------------- rejection precedence


def test_unknown_code_beats_everything() -> None:
    verdict = judge(
        referrer("cust-1", email="bob@example.com"),
        code_active=False,
        the_referred=referred("cust-1"),
        already_referred=True,
        paid_before=True,
        prior_referrals=prior(10, start=at(1) - timedelta(hours=1)),
        other_customers_with_fingerprint=3,
        unknown=True,
    )
    assert verdict == Verdict(ReferralStatus.REJECTED, "unknown referral code", ())


def test_inactive_code_beats_second_referral_self_referral_and_paid_before() -> None:
    verdict = judge(
        referrer("cust-1"), code_active=False, the_referred=referred("cust-1"), already_referred=True, paid_before=True
    )
    assert verdict.reason == "the referral code is no longer active"


def test_second_referral_beats_self_referral_and_paid_before() -> None:
    verdict = judge(referrer("cust-1"), the_referred=referred("cust-1"), already_referred=True, paid_before=True)
    assert verdict.reason == "the customer already has a referrer"


def test_self_referral_beats_paid_before() -> None:
    verdict = judge(referrer(phone="15550000002"), paid_before=True)
    assert verdict.reason == "self-referral: same phone number"


def test_self_referral_reasons_in_order_customer_email_phone_card() -> None:
    everything = dict(email="bob@example.com", phone="15550000002", fingerprints=frozenset({"fp-bob"}))
    assert judge(referrer("cust-1", **everything)).reason == "self-referral: the referrer is the customer"
    assert judge(referrer("ref-1", **everything)).reason == "self-referral: same email address"
    assert judge(referrer("ref-1", **{**everything, "email": "x@y.com"})).reason == "self-referral: same phone number"
    assert (
        judge(referrer("ref-1", **{**everything, "email": "x@y.com", "phone": "1234567"})).reason
        == "self-referral: same payment card"
    )


def test_rejections_beat_flags() -> None:
    """A rejected referral carries no flags: it will not be paid anyway."""
    crowd = prior(10, start=at(1) - timedelta(hours=2))
    verdict = judge(paid_before=True, prior_referrals=crowd, other_customers_with_fingerprint=2)
    assert verdict.status is ReferralStatus.REJECTED
    assert verdict.flags == ()


# ---------------------------------------------------------------- flags, each alone


def test_velocity_limit_is_allowed_one_more_is_flagged() -> None:
    now = at(1)
    four_before = prior(RULES.velocity_limit - 1, start=now - timedelta(hours=3))
    assert judge(prior_referrals=four_before, when=now).flags == ()  # 5 within 24 h: fine
    five_before = prior(RULES.velocity_limit, start=now - timedelta(hours=3))
    verdict = judge(prior_referrals=five_before, when=now)
    assert verdict.status is ReferralStatus.AWAITING_PAYMENT
    assert verdict.flags == ("velocity: 6 referrals within 24 h",)


def test_velocity_ignores_referrals_outside_the_window() -> None:
    now = at(2)
    old = prior(20, start=now - timedelta(days=1, hours=5), step=timedelta(minutes=10))  # all before now - 24 h
    assert all(p.submitted_at <= now - RULES.velocity_window for p in old)
    assert judge(prior_referrals=old, when=now).flags == ()


def test_velocity_window_is_half_open_at_its_start() -> None:
    now = at(2)
    rules = FraudRules(velocity_limit=1, velocity_window=timedelta(hours=24))
    on_the_edge = [PriorReferral("old", now - timedelta(hours=24), "zed@elsewhere.org", frozenset())]
    just_inside = [
        PriorReferral("old", now - timedelta(hours=24) + timedelta(seconds=1), "zed@elsewhere.org", frozenset())
    ]
    assert judge(prior_referrals=on_the_edge, when=now, rules=rules).flags == ()
    assert judge(prior_referrals=just_inside, when=now, rules=rules).flags == ("velocity: 2 referrals within 24 h",)


def test_velocity_ignores_later_referrals() -> None:
    now = at(2)
    rules = FraudRules(velocity_limit=1)
    later = [PriorReferral("later", now + timedelta(minutes=5), "zed@elsewhere.org", frozenset())]
    assert judge(prior_referrals=later, when=now, rules=rules).flags == ()


def test_velocity_flag_names_the_configured_window() -> None:
    rules = FraudRules(velocity_limit=2, velocity_window=timedelta(hours=6))
    now = at(1)
    verdict = judge(prior_referrals=prior(2, start=now - timedelta(hours=1)), when=now, rules=rules)
    assert verdict.flags == ("velocity: 3 referrals within 6 h",)


def test_near_identical_email_is_flagged() -> None:
    earlier = [PriorReferral("old", at(0), "bobby1@example.com", frozenset({"fp-old"}))]
    verdict = judge(the_referred=referred(email="bobby2@example.com"), prior_referrals=earlier)
    assert verdict.status is ReferralStatus.AWAITING_PAYMENT
    assert verdict.flags == ("near-identical email to another referral of this referrer (bobby1@example.com)",)


def test_near_identical_email_names_the_first_match_alphabetically() -> None:
    earlier = [
        PriorReferral("old-2", at(0), "bobbyz@example.com", frozenset()),
        PriorReferral("old-1", at(0), "bobbya@example.com", frozenset()),
    ]
    verdict = judge(the_referred=referred(email="bobby@example.com"), prior_referrals=earlier)
    assert verdict.flags == ("near-identical email to another referral of this referrer (bobbya@example.com)",)


def test_unrelated_or_short_emails_are_not_flagged() -> None:
    earlier = [
        PriorReferral("old-1", at(0), "carol@example.com", frozenset()),
        PriorReferral("old-2", at(0), "bob1@other.com", frozenset()),
        PriorReferral("old-3", at(0), None, frozenset()),
    ]
    assert judge(the_referred=referred(email="bob@example.com"), prior_referrals=earlier).flags == ()
    assert judge(the_referred=referred(email=None), prior_referrals=earlier).flags == ()


def test_gmail_dot_variants_of_earlier_referral_are_flagged_after_one_edit() -> None:
    earlier = [PriorReferral("old", at(0), normalize_email("jane.doe1@gmail.com"), frozenset())]
    new = referred(email=normalize_email("Jane.Doe2+x@googlemail.com"))
    assert flagged_with(judge(the_referred=new, prior_referrals=earlier), "near-identical email")


def test_same_normalised_email_as_an_earlier_referral_is_flagged() -> None:
    """jane+1@gmail.com and jane+2@gmail.com are one mailbox: two referred "customers" behind it
    are at least as suspicious as jane1/jane2, which are flagged."""
    earlier = [PriorReferral("old", at(0), normalize_email("jane.doe+1@gmail.com"), frozenset({"fp-old"}))]
    new = referred(email=normalize_email("janedoe+2@gmail.com"))
    verdict = judge(the_referred=new, prior_referrals=earlier)
    assert verdict.status is ReferralStatus.AWAITING_PAYMENT
    assert flagged_with(verdict, "near-identical email"), verdict.flags


def test_card_shared_with_an_earlier_referral_of_this_referrer_is_flagged() -> None:
    earlier = [PriorReferral("old", at(0), "carol@example.com", frozenset({"fp-bob"}))]
    verdict = judge(prior_referrals=earlier)
    assert verdict.flags == ("payment card shared with another customer",)


def test_card_shared_with_another_referred_customer_anywhere_is_flagged() -> None:
    verdict = judge(other_customers_with_fingerprint=1)
    assert verdict.status is ReferralStatus.AWAITING_PAYMENT
    assert verdict.flags == ("payment card shared with another customer",)


def test_different_cards_are_not_flagged() -> None:
    earlier = [PriorReferral("old", at(0), "carol@example.com", frozenset({"fp-carol"}))]
    assert judge(prior_referrals=earlier, other_customers_with_fingerprint=0).flags == ()


def test_all_flags_together_in_order() -> None:
    now = at(1)
    crowd = prior(5, start=now - timedelta(hours=2))
    crowd.append(PriorReferral("twin", now - timedelta(days=3), "bobbyy@example.com", frozenset({"fp-bob"})))
    verdict = judge(the_referred=referred(email="bobby@example.com"), prior_referrals=crowd, when=now)
    assert verdict.status is ReferralStatus.AWAITING_PAYMENT
    assert verdict.flags == (
        "velocity: 6 referrals within 24 h",
        "near-identical email to another referral of this referrer (bobbyy@example.com)",
        "payment card shared with another customer",
    )


def test_prior_may_be_any_iterable() -> None:
    now = at(1)
    gen = (p for p in prior(5, start=now - timedelta(hours=1)))
    facts = ReferralFacts(referrer(), True, referred(), prior=gen)
    verdict = judge_referral(facts, at=now, rules=RULES)
    assert flagged_with(verdict, "velocity")


# ---------------------------------------------------------------- Hypothesis: velocity


@settings(max_examples=150, deadline=None)
@given(
    offsets=st.lists(st.integers(min_value=0, max_value=72 * 60), min_size=1, max_size=25),
    limit=st.integers(min_value=1, max_value=6),
    window_hours=st.integers(min_value=1, max_value=48),
)
def test_velocity_flag_exactly_when_more_than_limit_in_window(
    offsets: list[int], limit: int, window_hours: int
) -> None:
    rules = FraudRules(velocity_limit=limit, velocity_window=timedelta(hours=window_hours))
    times = sorted(T0 + timedelta(minutes=m) for m in offsets)
    ref = referrer()
    history: list[PriorReferral] = []
    for i, moment in enumerate(times):
        # Emails on distinct domains and distinct cards: only velocity can flag.
        new = Party(f"c{i}", f"customer{i}@d{i}.example", None, frozenset({f"fp-{i}"}))
        verdict = judge_referral(ReferralFacts(ref, True, new, prior=list(history)), at=moment, rules=rules)
        in_window = 1 + sum(1 for p in history if moment - rules.velocity_window < p.submitted_at <= moment)
        assert verdict.status is ReferralStatus.AWAITING_PAYMENT
        if in_window > limit:
            assert verdict.flags == (f"velocity: {in_window} referrals within {window_hours} h",)
        else:
            assert verdict.flags == ()
        history.append(PriorReferral(new.customer_id, moment, new.email, new.payment_fingerprints))


# ---------------------------------------------------------------- the Referral lifecycle


def submitted(verdict: Verdict | None = None, when: datetime = T0) -> Referral:
    return Referral.submitted(
        "cust-1", "ref-1", "ALICE-7K3PQ", when, verdict or Verdict(ReferralStatus.AWAITING_PAYMENT)
    )


def statuses(referral: Referral) -> list[ReferralStatus]:
    return [c.status for c in referral.history]


def test_submitted_referral_records_its_first_change() -> None:
    referral = submitted()
    assert referral.status is ReferralStatus.AWAITING_PAYMENT
    assert referral.reward_cents is None and referral.approve_after is None
    assert [(c.status, c.at, c.reason) for c in referral.history] == [(ReferralStatus.AWAITING_PAYMENT, T0, None)]


def test_rejected_submission_records_its_reason() -> None:
    referral = Referral.submitted(
        "cust-1", None, "NOPE1", T0, Verdict(ReferralStatus.REJECTED, "unknown referral code")
    )
    assert referral.status is ReferralStatus.REJECTED
    assert referral.reason == "unknown referral code"
    assert [(c.status, c.at, c.reason) for c in referral.history] == [
        (ReferralStatus.REJECTED, T0, "unknown referral code")
    ]


def test_flagged_submission_records_its_flags_in_history() -> None:
    referral = submitted(
        Verdict(
            ReferralStatus.AWAITING_PAYMENT,
            None,
            ("velocity: 6 referrals within 24 h", "payment card shared with another customer"),
        )
    )
    assert referral.flags == ("velocity: 6 referrals within 24 h", "payment card shared with another customer")
    assert referral.history[0].reason == "velocity: 6 referrals within 24 h; payment card shared with another customer"


def test_full_happy_path_pending_approved_in_payout_paid() -> None:
    referral = submitted()
    paid_at = at(2)
    assert referral.qualify("pi_1", paid_at, 2_000, HOLD) is True
    assert referral.status is ReferralStatus.PENDING
    assert referral.reward_cents == 2_000
    assert referral.qualifying_payment_id == "pi_1"
    assert referral.approve_after == paid_at + HOLD

    assert referral.release(paid_at + HOLD - timedelta(seconds=1)) is False
    assert referral.status is ReferralStatus.PENDING
    assert referral.release(paid_at + HOLD) is True
    assert referral.status is ReferralStatus.APPROVED

    referral.into_payout(42, at(17))
    assert referral.status is ReferralStatus.IN_PAYOUT and referral.payout_id == 42
    referral.paid(at(18))
    assert referral.status is ReferralStatus.PAID

    assert [(c.status, c.at, c.reason) for c in referral.history] == [
        (ReferralStatus.AWAITING_PAYMENT, T0, None),
        (ReferralStatus.PENDING, paid_at, "first payment pi_1; held until 2026-03-18"),
        (ReferralStatus.APPROVED, paid_at + HOLD, "hold period over"),
        (ReferralStatus.IN_PAYOUT, at(17), "payout 42"),
        (ReferralStatus.PAID, at(18), "payout 42 paid"),
    ]


def test_qualify_only_once() -> None:
    referral = submitted()
    assert referral.qualify("pi_1", at(1), 2_000, HOLD)
    assert referral.qualify("pi_2", at(2), 9_999, HOLD) is False
    assert referral.qualifying_payment_id == "pi_1" and referral.reward_cents == 2_000
    assert len(referral.history) == 2


def test_a_rejected_referral_never_qualifies() -> None:
    referral = Referral.submitted(
        "cust-1", "ref-1", "X", T0, Verdict(ReferralStatus.REJECTED, "self-referral: same phone number")
    )
    assert referral.qualify("pi_1", at(1), 2_000, HOLD) is False
    assert referral.status is ReferralStatus.REJECTED
    assert referral.reward_cents is None


def test_release_does_nothing_outside_pending() -> None:
    referral = submitted()
    assert referral.release(at(100)) is False
    referral.qualify("pi_1", at(1), 2_000, HOLD)
    assert referral.release(at(100)) is True
    assert referral.release(at(101)) is False
    assert statuses(referral).count(ReferralStatus.APPROVED) == 1


def test_zero_hold_releases_immediately() -> None:
    referral = submitted()
    referral.qualify("pi_1", at(1), 2_000, timedelta(0))
    assert referral.release(at(1)) is True


def test_flagged_reward_waits_for_an_admin_then_the_hold() -> None:
    flags = ("near-identical email to another referral of this referrer (bobb@example.com)",)
    referral = submitted(Verdict(ReferralStatus.AWAITING_PAYMENT, None, flags))
    paid_at = at(1)
    assert referral.qualify("pi_1", paid_at, 2_000, HOLD)
    assert referral.status is ReferralStatus.FLAGGED
    assert referral.history[-1] == referral.history[-1].__class__(ReferralStatus.FLAGGED, paid_at, flags[0])

    # The hold running out does not release a flagged reward.
    assert referral.release(paid_at + HOLD + timedelta(days=1)) is False
    assert referral.status is ReferralStatus.FLAGGED
    with pytest.raises(ReferralRuleError):
        referral.into_payout(1, paid_at + HOLD)

    # An admin approves within the hold: pending until the hold is over.
    referral.admin_approve(at(3), "ops@business")
    assert referral.status is ReferralStatus.PENDING
    assert referral.flags == ()
    assert referral.history[-1].reason == "approved by ops@business"
    assert referral.history[-1].at == at(3)
    assert referral.release(paid_at + HOLD - timedelta(minutes=1)) is False
    assert referral.release(paid_at + HOLD) is True
    assert statuses(referral) == [
        ReferralStatus.AWAITING_PAYMENT,
        ReferralStatus.FLAGGED,
        ReferralStatus.PENDING,
        ReferralStatus.APPROVED,
    ]


def test_admin_approval_after_the_hold_makes_the_reward_payable_at_once() -> None:
    referral = submitted(Verdict(ReferralStatus.AWAITING_PAYMENT, None, ("payment card shared with another customer",)))
    referral.qualify("pi_1", at(1), 5_000, HOLD)
    late = at(30)
    referral.admin_approve(late, "ops")
    assert referral.status is ReferralStatus.APPROVED
    assert [(c.status, c.at, c.reason) for c in referral.history[-2:]] == [
        (ReferralStatus.PENDING, late, "approved by ops"),
        (ReferralStatus.APPROVED, late, "hold period over"),
    ]


def test_admin_rejects_a_flagged_reward() -> None:
    referral = submitted(Verdict(ReferralStatus.AWAITING_PAYMENT, None, ("velocity: 6 referrals within 24 h",)))
    referral.qualify("pi_1", at(1), 2_000, HOLD)
    referral.admin_reject(at(2), "ops", "ring of fake accounts")
    assert referral.status is ReferralStatus.REJECTED
    assert referral.reason == "ring of fake accounts"
    assert referral.history[-1] == referral.history[-1].__class__(
        ReferralStatus.REJECTED, at(2), "rejected by ops: ring of fake accounts"
    )
    assert referral.release(at(100)) is False
    with pytest.raises(ReferralRuleError):
        referral.admin_approve(at(3), "ops")


@pytest.mark.parametrize("stage", ["awaiting", "pending", "approved"])
def test_admin_can_reject_any_unpaid_reward(stage: str) -> None:
    referral = submitted()
    if stage != "awaiting":
        referral.qualify("pi_1", at(1), 2_000, HOLD)
    if stage == "approved":
        referral.release(at(20))
    referral.admin_reject(at(21), "ops", "duplicate account")
    assert referral.status is ReferralStatus.REJECTED


@pytest.mark.parametrize("stage", ["in_payout", "paid", "voided", "rejected"])
def test_admin_cannot_reject_a_settled_reward(stage: str) -> None:
    referral = _at_stage(stage)
    before = list(referral.history)
    with pytest.raises(ReferralRuleError):
        referral.admin_reject(at(30), "ops", "too late")
    assert referral.history == before
    assert referral.status.value == stage


def _at_stage(stage: str) -> Referral:
    referral = submitted()
    if stage == "awaiting_payment":
        return referral
    if stage == "rejected":
        referral.admin_reject(at(1), "ops", "no")
        return referral
    if stage == "flagged":
        referral = submitted(Verdict(ReferralStatus.AWAITING_PAYMENT, None, ("velocity: 9 referrals within 24 h",)))
        referral.qualify("pi_1", at(1), 2_000, HOLD)
        return referral
    referral.qualify("pi_1", at(1), 2_000, HOLD)
    if stage == "pending":
        return referral
    if stage == "voided":
        referral.payment_reversed(at(2), "refunded")
        return referral
    referral.release(at(15))
    if stage == "approved":
        return referral
    referral.into_payout(7, at(16))
    if stage == "in_payout":
        return referral
    referral.paid(at(17))
    assert stage == "paid"
    return referral


@pytest.mark.parametrize(
    "stage", ["awaiting_payment", "pending", "approved", "in_payout", "paid", "rejected", "voided"]
)
def test_only_a_flagged_reward_can_be_approved_by_hand(stage: str) -> None:
    referral = _at_stage(stage)
    assert referral.status.value == stage
    before = list(referral.history)
    with pytest.raises(ReferralRuleError):
        referral.admin_approve(at(30), "ops")
    assert referral.history == before
    assert referral.status.value == stage


def test_approving_a_paid_reward_raises() -> None:
    referral = _at_stage("paid")
    with pytest.raises(ReferralRuleError, match="paid"):
        referral.admin_approve(at(30), "ops")


@pytest.mark.parametrize("stage", ["awaiting_payment", "pending", "flagged", "in_payout", "paid", "rejected", "voided"])
def test_only_an_approved_reward_goes_into_a_payout(stage: str) -> None:
    referral = _at_stage(stage)
    with pytest.raises(ReferralRuleError):
        referral.into_payout(99, at(30))
    assert referral.status.value == stage
    assert referral.payout_id in (None, 7)


def test_into_payout_of_a_pending_reward_raises() -> None:
    referral = _at_stage("pending")
    with pytest.raises(ReferralRuleError, match="pending"):
        referral.into_payout(1, at(2))
    assert referral.payout_id is None


@pytest.mark.parametrize("stage", ["awaiting_payment", "pending", "approved", "flagged", "paid", "rejected", "voided"])
def test_paid_only_moves_a_reward_in_payout(stage: str) -> None:
    referral = _at_stage(stage)
    before = list(referral.history)
    referral.paid(at(30))
    assert referral.status.value == stage
    assert referral.history == before


# ---------------------------------------------------------------- refunds and disputes


@pytest.mark.parametrize("stage", ["pending", "approved", "flagged"])
def test_reversal_before_payout_voids_the_reward(stage: str) -> None:
    referral = _at_stage(stage)
    assert referral.payment_reversed(at(25), "qualifying payment pi_1 refunded") == 0
    assert referral.status is ReferralStatus.VOIDED
    assert referral.history[-1] == referral.history[-1].__class__(
        ReferralStatus.VOIDED, at(25), "qualifying payment pi_1 refunded"
    )
    # Voided is final.
    assert referral.release(at(40)) is False
    with pytest.raises(ReferralRuleError):
        referral.into_payout(1, at(40))
    assert referral.payment_reversed(at(41), "disputed") == 0
    assert statuses(referral).count(ReferralStatus.VOIDED) == 1


@pytest.mark.parametrize("stage", ["in_payout", "paid"])
def test_reversal_after_payout_returns_the_amount_to_claw_back(stage: str) -> None:
    referral = _at_stage(stage)
    history_before = len(referral.history)
    clawback = referral.payment_reversed(at(25), "qualifying payment pi_1 disputed")
    assert clawback == 2_000
    assert referral.status.value == stage  # the reward was (being) paid: only the clawback changes
    assert len(referral.history) == history_before + 1
    note = referral.history[-1]
    assert note.status.value == stage
    assert note.at == at(25)
    assert note.reason == "qualifying payment pi_1 disputed: 2000 clawed back from the next payout"


def test_reversal_of_a_rejected_referral_changes_nothing() -> None:
    referral = _at_stage("rejected")
    before = list(referral.history)
    assert referral.payment_reversed(at(25), "refunded") == 0
    assert referral.status is ReferralStatus.REJECTED
    assert referral.history == before


def test_unpaid_reward_statuses() -> None:
    unpaid = {s for s in ReferralStatus if s.is_unpaid_reward}
    assert unpaid == {
        ReferralStatus.AWAITING_PAYMENT,
        ReferralStatus.PENDING,
        ReferralStatus.APPROVED,
        ReferralStatus.FLAGGED,
    }


def test_every_change_has_a_time_and_a_reason_after_submission() -> None:
    referral = _at_stage("paid")
    referral.payment_reversed(at(30), "refunded")
    assert [c.at for c in referral.history] == sorted(c.at for c in referral.history)
    assert all(c.reason for c in referral.history[1:])


# ---------------------------------------------------------------- rules defaults


def test_rules_defaults() -> None:
    rules = ReferralRules()
    assert rules.hold == timedelta(days=14)
    assert rules.rewards_cents == {
        ReferrerKind.CUSTOMER: 2_000,
        ReferrerKind.EMPLOYEE: 1_000,
        ReferrerKind.PARTNER: 5_000,
    }
    assert set(rules.rewards_cents) == set(ReferrerKind)
    assert rules.calendar.timezone == NEW_YORK
    assert rules.calendar.weekday == 4
    assert rules.fraud == FraudRules(velocity_limit=5, velocity_window=timedelta(hours=24))
    assert rules.currency == "USD"


def test_rules_instances_do_not_share_their_reward_table() -> None:
    a, b = ReferralRules(), ReferralRules()
    assert a.rewards_cents is not b.rewards_cents


# ---------------------------------------------------------------- the payout calendar

CAL = PayoutCalendar(NEW_YORK)


def ny(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=NEW_YORK)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_the_dates_used_are_fridays() -> None:
    assert date(2026, 10, 30).weekday() == 4
    assert date(2026, 11, 6).weekday() == 4


def test_friday_late_evening_in_new_york_is_saturday_in_utc_but_still_payout_day() -> None:
    # EST (after the DST change): UTC-5.
    moment = utc(2026, 11, 7, 4, 30)
    assert moment == ny(2026, 11, 6, 23, 30)
    assert moment.weekday() == 5  # Saturday in UTC
    assert CAL.is_payout_day(moment)
    assert CAL.next_payout_day(moment) == date(2026, 11, 6)
    assert CAL.weekly_period(moment) == "week-2026-11-06"
    assert CAL.same_day_period(moment) == "day-2026-11-06"


def test_friday_late_evening_in_summer_time() -> None:
    moment = utc(2026, 10, 31, 3, 30)  # EDT: UTC-4
    assert moment == ny(2026, 10, 30, 23, 30)
    assert CAL.is_payout_day(moment)
    assert CAL.weekly_period(moment) == "week-2026-10-30"


@pytest.mark.parametrize(
    ("utc_moment", "thursday", "friday"),
    [
        (utc(2026, 10, 30, 2, 0), date(2026, 10, 29), date(2026, 10, 30)),  # EDT
        (utc(2026, 11, 6, 3, 0), date(2026, 11, 5), date(2026, 11, 6)),  # EST
    ],
)
def test_thursday_night_in_new_york_is_friday_in_utc_but_not_yet_payout_day(
    utc_moment: datetime, thursday: date, friday: date
) -> None:
    local = utc_moment.astimezone(NEW_YORK)
    assert (local.date(), local.hour) == (thursday, 22)
    assert utc_moment.weekday() == 4  # Friday in UTC
    assert not CAL.is_payout_day(utc_moment)
    assert CAL.local_date(utc_moment) == thursday
    assert CAL.next_payout_day(utc_moment) == friday
    assert CAL.weekly_period(utc_moment) == f"week-{friday.isoformat()}"
    assert CAL.same_day_period(utc_moment) == f"day-{thursday.isoformat()}"


def test_midnight_boundary_in_new_york() -> None:
    last_thursday_minute = ny(2026, 11, 5, 23, 59)
    friday_midnight = ny(2026, 11, 6, 0, 0)
    last_friday_minute = ny(2026, 11, 6, 23, 59)
    saturday_midnight = ny(2026, 11, 7, 0, 0)
    assert not CAL.is_payout_day(last_thursday_minute)
    assert CAL.is_payout_day(friday_midnight)
    assert CAL.is_payout_day(last_friday_minute)
    assert not CAL.is_payout_day(saturday_midnight)
    assert CAL.weekly_period(saturday_midnight) == "week-2026-11-13"


def test_same_local_hour_on_fridays_either_side_of_dst_maps_to_different_utc_hours() -> None:
    before = ny(2026, 10, 30, 9, 0)
    after = ny(2026, 11, 6, 9, 0)
    assert before.astimezone(UTC) == utc(2026, 10, 30, 13, 0)
    assert after.astimezone(UTC) == utc(2026, 11, 6, 14, 0)
    for moment in (before, after, before.astimezone(UTC), after.astimezone(UTC)):
        assert CAL.is_payout_day(moment)
    assert CAL.weekly_period(before.astimezone(UTC)) == "week-2026-10-30"
    assert CAL.weekly_period(after.astimezone(UTC)) == "week-2026-11-06"
    # 13:00 UTC on the second Friday is still 08:00 there: payout day too.
    assert CAL.is_payout_day(utc(2026, 11, 6, 13, 0))
    # Early UTC hours of each Friday belong to Thursday in New York, by a different margin.
    assert not CAL.is_payout_day(utc(2026, 10, 30, 3, 59))  # 23:59 EDT Thursday
    assert CAL.is_payout_day(utc(2026, 10, 30, 4, 0))  # 00:00 EDT Friday
    assert not CAL.is_payout_day(utc(2026, 11, 6, 4, 59))  # 23:59 EST Thursday
    assert CAL.is_payout_day(utc(2026, 11, 6, 5, 0))  # 00:00 EST Friday


def test_week_across_the_dst_change_has_one_period_key() -> None:
    """Saturday 2026-10-31 to Friday 2026-11-06 (DST ends on Sunday 2026-11-01) is one payout week."""
    start = ny(2026, 10, 31, 0, 0)
    moments = [
        start.astimezone(UTC) + timedelta(hours=h) for h in range(0, 7 * 24 + 1)
    ]  # 169 hours: one extra for the 25-hour Sunday
    keys = {CAL.weekly_period(m) for m in moments}
    assert keys == {"week-2026-11-06"}
    # The first moment past that Friday, local time, starts the next week.
    assert CAL.weekly_period(ny(2026, 11, 7, 0, 0).astimezone(UTC)) == "week-2026-11-13"


@pytest.mark.parametrize(
    ("local_day", "expected_friday"),
    [
        (date(2026, 10, 24), date(2026, 10, 30)),  # Saturday
        (date(2026, 10, 25), date(2026, 10, 30)),
        (date(2026, 10, 29), date(2026, 10, 30)),
        (date(2026, 10, 30), date(2026, 10, 30)),  # Friday itself
        (date(2026, 10, 31), date(2026, 11, 6)),
        (date(2026, 11, 1), date(2026, 11, 6)),  # DST change day
        (date(2026, 11, 6), date(2026, 11, 6)),
    ],
)
def test_next_payout_day(local_day: date, expected_friday: date) -> None:
    moment = datetime(local_day.year, local_day.month, local_day.day, 12, 0, tzinfo=NEW_YORK).astimezone(UTC)
    assert CAL.next_payout_day(moment) == expected_friday
    assert CAL.is_payout_day(moment) == (local_day == expected_friday)


def test_calendar_in_another_time_zone_and_weekday() -> None:
    tokyo_monday = PayoutCalendar(ZoneInfo("Asia/Tokyo"), weekday=0)
    sunday_utc_evening = utc(2026, 11, 8, 16, 0)  # Monday 01:00 in Tokyo
    assert tokyo_monday.is_payout_day(sunday_utc_evening)
    assert tokyo_monday.same_day_period(sunday_utc_evening) == "day-2026-11-09"
    assert not CAL.is_payout_day(sunday_utc_evening)
