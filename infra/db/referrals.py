"""Repositories for referrals: profiles, referrers and codes, referrals with their history, payouts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.referrals import Change, Party, PriorReferral, Referral, ReferralStatus, Referrer, ReferrerDetails, ReferrerKind, code_lookup_key, new_code
from infra.db.repository import upsert_into
from infra.db.tables import (
    PAYOUT_IS_TO_SEND,
    REFERRAL_IS_ATTRIBUTED,
    credit_lots,
    customer_profiles,
    payout_items,
    payouts,
    referral_clawbacks,
    referral_codes,
    referral_history,
    referrals,
    referrers,
)

_REFERRAL_FIELDS = (
    "referred_customer_id",
    "referrer_id",
    "code",
    "submitted_at",
    "status",
    "reason",
    "flags",
    "reward_cents",
    "qualifying_payment_id",
    "approve_after",
    "payout_id",
)


@dataclass(frozen=True)
class Payable:
    """A payee's payable amount: approved rewards and open clawbacks, by id."""

    payee_id: str
    referral_ids: list[int]
    clawback_ids: list[int]
    total_cents: int


class SqlReferralRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    # ------------------------------------------------------------ profiles

    async def record_profile(
        self, customer_id: str, email: str | None, phone: str | None, fingerprint: str | None, at: datetime, contact_email: str | None = None
    ) -> None:
        """The first sign-up stands; a card fingerprint learnt later fills in."""
        statement = upsert_into(self.connection, customer_profiles).values(
            customer_id=customer_id, email=email, contact_email=contact_email, phone=phone, payment_fingerprint=fingerprint, signed_up_at=at
        )
        if fingerprint:
            statement = statement.on_conflict_do_update(
                index_elements=[customer_profiles.c.customer_id],
                set_={"payment_fingerprint": func.coalesce(customer_profiles.c.payment_fingerprint, fingerprint)},
            )
        else:
            statement = statement.on_conflict_do_nothing()
        await self.connection.execute(statement)

    async def party(self, customer_id: str | None) -> Party:
        if customer_id is None:
            return Party(None)
        row = (await self.connection.execute(select(customer_profiles).where(customer_profiles.c.customer_id == customer_id))).first()
        if row is None:
            return Party(customer_id)
        return Party(customer_id, row.email, row.phone, frozenset([row.payment_fingerprint]) if row.payment_fingerprint else frozenset())

    # ------------------------------------------------------------ referrers and codes

    async def add_referrer(self, details: ReferrerDetails) -> bool:
        """Register a referrer; False if the id is taken."""
        statement = (
            upsert_into(self.connection, referrers)
            .values(**{**asdict(details), "kind": details.kind.value})
            .on_conflict_do_nothing()
            .returning(referrers.c.referrer_id)
        )
        return (await self.connection.execute(statement)).first() is not None

    async def update_referrer(self, referrer_id: str, **values: object) -> bool:
        values = {name: value for name, value in values.items() if value is not None}
        if not values:
            return await self.referrer_row(referrer_id) is not None
        result = await self.connection.execute(update(referrers).where(referrers.c.referrer_id == referrer_id).values(**values))
        return result.rowcount == 1

    async def referrer_row(self, referrer_id: str):
        return (await self.connection.execute(select(referrers).where(referrers.c.referrer_id == referrer_id))).first()

    async def referrer(self, referrer_id: str) -> Referrer | None:
        row = await self.referrer_row(referrer_id)
        if row is None:
            return None
        party = await self.party(referrer_id) if row.kind == ReferrerKind.CUSTOMER.value else Party(None)
        party = Party(
            party.customer_id,
            party.email or row.email,
            party.phone or row.phone,
            party.payment_fingerprints,
        )
        return Referrer(row.referrer_id, ReferrerKind(row.kind), party, row.payout_method, row.same_day)

    async def add_code(self, referrer_id: str, name_hint: str | None, code: str | None = None) -> str:
        """A new unique code for the referrer (a random one unless ``code`` is given)."""
        for _ in range(20):
            candidate = code or new_code(name_hint)
            try:
                async with self.connection.begin_nested():
                    await self.connection.execute(insert(referral_codes).values(code=candidate, lookup=code_lookup_key(candidate), referrer_id=referrer_id))
                return candidate
            except IntegrityError:
                if code is not None:
                    raise
        raise RuntimeError("could not find a free referral code in 20 tries")

    async def code(self, code: str):
        """The code as typed (case, spaces and hyphens do not matter)."""
        return (await self.connection.execute(select(referral_codes).where(referral_codes.c.lookup == code_lookup_key(code)))).first()

    async def set_code_active(self, code: str, active: bool, at: datetime) -> bool:
        result = await self.connection.execute(
            update(referral_codes).where(referral_codes.c.lookup == code_lookup_key(code)).values(active=active, deactivated_at=None if active else at)
        )
        return result.rowcount == 1

    # ------------------------------------------------------------ referrals

    async def attributed(self, customer_id: str, *, for_update: bool = True) -> Referral | None:
        query = select(referrals).where(referrals.c.referred_customer_id == customer_id, REFERRAL_IS_ATTRIBUTED)
        row = (await self.connection.execute(query.with_for_update() if for_update else query)).first()
        return _referral(row) if row else None

    async def by_id(self, referral_id: int, *, for_update: bool = True) -> Referral | None:
        query = select(referrals).where(referrals.c.id == referral_id)
        row = (await self.connection.execute(query.with_for_update() if for_update else query)).first()
        return _referral(row) if row else None

    async def by_qualifying_payment(self, payment_id: str) -> Referral | None:
        query = select(referrals).where(referrals.c.qualifying_payment_id == payment_id, REFERRAL_IS_ATTRIBUTED).with_for_update()
        row = (await self.connection.execute(query)).first()
        return _referral(row) if row else None

    async def add(self, referral: Referral) -> None:
        values = _values(referral)
        values["attributed"] = referral.status is not ReferralStatus.REJECTED
        referral.id = (await self.connection.execute(insert(referrals).values(**values).returning(referrals.c.id))).scalar_one()
        await self._insert_history([(referral, referral.history)])

    async def save(self, referral: Referral, new_changes: Iterable[Change]) -> None:
        await self.save_many([(referral, list(new_changes))])

    async def save_many(self, changed: Sequence[tuple[Referral, Sequence[Change]]]) -> None:
        """Write referrals and their new history: two statements however many (payout runs save thousands)."""
        if not changed:
            return
        await self.connection.execute(
            update(referrals)
            .where(referrals.c.id == bindparam("referral_id"))
            .values(**{name: bindparam(f"new_{name}") for name in _REFERRAL_FIELDS}, updated_at=func.now()),
            [{"referral_id": referral.id, **{f"new_{name}": value for name, value in _values(referral).items()}} for referral, _ in changed],
        )
        await self._insert_history(changed)

    async def _insert_history(self, changed: Sequence[tuple[Referral, Sequence[Change]]]) -> None:
        history = [
            {"referral_id": referral.id, "status": c.status.value, "at": c.at, "reason": c.reason} for referral, changes in changed for c in changes
        ]
        if history:
            await self.connection.execute(insert(referral_history), history)

    async def history(self, referral_ids: list[int]) -> dict[int, list]:
        rows = await self.connection.execute(
            select(referral_history).where(referral_history.c.referral_id.in_(referral_ids)).order_by(referral_history.c.id)
        ) if referral_ids else []
        out: dict[int, list] = {}
        for row in rows:
            out.setdefault(row.referral_id, []).append(row)
        return out

    async def lock_referrer(self, referrer_id: str) -> None:
        """Serialise referrals of one referrer: the velocity and look-alike rules read their siblings."""
        await self.connection.execute(select(referrers.c.referrer_id).where(referrers.c.referrer_id == referrer_id).with_for_update())

    async def prior_referrals(self, referrer_id: str, excluding: str | None = None) -> list[PriorReferral]:
        query = (
            select(referrals.c.referred_customer_id, referrals.c.submitted_at, customer_profiles.c.email, customer_profiles.c.payment_fingerprint)
            .select_from(referrals.outerjoin(customer_profiles, customer_profiles.c.customer_id == referrals.c.referred_customer_id))
            .where(referrals.c.referrer_id == referrer_id, REFERRAL_IS_ATTRIBUTED)
        )
        if excluding is not None:
            query = query.where(referrals.c.referred_customer_id != excluding)
        rows = await self.connection.execute(query)
        return [
            PriorReferral(r.referred_customer_id, r.submitted_at, r.email, frozenset([r.payment_fingerprint]) if r.payment_fingerprint else frozenset())
            for r in rows
        ]

    async def referred_customers_with_fingerprint(self, fingerprints: frozenset[str], excluding: str) -> int:
        if not fingerprints:
            return 0
        query = (
            select(func.count())
            .select_from(referrals.join(customer_profiles, customer_profiles.c.customer_id == referrals.c.referred_customer_id))
            .where(REFERRAL_IS_ATTRIBUTED, customer_profiles.c.payment_fingerprint.in_(fingerprints), referrals.c.referred_customer_id != excluding)
        )
        return (await self.connection.execute(query)).scalar_one()

    async def has_paid_before(self, customer_id: str, before: datetime, except_payment: str | None = None) -> bool:
        """Whether the customer had a successful payment before ``before``."""
        query = select(credit_lots.c.id).where(
            credit_lots.c.customer_id == customer_id, credit_lots.c.payment_id.is_not(None), credit_lots.c.issued_at < before
        )
        if except_payment is not None:
            query = query.where(credit_lots.c.payment_id != except_payment)
        return (await self.connection.execute(query.limit(1))).first() is not None

    async def first_payment_since(self, customer_id: str, since: datetime):
        """The customer's earliest paid payment lot issued at or after ``since`` (payment_id, issued_at, paid_cents)."""
        query = (
            select(credit_lots.c.payment_id, credit_lots.c.issued_at, credit_lots.c.paid_cents)
            .where(
                credit_lots.c.customer_id == customer_id,
                credit_lots.c.payment_id.is_not(None),
                credit_lots.c.issued_at >= since,
                # A free payment (a trial, a 100 % coupon) qualifies no referral.
                or_(credit_lots.c.paid_cents.is_(None), credit_lots.c.paid_cents > 0),
            )
            .order_by(credit_lots.c.issued_at, credit_lots.c.id)
            .limit(1)
        )
        return (await self.connection.execute(query)).first()

    async def lock_due_for_release(self, now: datetime, limit: int) -> list[Referral]:
        query = (
            select(referrals)
            .where(referrals.c.status == ReferralStatus.PENDING.value, referrals.c.approve_after <= now)
            .order_by(referrals.c.approve_after)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [_referral(row) for row in await self.connection.execute(query)]

    async def has_clawback(self, referral_id: int) -> bool:
        query = select(referral_clawbacks.c.id).where(referral_clawbacks.c.referral_id == referral_id)
        return (await self.connection.execute(query)).first() is not None

    async def add_clawback(self, referral: Referral, amount_cents: int, at: datetime) -> None:
        await self.connection.execute(
            upsert_into(self.connection, referral_clawbacks)
            .values(referral_id=referral.id, payee_id=referral.referrer_id, amount_cents=amount_cents, created_at=at)
            .on_conflict_do_nothing()
        )

    # ------------------------------------------------------------ payouts

    async def payable(self, payee_ids: list[str] | None = None) -> list[Payable]:
        """Every payee's approved rewards and open clawbacks, locked (others skip them)."""
        approved = select(referrals.c.id, referrals.c.referrer_id, referrals.c.reward_cents).where(referrals.c.status == ReferralStatus.APPROVED.value)
        clawbacks = select(referral_clawbacks.c.id, referral_clawbacks.c.payee_id, referral_clawbacks.c.amount_cents).where(
            referral_clawbacks.c.payout_id.is_(None)
        )
        if payee_ids is not None:
            approved = approved.where(referrals.c.referrer_id.in_(payee_ids))
            clawbacks = clawbacks.where(referral_clawbacks.c.payee_id.in_(payee_ids))
        by_payee: dict[str, tuple[list[int], list[int], int]] = {}
        for r in await self.connection.execute(approved.with_for_update(skip_locked=True)):
            ids, claws, total = by_payee.get(r.referrer_id, ([], [], 0))
            by_payee[r.referrer_id] = (ids + [r.id], claws, total + (r.reward_cents or 0))
        for r in await self.connection.execute(clawbacks.with_for_update(skip_locked=True)):
            ids, claws, total = by_payee.get(r.payee_id, ([], [], 0))
            by_payee[r.payee_id] = (ids, claws + [r.id], total - r.amount_cents)
        return [Payable(payee, ids, claws, total) for payee, (ids, claws, total) in sorted(by_payee.items())]

    async def create_payout(self, payable: Payable, period: str, method: str, gateway: str, currency: str, now: datetime) -> int | None:
        """Snapshot a payee's payable items into one payout for the period; None if the period already has one."""
        statement = (
            upsert_into(self.connection, payouts)
            .values(
                payee_id=payable.payee_id,
                period=period,
                method=method,
                gateway=gateway,
                amount_cents=payable.total_cents,
                currency=currency,
                status="pending",
                idempotency_key=payout_key(payable.payee_id, period),
                created_at=now,
            )
            .on_conflict_do_nothing()
            .returning(payouts.c.id)
        )
        payout_id = (await self.connection.execute(statement)).scalar_one_or_none()
        if payout_id is None:
            return None
        rows = await self.connection.execute(select(referrals.c.id, referrals.c.reward_cents).where(referrals.c.id.in_(payable.referral_ids)))
        items = [{"payout_id": payout_id, "referral_id": r.id, "clawback_id": None, "amount_cents": r.reward_cents} for r in rows]
        claws = await self.connection.execute(select(referral_clawbacks.c.id, referral_clawbacks.c.amount_cents).where(referral_clawbacks.c.id.in_(payable.clawback_ids)))
        items += [{"payout_id": payout_id, "referral_id": None, "clawback_id": r.id, "amount_cents": -r.amount_cents} for r in claws]
        if items:
            await self.connection.execute(insert(payout_items), items)
        if payable.clawback_ids:
            await self.connection.execute(update(referral_clawbacks).where(referral_clawbacks.c.id.in_(payable.clawback_ids)).values(payout_id=payout_id))
        return payout_id

    async def last_period_number(self, payee_id: str, period_prefix: str) -> int:
        """The highest n of the payee's ``<prefix>-<n>`` periods (0 if none): numbers are never reused."""
        query = select(payouts.c.period).where(payouts.c.payee_id == payee_id, payouts.c.period.like(f"{period_prefix}-%"))
        numbers = [int(p.rsplit("-", 1)[1]) for p in (await self.connection.execute(query)).scalars() if p.rsplit("-", 1)[1].isdigit()]
        return max(numbers, default=0)

    async def lock_payouts_to_send(
        self, limit: int, payout_ids: list[int] | None = None, *, now: datetime, run_started: datetime, after: tuple[datetime, int] | None = None
    ) -> list:
        """Payouts not paid yet (new or failed), not leased by another run, each once per run; locked.

        ``after``: the (created_at, id) of the run's last payout, so a run walks the queue once
        instead of stepping again over every payout it already tried."""
        query = select(payouts).where(
            PAYOUT_IS_TO_SEND,
            or_(payouts.c.leased_until.is_(None), payouts.c.leased_until <= now),
            or_(payouts.c.last_tried_at.is_(None), payouts.c.last_tried_at < run_started),
        )
        if payout_ids is not None:
            query = query.where(payouts.c.id.in_(payout_ids))
        if after is not None:
            query = query.where(tuple_(payouts.c.created_at, payouts.c.id) > after)
        return list(await self.connection.execute(query.order_by(payouts.c.created_at, payouts.c.id).limit(limit).with_for_update(skip_locked=True)))

    async def payout(self, payout_id: int, *, for_update: bool = True):
        query = select(payouts).where(payouts.c.id == payout_id)
        return (await self.connection.execute(query.with_for_update() if for_update else query)).first()

    async def set_payout(self, payout_id: int, **values: object) -> None:
        """Change a payout not yet paid (a paid payout never changes again)."""
        await self.connection.execute(update(payouts).where(payouts.c.id == payout_id, payouts.c.status != "paid").values(**values))

    async def withdraw_from_unsent_payout(self, referral: Referral) -> bool:
        """Take a reward out of its payout if that payout was never sent; the payout shrinks, or
        goes when nothing is left. False when it was sent (or exported): then it is clawed back."""
        row = await self.payout(referral.payout_id) if referral.payout_id is not None else None
        if row is None or row.status not in ("pending", "failed") or row.attempts > 0:
            return False
        await self.connection.execute(delete(payout_items).where(payout_items.c.payout_id == row.id, payout_items.c.referral_id == referral.id))
        remaining = (await self.connection.execute(select(func.coalesce(func.sum(payout_items.c.amount_cents), 0)).where(payout_items.c.payout_id == row.id))).scalar_one()
        if remaining > 0:
            await self.connection.execute(update(payouts).where(payouts.c.id == row.id).values(amount_cents=remaining))
        else:
            # Nothing (or only clawbacks) left: the payout goes; its clawbacks wait for the next one.
            await self.connection.execute(update(referral_clawbacks).where(referral_clawbacks.c.payout_id == row.id).values(payout_id=None))
            await self.connection.execute(delete(payout_items).where(payout_items.c.payout_id == row.id))
            await self.connection.execute(delete(payouts).where(payouts.c.id == row.id))
        return True

    async def referrals_in_payout(self, payout_id: int) -> list[Referral]:
        rows = await self.connection.execute(
            select(referrals).join(payout_items, and_(payout_items.c.referral_id == referrals.c.id, payout_items.c.payout_id == payout_id)).with_for_update()
        )
        return [_referral(row) for row in rows]


def payout_key(payee_id: str, period: str) -> str:
    """The payout's idempotency key: short whatever the payee id (providers cap keys at 255)."""
    return f"payout-{period}-{hashlib.sha256(payee_id.encode()).hexdigest()[:32]}"


def _values(referral: Referral) -> dict:
    values = {name: getattr(referral, name) for name in _REFERRAL_FIELDS}
    values["status"] = referral.status.value
    values["flags"] = list(referral.flags)
    return values


def _referral(row) -> Referral:
    values = {name: getattr(row, name) for name in _REFERRAL_FIELDS}
    values["status"] = ReferralStatus(values["status"])
    values["flags"] = tuple(values["flags"] or ())
    return Referral(**values, id=row.id)
