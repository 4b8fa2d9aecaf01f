"""Referral use cases inside an event's unit of work: sign-up, attribution, qualification, reversal."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import structlog

from domain.referrals import (
    Referral,
    ReferralFacts,
    ReferralRules,
    ReferralStatus,
    ReferrerDetails,
    ReferrerKind,
    judge_referral,
    normalize_code,
    normalize_email,
    normalize_phone,
)
from messages import CustomerSignedUp
from service_layer.unit_of_work import UnitOfWork

log = structlog.get_logger("credits.referrals")


async def customer_signed_up(uow: UnitOfWork, event: CustomerSignedUp, rules: ReferralRules) -> None:
    """Remember who the customer is, make them a referrer with a code, attribute their referral."""
    repo = uow.referrals
    email, phone = normalize_email(event.email), normalize_phone(event.phone)
    await repo.record_profile(
        event.customer_id, email, phone, event.payment_fingerprint, event.occurred_at, contact_email=event.email.strip()
    )
    if await repo.add_referrer(ReferrerDetails(event.customer_id, ReferrerKind.CUSTOMER, email=email, phone=phone)):
        # No name in the code: a customer's code is shared publicly and must not reveal them.
        await repo.add_code(event.customer_id, name_hint=None)
    if event.referral_code:
        await submit_referral(uow, event.customer_id, event.referral_code, event.occurred_at, rules)


async def submit_referral(uow: UnitOfWork, customer_id: str, code: str, at: datetime, rules: ReferralRules) -> Referral:
    """Attribute the customer to the code's referrer, or record why not (caller holds the customer's lock)."""
    repo = uow.referrals
    code = normalize_code(code)
    code_row = await repo.code(code)
    if code_row is not None:
        await repo.lock_referrer(code_row.referrer_id)
    already_referred = await repo.attributed(customer_id) is not None
    facts = await _facts(
        uow,
        customer_id,
        code_row.referrer_id if code_row else None,
        bool(code_row and code_row.active),
        at,
        already_referred,
    )
    verdict = judge_referral(facts, at, rules.fraud)
    referral = Referral.submitted(
        customer_id, code_row.referrer_id if code_row else None, code_row.code if code_row else code, at, verdict
    )
    await repo.add(referral)
    log.info(
        "referral_" + verdict.status.value,
        customer_id=customer_id,
        code=code,
        reason=verdict.reason,
        flags=list(verdict.flags),
    )
    if referral.status is ReferralStatus.AWAITING_PAYMENT:
        # The first payment may have been applied before this (events from two producers).
        first = await repo.first_payment_since(customer_id, at)
        if first is not None:
            await payment_succeeded(uow, customer_id, first.payment_id, first.issued_at, rules, first.paid_cents)
    return referral


async def _facts(
    uow: UnitOfWork, customer_id: str, referrer_id: str | None, code_active: bool, at: datetime, already_referred: bool
) -> ReferralFacts:
    """What the referral rules judge, read as of ``at``."""
    repo = uow.referrals
    referrer = await repo.referrer(referrer_id) if referrer_id else None
    referred = await repo.party(customer_id)
    return ReferralFacts(
        referrer,
        code_active,
        referred,
        already_referred=already_referred,
        paid_before=await repo.has_paid_before(customer_id, at),
        prior=await repo.prior_referrals(referrer.referrer_id, excluding=customer_id) if referrer else [],
        other_customers_with_fingerprint=await repo.referred_customers_with_fingerprint(
            referred.payment_fingerprints, customer_id
        ),
    )


async def payment_succeeded(
    uow: UnitOfWork,
    customer_id: str,
    payment_id: str,
    paid_at: datetime,
    rules: ReferralRules,
    amount_cents: int | None = None,
) -> None:
    """The referred customer's first payment qualifies their referral's reward (held for refunds).

    The rules are judged again with what is known now — a sign-up, a card fingerprint or a
    sibling referral may have arrived after the referral itself — and a free payment (a trial,
    a 100 % coupon) does not qualify: the referral waits for a paid one.
    """
    repo = uow.referrals
    referral = await repo.attributed(customer_id)
    if referral is None or referral.status is not ReferralStatus.AWAITING_PAYMENT:
        return
    if amount_cents is not None and amount_cents <= 0:
        log.info("referral_not_qualified", customer_id=customer_id, payment_id=payment_id, reason="a free payment")
        return
    await repo.lock_referrer(referral.referrer_id)
    before = len(referral.history)
    if paid_at < referral.submitted_at or await repo.has_paid_before(
        customer_id, referral.submitted_at, except_payment=payment_id
    ):
        referral.admin_reject(paid_at, "system", "the customer had already paid before being referred")
    else:
        facts = await _facts(
            uow, customer_id, referral.referrer_id, True, referral.submitted_at, already_referred=False
        )
        verdict = judge_referral(facts, referral.submitted_at, rules.fraud)
        if verdict.status is ReferralStatus.REJECTED:
            referral.admin_reject(paid_at, "system", verdict.reason or "rejected")
        else:
            referral.flags = _merged_flags(referral.flags, verdict.flags)
            kind = ReferrerKind((await repo.referrer_row(referral.referrer_id)).kind)
            referral.qualify(payment_id, paid_at, rules.rewards_cents[kind], rules.hold)
    await repo.save(referral, referral.history[before:])


def _merged_flags(earlier: tuple[str, ...], now: tuple[str, ...]) -> tuple[str, ...]:
    """Flags judged now (with everything known) replace earlier ones of the same rule; others stay."""

    def rule(flag: str) -> str:
        return flag.split(":")[0].split(" (")[0]

    current = {rule(flag) for flag in now}
    return tuple(flag for flag in earlier if rule(flag) not in current) + now


async def payment_reversed(uow: UnitOfWork, payment_id: str, reason: str, at: datetime) -> None:
    """A refund or dispute of a qualifying payment: void the unpaid reward, or claw a paid one back."""
    repo = uow.referrals
    referral = await repo.by_qualifying_payment(payment_id)
    if referral is None or referral.status in (ReferralStatus.VOIDED, ReferralStatus.REJECTED):
        return
    if await repo.has_clawback(referral.id):
        return  # already taken back (a second partial refund of the same payment)
    before = len(referral.history)
    why = f"qualifying payment {payment_id} {reason}"
    if referral.status is ReferralStatus.IN_PAYOUT and await repo.withdraw_from_unsent_payout(referral):
        # Its payout was never sent: take the reward out of it rather than pay and claw back.
        referral.withdrawn_from_payout(at, why)
    else:
        clawback = referral.payment_reversed(at, why)
        if clawback:
            await repo.add_clawback(referral, clawback, at)
    await repo.save(referral, referral.history[before:])


# ---------------------------------------------------------------- admin use cases


class ReferrerExists(Exception):
    pass


class NotFound(LookupError):
    pass


async def register_referrer(uow: UnitOfWork, details: ReferrerDetails) -> str:
    """A new employee, partner (or customer) referrer with a first code; returns the code."""
    async with uow:
        normalized = replace(details, email=normalize_email(details.email), phone=normalize_phone(details.phone))
        added = await uow.referrals.add_referrer(normalized)
        if not added:
            raise ReferrerExists(details.referrer_id)
        code = await uow.referrals.add_code(details.referrer_id, name_hint=details.name or details.referrer_id)
        await uow.commit()
    return code


async def decide_flagged(
    uow: UnitOfWork, referral_id: int, approve: bool, admin: str, reason: str | None, now: datetime
) -> Referral:
    """An admin approves (the hold still applies) or rejects a reward. Raises NotFound or ReferralRuleError."""
    async with uow:
        referral = await uow.referrals.by_id(referral_id)
        if referral is None:
            raise NotFound(referral_id)
        before = len(referral.history)
        if approve:
            referral.admin_approve(now, admin)
        else:
            referral.admin_reject(now, admin, reason or "no reason given")
        await uow.referrals.save(referral, referral.history[before:])
        await uow.commit()
    return referral
