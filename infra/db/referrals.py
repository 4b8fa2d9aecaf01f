"""Repositories for referrals: profiles, referrers and codes, referrals with their history, payouts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from weakref import WeakKeyDictionary

from sqlalchemy import (
    BigInteger,
    Boolean,
    Integer,
    Row,
    String,
    Table,
    Text,
    and_,
    bindparam,
    column,
    delete,
    func,
    insert,
    or_,
    select,
    tuple_,
    union,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, TIMESTAMP
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.referrals import (
    Change,
    Party,
    PriorReferral,
    Referral,
    ReferralStatus,
    Referrer,
    ReferrerDetails,
    ReferrerKind,
    code_lookup_key,
    new_code,
)
from infra.db.repository import upsert_into
from infra.db.tables import (
    PAYOUT_IS_TO_SEND,
    REFERRAL_IS_ATTRIBUTED,
    UtcDateTime,
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


@dataclass
class Payable:
    """A payee's payable amount: approved rewards (locked) and open clawbacks (id, amount)."""

    payee_id: str
    rewards: list[Referral] = field(default_factory=list)
    clawbacks: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_cents(self) -> int:
        return sum(r.reward_cents or 0 for r in self.rewards) - sum(amount for _, amount in self.clawbacks)


@dataclass(frozen=True)
class NewPayout:
    """A payout to make: the payee's payable items for ``period``, sent through ``gateway``."""

    payable: Payable
    period: str
    method: str
    gateway: str


@dataclass(frozen=True)
class SendOutcome:
    """What the gateway said of one leased payout: paid (``reference``), exported, or failed (``error``)."""

    payout_id: int
    status: str
    reference: str | None = None
    error: str | None = None


class SqlReferralRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        #: Each referral's fields as loaded: ``save_many`` writes only what changed since.
        self._loaded: WeakKeyDictionary[Referral, dict] = WeakKeyDictionary()

    def _load(self, row) -> Referral:
        referral = _referral(row)
        self._loaded[referral] = _values(referral)
        return referral

    # ------------------------------------------------------------ profiles

    async def record_profile(
        self,
        customer_id: str,
        email: str | None,
        phone: str | None,
        fingerprint: str | None,
        at: datetime,
        contact_email: str | None = None,
    ) -> None:
        """The first sign-up stands; a card fingerprint learnt later fills in."""
        statement = upsert_into(self.connection, customer_profiles).values(
            customer_id=customer_id,
            email=email,
            contact_email=contact_email,
            phone=phone,
            payment_fingerprint=fingerprint,
            signed_up_at=at,
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
        row = (
            await self.connection.execute(
                select(customer_profiles).where(customer_profiles.c.customer_id == customer_id)
            )
        ).first()
        if row is None:
            return Party(customer_id)
        return Party(
            customer_id,
            row.email,
            row.phone,
            frozenset([row.payment_fingerprint]) if row.payment_fingerprint else frozenset(),
        )

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
        result = await self.connection.execute(
            update(referrers).where(referrers.c.referrer_id == referrer_id).values(**values)
        )
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
                    await self.connection.execute(
                        insert(referral_codes).values(
                            code=candidate, lookup=code_lookup_key(candidate), referrer_id=referrer_id
                        )
                    )
                return candidate
            except IntegrityError:
                if code is not None:
                    raise
        raise RuntimeError("could not find a free referral code in 20 tries")

    async def code(self, code: str):
        """The code as typed (case, spaces and hyphens do not matter)."""
        return (
            await self.connection.execute(
                select(referral_codes).where(referral_codes.c.lookup == code_lookup_key(code))
            )
        ).first()

    async def set_code_active(self, code: str, active: bool, at: datetime) -> bool:
        result = await self.connection.execute(
            update(referral_codes)
            .where(referral_codes.c.lookup == code_lookup_key(code))
            .values(active=active, deactivated_at=None if active else at)
        )
        return result.rowcount == 1

    # ------------------------------------------------------------ referrals

    async def attributed(self, customer_id: str, *, for_update: bool = True) -> Referral | None:
        query = select(referrals).where(referrals.c.referred_customer_id == customer_id, REFERRAL_IS_ATTRIBUTED)
        row = (await self.connection.execute(query.with_for_update() if for_update else query)).first()
        return self._load(row) if row else None

    async def by_id(self, referral_id: int, *, for_update: bool = True) -> Referral | None:
        query = select(referrals).where(referrals.c.id == referral_id)
        row = (await self.connection.execute(query.with_for_update() if for_update else query)).first()
        return self._load(row) if row else None

    async def by_qualifying_payment(self, payment_id: str) -> Referral | None:
        query = (
            select(referrals)
            .where(referrals.c.qualifying_payment_id == payment_id, REFERRAL_IS_ATTRIBUTED)
            .with_for_update()
        )
        row = (await self.connection.execute(query)).first()
        return self._load(row) if row else None

    async def add(self, referral: Referral) -> None:
        values = _values(referral)
        values["attributed"] = referral.status is not ReferralStatus.REJECTED
        referral.id = (
            await self.connection.execute(insert(referrals).values(**values).returning(referrals.c.id))
        ).scalar_one()
        await self._insert_history([(referral, referral.history)])

    async def save(self, referral: Referral, new_changes: Iterable[Change]) -> None:
        await self.save_many([(referral, list(new_changes))])

    async def save_many(self, changed: Sequence[tuple[Referral, Sequence[Change]]]) -> None:
        """Write referrals and their new history in a few statements however many (payout runs
        save thousands): the referrals grouped by which fields changed since they were loaded."""
        if not changed:
            return
        groups: dict[tuple[str, ...], list[dict]] = {}
        for referral, _ in changed:
            values = _values(referral)
            loaded = self._loaded.get(referral)
            names = tuple(name for name in _REFERRAL_FIELDS if loaded is None or loaded[name] != values[name])
            if names:
                groups.setdefault(names, []).append({"id": referral.id, **{name: values[name] for name in names}})
            self._loaded[referral] = values
        for names, rows in groups.items():
            await _update_rows(self.connection, referrals, rows, names, updated_at=func.now())
        await self._insert_history(changed)

    async def _insert_history(self, changed: Sequence[tuple[Referral, Sequence[Change]]]) -> None:
        history = [
            {"referral_id": referral.id, "status": c.status.value, "at": c.at, "reason": c.reason}
            for referral, changes in changed
            for c in changes
        ]
        await _insert_rows(self.connection, referral_history, history)

    async def history(self, referral_ids: list[int]) -> dict[int, list]:
        rows = (
            await self.connection.execute(
                select(referral_history)
                .where(referral_history.c.referral_id.in_(referral_ids))
                .order_by(referral_history.c.id)
            )
            if referral_ids
            else []
        )
        out: dict[int, list] = {}
        for row in rows:
            out.setdefault(row.referral_id, []).append(row)
        return out

    async def lock_referrer(self, referrer_id: str) -> None:
        """Serialise referrals of one referrer: the velocity and look-alike rules read their siblings."""
        await self.connection.execute(
            select(referrers.c.referrer_id).where(referrers.c.referrer_id == referrer_id).with_for_update()
        )

    async def prior_referrals(self, referrer_id: str, excluding: str | None = None) -> list[PriorReferral]:
        query = (
            select(
                referrals.c.referred_customer_id,
                referrals.c.submitted_at,
                customer_profiles.c.email,
                customer_profiles.c.payment_fingerprint,
            )
            .select_from(
                referrals.outerjoin(
                    customer_profiles, customer_profiles.c.customer_id == referrals.c.referred_customer_id
                )
            )
            .where(referrals.c.referrer_id == referrer_id, REFERRAL_IS_ATTRIBUTED)
        )
        if excluding is not None:
            query = query.where(referrals.c.referred_customer_id != excluding)
        rows = await self.connection.execute(query)
        return [
            PriorReferral(
                r.referred_customer_id,
                r.submitted_at,
                r.email,
                frozenset([r.payment_fingerprint]) if r.payment_fingerprint else frozenset(),
            )
            for r in rows
        ]

    async def referred_customers_with_fingerprint(self, fingerprints: frozenset[str], excluding: str) -> int:
        if not fingerprints:
            return 0
        query = (
            select(func.count())
            .select_from(
                referrals.join(customer_profiles, customer_profiles.c.customer_id == referrals.c.referred_customer_id)
            )
            .where(
                REFERRAL_IS_ATTRIBUTED,
                customer_profiles.c.payment_fingerprint.in_(fingerprints),
                referrals.c.referred_customer_id != excluding,
            )
        )
        return (await self.connection.execute(query)).scalar_one()

    async def has_paid_before(self, customer_id: str, before: datetime, except_payment: str | None = None) -> bool:
        """Whether the customer had a successful payment before ``before``."""
        query = select(credit_lots.c.id).where(
            credit_lots.c.customer_id == customer_id,
            credit_lots.c.payment_id.is_not(None),
            credit_lots.c.issued_at < before,
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
        return [self._load(row) for row in await self.connection.execute(query)]

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

    async def payees_with_payable(self, *, same_day_only: bool = False) -> list[str]:
        """Payees with an approved reward or an open clawback, in id order (not locked: each
        chunk locks its own with ``payable``); only same-day payees if asked."""
        approved = select(referrals.c.referrer_id.label("payee_id")).where(
            referrals.c.status == ReferralStatus.APPROVED.value
        )
        clawbacks = select(referral_clawbacks.c.payee_id).where(referral_clawbacks.c.payout_id.is_(None))
        if same_day_only:
            same_day = select(referrers.c.referrer_id).where(referrers.c.same_day.is_(True))
            approved = approved.where(referrals.c.referrer_id.in_(same_day))
            clawbacks = clawbacks.where(referral_clawbacks.c.payee_id.in_(same_day))
        query = union(approved, clawbacks).order_by("payee_id")
        return [payee for payee in (await self.connection.execute(query)).scalars() if payee is not None]

    async def payable(self, payee_ids: list[str]) -> list[Payable]:
        """The payees' approved rewards and open clawbacks, locked (other runs skip them): two statements."""
        approved = select(referrals).where(
            referrals.c.status == ReferralStatus.APPROVED.value, referrals.c.referrer_id.in_(payee_ids)
        )
        clawbacks = select(
            referral_clawbacks.c.id, referral_clawbacks.c.payee_id, referral_clawbacks.c.amount_cents
        ).where(referral_clawbacks.c.payout_id.is_(None), referral_clawbacks.c.payee_id.in_(payee_ids))
        by_payee: dict[str, Payable] = {}
        for row in await self.connection.execute(approved.order_by(referrals.c.id).with_for_update(skip_locked=True)):
            by_payee.setdefault(row.referrer_id, Payable(row.referrer_id)).rewards.append(self._load(row))
        for row in await self.connection.execute(
            clawbacks.order_by(referral_clawbacks.c.id).with_for_update(skip_locked=True)
        ):
            by_payee.setdefault(row.payee_id, Payable(row.payee_id)).clawbacks.append((row.id, row.amount_cents))
        return [by_payee[payee] for payee in sorted(by_payee)]

    async def referrer_rows(self, referrer_ids: Iterable[str]) -> dict[str, Row]:
        """Referrers by id, in one statement."""
        wanted = sorted(set(referrer_ids))
        if not wanted:
            return {}
        return {
            row.referrer_id: row
            for row in await self.connection.execute(select(referrers).where(referrers.c.referrer_id.in_(wanted)))
        }

    async def last_period_numbers(self, payee_ids: list[str], period_prefix: str) -> dict[str, int]:
        """Each payee's highest n of its ``<prefix>-<n>`` periods (absent: none): numbers are never reused."""
        if not payee_ids:
            return {}
        query = select(payouts.c.payee_id, payouts.c.period).where(
            payouts.c.payee_id.in_(payee_ids), payouts.c.period.like(f"{period_prefix}-%")
        )
        numbers: dict[str, int] = {}
        for row in await self.connection.execute(query):
            number = row.period.rsplit("-", 1)[1]
            if number.isdigit():
                numbers[row.payee_id] = max(numbers.get(row.payee_id, 0), int(number))
        return numbers

    async def create_payouts(self, new: Sequence[NewPayout], currency: str, now: datetime) -> dict[str, int]:
        """Snapshot each payee's payable items into one payout for its period, in one statement
        per kind of row; returns the payout id by payee, leaving out payees whose period already
        has a payout (a rerun)."""
        if not new:
            return {}
        rows = [
            {
                "payee_id": n.payable.payee_id,
                "period": n.period,
                "method": n.method,
                "gateway": n.gateway,
                "amount_cents": n.payable.total_cents,
                "currency": currency,
                "status": "pending",
                "idempotency_key": payout_key(n.payable.payee_id, n.period),
                "created_at": now,
            }
            for n in new
        ]
        inserted = await _insert_rows(
            self.connection, payouts, rows, skip_conflicts=True, returning=(payouts.c.id, payouts.c.payee_id)
        )
        made = {row.payee_id: row.id for row in inserted}
        items, linked = [], []
        for n in new:
            payout_id = made.get(n.payable.payee_id)
            if payout_id is None:
                continue
            items += [
                {"payout_id": payout_id, "referral_id": r.id, "clawback_id": None, "amount_cents": r.reward_cents or 0}
                for r in n.payable.rewards
            ]
            items += [
                {"payout_id": payout_id, "referral_id": None, "clawback_id": c, "amount_cents": -amount}
                for c, amount in n.payable.clawbacks
            ]
            linked += [{"id": c, "payout_id": payout_id} for c, _ in n.payable.clawbacks]
        await _insert_rows(self.connection, payout_items, items)
        await _update_rows(self.connection, referral_clawbacks, linked, ["payout_id"])
        return made

    async def lease_payouts_to_send(
        self,
        limit: int,
        *,
        now: datetime,
        until: datetime,
        run_started: datetime,
        after: tuple[datetime, int] | None = None,
    ) -> list:
        """Up to ``limit`` payouts not paid yet (new or failed), not leased by another run, each
        once per run, marked tried and leased until ``until``: two statements.

        The rows are returned as they were before (``attempts``: the earlier tries), with the
        payee's ``stripe_account_id`` and ``payout_address`` (the gateway's order needs them).
        ``after``: the (created_at, id) of the run's last payout, so a run walks the queue once
        instead of stepping again over every payout it already tried."""
        query = (
            select(payouts, referrers.c.stripe_account_id, referrers.c.payout_address)
            .select_from(payouts.outerjoin(referrers, referrers.c.referrer_id == payouts.c.payee_id))
            .where(
                PAYOUT_IS_TO_SEND,
                or_(payouts.c.leased_until.is_(None), payouts.c.leased_until <= now),
                or_(payouts.c.last_tried_at.is_(None), payouts.c.last_tried_at < run_started),
            )
        )
        if after is not None:
            query = query.where(tuple_(payouts.c.created_at, payouts.c.id) > after)
        rows = list(
            await self.connection.execute(
                query.order_by(payouts.c.created_at, payouts.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=payouts)
            )
        )
        if rows:
            await self.connection.execute(
                update(payouts)
                .where(payouts.c.id.in_([row.id for row in rows]))
                .values(attempts=payouts.c.attempts + 1, last_tried_at=now, leased_until=until)
            )
        return rows

    async def record_sent(self, outcomes: Sequence[SendOutcome], at: datetime) -> None:
        """What the gateway said of each leased payout, in one statement per outcome: paid,
        exported, failed. The lease ends; a paid payout never changes again."""
        paid = [{"id": o.payout_id, "external_reference": o.reference} for o in outcomes if o.status == "paid"]
        exported = [o.payout_id for o in outcomes if o.status == "exported"]
        failed = [{"id": o.payout_id, "last_error": o.error} for o in outcomes if o.status == "failed"]
        unpaid = payouts.c.status != "paid"
        await _update_rows(
            self.connection,
            payouts,
            paid,
            ["external_reference"],
            unpaid,
            status="paid",
            paid_at=at,
            last_error=None,
            leased_until=None,
        )
        if exported:
            await self.connection.execute(
                update(payouts)
                .where(payouts.c.id.in_(exported), unpaid)
                .values(status="exported", last_error=None, leased_until=None)
            )
        await _update_rows(
            self.connection,
            payouts,
            failed,
            ["last_error"],
            unpaid,
            status="failed",
            failures=payouts.c.failures + 1,
            leased_until=None,
        )

    async def payout(self, payout_id: int, *, for_update: bool = True):
        query = select(payouts).where(payouts.c.id == payout_id)
        return (await self.connection.execute(query.with_for_update() if for_update else query)).first()

    async def withdraw_from_unsent_payout(self, referral: Referral) -> bool:
        """Take a reward out of its payout if that payout was never sent; the payout shrinks, or
        goes when nothing is left. False when it was sent (or exported): then it is clawed back."""
        row = await self.payout(referral.payout_id) if referral.payout_id is not None else None
        if row is None or row.status not in ("pending", "failed") or row.attempts > 0:
            return False
        await self.connection.execute(
            delete(payout_items).where(payout_items.c.payout_id == row.id, payout_items.c.referral_id == referral.id)
        )
        remaining = (
            await self.connection.execute(
                select(func.coalesce(func.sum(payout_items.c.amount_cents), 0)).where(
                    payout_items.c.payout_id == row.id
                )
            )
        ).scalar_one()
        if remaining > 0:
            await self.connection.execute(update(payouts).where(payouts.c.id == row.id).values(amount_cents=remaining))
        else:
            # Nothing (or only clawbacks) left: the payout goes; its clawbacks wait for the next one.
            await self.connection.execute(
                update(referral_clawbacks).where(referral_clawbacks.c.payout_id == row.id).values(payout_id=None)
            )
            await self.connection.execute(delete(payout_items).where(payout_items.c.payout_id == row.id))
            await self.connection.execute(delete(payouts).where(payouts.c.id == row.id))
        return True

    async def referrals_in_payouts(self, payout_ids: list[int]) -> list[Referral]:
        """The rewards of these payouts, locked: one statement."""
        if not payout_ids:
            return []
        joined = referrals.join(
            payout_items, and_(payout_items.c.referral_id == referrals.c.id, payout_items.c.payout_id.in_(payout_ids))
        )
        rows = await self.connection.execute(
            select(referrals).select_from(joined).order_by(referrals.c.id).with_for_update(of=referrals)
        )
        return [self._load(row) for row in rows]


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


# ---------------------------------------------------------------- many rows in one statement


def _array_type(column_type):
    """The PostgreSQL array element type asyncpg encodes by itself (no Python per value), or None."""
    if isinstance(column_type, UtcDateTime):
        return TIMESTAMP(timezone=True)
    for kind, array_kind in ((Boolean, Boolean), (Integer, BigInteger), (String, Text)):
        if isinstance(column_type, kind):
            return array_kind()
    return None  # JSON and the rest: written row by row


def _unnested(connection: AsyncConnection, table: Table, rows: Sequence[dict], names: Sequence[str]):
    """On PostgreSQL, ``rows`` as one FROM item (``unnest`` of one array per column): a statement
    over it costs one round trip and no per-row parameter processing. None elsewhere, or when a
    column has no plain array type."""
    kinds = [_array_type(table.c[name].type) for name in names]
    if connection.dialect.name != "postgresql" or None in kinds:
        return None
    arrays = [
        bindparam(f"u_{name}", [row[name] for row in rows], type_=ARRAY(kind))
        for name, kind in zip(names, kinds, strict=True)
    ]
    return (
        func.unnest(*arrays)
        .table_valued(*(column(name, kind) for name, kind in zip(names, kinds, strict=True)))
        .render_derived(name="v")
    )


async def _insert_rows(
    connection: AsyncConnection,
    table: Table,
    rows: Sequence[dict],
    *,
    skip_conflicts: bool = False,
    returning: Sequence = (),
) -> list:
    """INSERT ``rows`` (dicts with the same keys) in one statement; the ``returning`` columns of those inserted."""
    if not rows:
        return []
    names = list(rows[0])
    source = _unnested(connection, table, rows, names)
    if source is not None:
        statement = pg_insert(table).from_select(names, select(*(source.c[name] for name in names)))
    else:
        statement = upsert_into(connection, table)
    if skip_conflicts:
        statement = statement.on_conflict_do_nothing()
    if returning:
        statement = statement.returning(*returning)
    result = await connection.execute(statement) if source is not None else await connection.execute(statement, rows)
    return list(result) if returning else []


async def _update_rows(
    connection: AsyncConnection, table: Table, rows: Sequence[dict], names: Sequence[str], *conditions, **values
) -> None:
    """UPDATE each row's ``names`` by its ``id`` (and ``conditions``), and ``values`` for all, in one statement."""
    if not rows:
        return
    source = _unnested(connection, table, rows, ["id", *names])
    if source is not None:
        statement = (
            update(table)
            .where(table.c.id == source.c.id, *conditions)
            .values({**{name: source.c[name] for name in names}, **values})
        )
        await connection.execute(statement)
        return
    statement = (
        update(table)
        .where(table.c.id == bindparam("b_id"), *conditions)
        .values({**{name: bindparam(f"b_{name}") for name in names}, **values})
    )
    await connection.execute(statement, [{f"b_{key}": value for key, value in row.items()} for row in rows])
