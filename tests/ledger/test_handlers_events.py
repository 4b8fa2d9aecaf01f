"""Every event kind through the one apply path, on the in-memory unit of work (no PostgreSQL)."""

from __future__ import annotations

import pytest

from domain import InsufficientCredits, JobAlreadyCharged, UnknownCustomer
from domain import MembershipIsFrozen as Frozen
from domain.dunning import DunningStatus
from messages import (
    CreditsGifted,
    CustomerSignedUp,
    InvoiceVoided,
    JobCancelled,
    MembershipFrozen,
    MembershipUnfrozen,
    PaymentActionRequired,
    PaymentFailed,
    PaymentMethodUpdated,
    PaymentReversed,
    ReferralSubmitted,
)
from service_layer import events
from service_layer.apply import Outcome
from service_layer.errors import EventConflict
from service_layer.holds import place_hold
from tests.support.fake_ledger import FakeStore, FakeUnitOfWork
from tests.support.handlers import POLICY, T0, adjusted, apply, at, balance, job, kinds, notice_kinds, paid


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


def test_every_event_kind_has_a_handler_and_says_whether_it_may_share_a_transaction():
    from messages.events import Event

    kinds_ = {kind for kind in Event.__subclasses__()}
    assert kinds_ <= set(events.HANDLERS), kinds_ - set(events.HANDLERS)
    alone = {kind.__name__ for kind, handler in events.HANDLERS.items() if handler.alone}
    assert {
        "JobCompleted",
        "JobCancelled",
        "CreditsAdjusted",
        "MembershipFrozen",
        "MembershipUnfrozen",
        "CreditsGifted",
    }.isdisjoint(alone)
    assert all(handler.alone for kind, handler in events.HANDLERS.items() if kind.__name__ in alone)


async def test_a_payment_issues_credits_once_and_a_second_event_for_it_is_ignored(store):
    assert await apply(store, paid("p1", "c", 5, payment_id="in-1"), paid("p2", "c", 5, at(1), payment_id="in-1")) == [
        Outcome.APPLIED,
        Outcome.IGNORED,
    ]
    assert balance(store, "c") == 5
    assert kinds(store, "c") == ["issued"]
    assert set(store.processed) == {"p1", "p2"}


async def test_a_job_is_charged_once_captures_its_hold_and_running_out_is_noticed(store):
    await apply(store, paid("p1", "c", 3))
    await place_hold(FakeUnitOfWork(store), POLICY, "c", "j1", 2, at(1))
    assert await apply(store, job("j1-done", "c", "j1", 3, at(2))) == [Outcome.APPLIED]
    assert kinds(store, "c") == ["issued", "held", "captured"]
    assert balance(store, "c") == 0
    assert notice_kinds(store, "c") == ["credits_depleted"]
    with pytest.raises(JobAlreadyCharged):
        await apply(store, job("j1-again", "c", "j1", 1, at(3)))
    assert "j1-again" not in store.processed  # refused: nothing recorded


async def test_a_duplicate_changes_nothing_and_a_reused_id_with_another_payload_is_a_conflict(store):
    event = job("j", "c", "job-1", 2)
    assert await apply(store, event, event) == [Outcome.APPLIED, Outcome.DUPLICATE]
    commits, entries = store.commits, list(store.entries)
    with pytest.raises(EventConflict):
        await apply(store, job("j", "c", "job-1", 3))
    assert (store.commits, store.entries) == (commits, entries)
    assert balance(store, "c") == -2


async def test_a_cancelled_job_releases_its_hold_and_a_cancel_without_one_is_still_recorded(store):
    await apply(store, paid("p", "c", 4))
    await place_hold(FakeUnitOfWork(store), POLICY, "c", "j1", 3, at(1))
    cancel = JobCancelled(event_id="x1", occurred_at=at(2), customer_id="c", job_id="j1")
    never = JobCancelled(event_id="x2", occurred_at=at(2), customer_id="c", job_id="never")
    assert await apply(store, cancel, never) == [Outcome.APPLIED, Outcome.APPLIED]
    assert kinds(store, "c") == ["issued", "held", "released"]
    assert [hold.status.value for hold in store.accounts["c"].holds] == ["released"]


async def test_adjustments_restore_and_deplete_with_one_notice_each(store):
    assert (
        await apply(store, paid("p", "c", 2), adjusted("a1", "c", -3, at(1)), adjusted("a2", "c", 5, at(2)))
        == [Outcome.APPLIED] * 3
    )
    assert notice_kinds(store, "c") == ["credits_depleted", "credits_restored"]
    assert kinds(store, "c") == ["issued", "adjusted", "adjusted"]
    assert balance(store, "c") == 4


async def test_running_out_and_getting_credits_back_within_one_event_owes_no_notice(store):
    # The payment's catch-up expires the last credits (depleted at their expiry), then the
    # payment issues new ones (restored): the customer's state did not change, nor is told.
    await apply(store, paid("p", "c", 2))
    await apply(store, paid("p2", "c", 3, at(days=40)))
    assert kinds(store, "c") == ["issued", "expired", "issued"]
    assert notice_kinds(store, "c") == []
    assert store.accounts["c"].depleted_at is None
    # Spent, then a payment: restored once, told at the payment's moment.
    await apply(store, job("j", "c", "job", 3, at(days=41)), paid("p3", "c", 1, at(days=42)))
    assert notice_kinds(store, "c") == ["credits_depleted", "credits_restored"]
    assert [at_ for _, at_ in store.notifications.values()] == [at(days=41), at(days=42)]


async def test_a_payment_failure_opens_dunning_once_and_a_late_one_never_reopens_a_paid_invoice(store):
    failed = PaymentFailed(
        event_id="f1", occurred_at=T0, customer_id="c", invoice_id="in-9", decline_code="card_declined"
    )
    again = PaymentActionRequired(event_id="f2", occurred_at=at(1), customer_id="c", invoice_id="in-9")
    assert await apply(store, failed, again) == [Outcome.APPLIED, Outcome.APPLIED]
    assert store.cases["in-9"].status is DunningStatus.ACTION_REQUIRED
    assert notice_kinds(store, "c") == ["payment_failed"]
    assert await apply(store, paid("p", "c", 5, at(2), payment_id="in-9")) == [Outcome.APPLIED]
    assert not store.cases["in-9"].owes  # paid: the case ends
    late = PaymentFailed(event_id="f3", occurred_at=at(3), customer_id="c", invoice_id="in-9")
    assert await apply(store, late) == [Outcome.IGNORED]


async def test_a_voided_invoice_closes_its_case_and_a_new_method_charges_what_is_owed(store):
    method = PaymentMethodUpdated(event_id="m0", occurred_at=T0, customer_id="c", payment_method_id="pm_1")
    assert await apply(store, method) == [Outcome.IGNORED]  # nothing owed
    await apply(store, PaymentFailed(event_id="f1", occurred_at=T0, customer_id="c", invoice_id="in-1"))
    await apply(store, PaymentFailed(event_id="f2", occurred_at=T0, customer_id="c", invoice_id="in-2"))
    uow = FakeUnitOfWork(store)
    assert await events.apply_event(method.model_copy(update={"event_id": "m1"}), uow, POLICY) is Outcome.APPLIED
    assert len(uow.dunning.new_attempt_ids) == 2  # one charge per unpaid invoice
    assert await apply(store, InvoiceVoided(event_id="v", occurred_at=at(1), customer_id="c", invoice_id="in-1")) == [
        Outcome.APPLIED
    ]
    assert [case.owes for case in (store.cases["in-1"], store.cases["in-2"])] == [False, True]
    assert await apply(
        store, InvoiceVoided(event_id="v2", occurred_at=at(1), customer_id="c", invoice_id="in-none")
    ) == [Outcome.IGNORED]


async def test_a_reversal_takes_back_up_to_what_the_payment_issued_once(store):
    await apply(store, paid("p", "c", 5, payment_id="in-1"), job("j", "c", "job", 4, at(1)))
    refund = PaymentReversed(
        event_id="r1", occurred_at=at(2), customer_id="c", payment_id="in-1", reason="refund", total_credits_reversed=3
    )
    again = PaymentReversed(
        event_id="r2", occurred_at=at(3), customer_id="c", payment_id="in-1", reason="refund", total_credits_reversed=3
    )
    assert await apply(store, refund, again) == [Outcome.APPLIED, Outcome.IGNORED]
    assert balance(store, "c") == -2
    assert notice_kinds(store, "c") == ["credits_depleted"]


async def test_a_frozen_membership_keeps_its_credits_and_unfreezing_moves_their_expiry(store):
    await apply(store, paid("p", "c", 5))
    expiry = store.accounts["c"].lots[0].expires_at
    frozen = MembershipFrozen(event_id="fz", occurred_at=at(days=1), customer_id="c")
    assert await apply(store, frozen, frozen.model_copy(update={"event_id": "fz2"})) == [
        Outcome.APPLIED,
        Outcome.IGNORED,
    ]
    with pytest.raises(Frozen):
        await place_hold(FakeUnitOfWork(store), POLICY, "c", "j", 1, at(days=2))
    assert await apply(store, MembershipUnfrozen(event_id="uf", occurred_at=at(days=11), customer_id="c")) == [
        Outcome.APPLIED
    ]
    assert store.accounts["c"].lots[0].expires_at == expiry + (at(days=11) - at(days=1))


async def test_a_gift_moves_credits_to_a_known_customer_only(store):
    await apply(store, paid("p", "giver", 5), paid("q", "taker", 1))
    gift = CreditsGifted(event_id="g", occurred_at=at(1), customer_id="giver", to_customer_id="taker", credits=2)
    assert await apply(store, gift) == [Outcome.APPLIED]
    assert (balance(store, "giver"), balance(store, "taker")) == (3, 3)
    with pytest.raises(UnknownCustomer):
        await apply(store, gift.model_copy(update={"event_id": "g2", "to_customer_id": "typo"}))
    assert "typo" not in store.accounts
    with pytest.raises(InsufficientCredits):
        await apply(store, gift.model_copy(update={"event_id": "g3", "credits": 4}))


async def test_a_sign_up_and_a_referral_with_an_unknown_code_are_recorded(store):
    signed = CustomerSignedUp(
        event_id="s", occurred_at=T0, customer_id="c", email="c@example.com", referral_code="NOPE1234"
    )
    assert await apply(store, signed) == [Outcome.APPLIED]
    assert "c" in store.referrers and store.profiles["c"].email == "c@example.com"
    assert [(r.referred_customer_id, r.status.value) for r in store.referrals] == [("c", "rejected")]
    submitted = ReferralSubmitted(event_id="r", occurred_at=at(1), referral_code="NOPE5678", referred_customer_id="c")
    assert await apply(store, submitted) == [Outcome.APPLIED]
    assert len(store.referrals) == 2


# --------------------------------------------------------------------------- batches


async def test_a_batch_gives_what_one_at_a_time_gives(store):
    batch = [
        paid("p", "a", 3),
        adjusted("x", "b", 2),
        job("j1", "a", "job-1", 2, at(1)),
        CreditsGifted(event_id="g", occurred_at=at(2), customer_id="a", to_customer_id="b", credits=1),
        job("j2", "b", "job-2", 3, at(3)),
        MembershipFrozen(event_id="f", occurred_at=at(4), customer_id="a"),
    ]
    alone, together = FakeStore(), FakeStore()
    expected = await apply(alone, *batch)
    await apply(together, batch[0])
    assert await events.apply_events(batch[1:], FakeUnitOfWork(together), POLICY) == expected[1:]
    assert together.commits == 2
    for customer in ("a", "b"):
        assert [(e.kind, e.credits, e.balance_after, e.occurred_at) for e in together.entries_of(customer)] == [
            (e.kind, e.credits, e.balance_after, e.occurred_at) for e in alone.entries_of(customer)
        ]
    assert together.notices() == alone.notices()
    assert notice_kinds(together, "b") == ["credits_depleted"]


async def test_a_batch_with_an_event_seen_before_or_twice_writes_nothing(store):
    await apply(store, paid("p", "a", 3))
    before = (list(store.entries), dict(store.processed))
    # An id applied before (here with another payload), and the same event twice.
    for batch in ([job("j1", "a", "job-1"), adjusted("p", "a", 1)], [job("j1", "a", "job-1"), job("j1", "a", "job-1")]):
        with pytest.raises(events.BatchNotApplicable):
            await events.apply_events(batch, FakeUnitOfWork(store), POLICY)
    with pytest.raises(events.BatchNotApplicable):
        await events.apply_events(
            [job("j1", "a", "job-1"), adjusted("x", "a", 1), job("j1", "a", "job-1")], FakeUnitOfWork(store), POLICY
        )
    assert (store.entries, store.processed) == before


async def test_kinds_that_must_stay_alone_are_refused_in_a_batch(store):
    with pytest.raises(ValueError, match="share a transaction"):
        await events.apply_events([job("j1", "a", "job-1"), paid("p", "a", 3)], FakeUnitOfWork(store), POLICY)
    assert store.commits == 0


async def test_a_gift_before_the_event_that_would_create_its_receiver_is_refused_as_alone(store):
    await apply(store, paid("p", "a", 3))
    gift = CreditsGifted(event_id="g", occurred_at=at(1), customer_id="a", to_customer_id="new", credits=1)
    with pytest.raises(UnknownCustomer):
        await events.apply_events([gift, adjusted("x", "new", 1)], FakeUnitOfWork(store), POLICY)
    assert "new" not in store.accounts
    assert (
        await events.apply_events([adjusted("x", "new", 1), gift], FakeUnitOfWork(store), POLICY)
        == [Outcome.APPLIED] * 2
    )
    assert balance(store, "new") == 2
