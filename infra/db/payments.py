"""Repositories for payments: dunning cases and their attempts, and what the Stripe relay remembers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from domain.dunning import AttemptKind, AttemptOutcome, DunningCase, DunningStatus
from infra.db.repository import upsert_into
from infra.db.tables import (
    ATTEMPT_IS_PENDING,
    CASE_IS_RETRYING,
    STRIPE_EVENT_IS_PARKED,
    dunning_cases,
    payment_attempts,
    stripe_customers,
    stripe_events,
    stripe_payments,
)

_CASE_FIELDS = (
    "customer_id",
    "invoice_id",
    "status",
    "first_failed_at",
    "attempts_made",
    "next_retry_at",
    "last_failure_at",
    "last_decline_code",
    "last_failure_message",
    "hosted_invoice_url",
    "subscription_id",
    "closed_at",
    "subscription_cancelled_at",
)
_OPEN_STATUSES = [status.value for status in DunningStatus if status.is_open]


@dataclass(frozen=True)
class Attempt:
    """One charge of an invoice, claimed by a worker (see ``SqlDunningRepository.claim_attempts``)."""

    id: int
    case_id: int
    customer_id: str
    invoice_id: str
    kind: AttemptKind
    number: int | None
    idempotency_key: str
    provider_errors: int
    payment_method_id: str | None = None


class SqlDunningRepository:
    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection
        #: Immediate attempts requested in this unit of work: charged right after it commits.
        self.new_attempt_ids: list[int] = []

    # ------------------------------------------------------------ cases

    async def get(self, invoice_id: str, *, for_update: bool = True) -> DunningCase | None:
        query = select(dunning_cases).where(dunning_cases.c.invoice_id == invoice_id)
        row = (await self.connection.execute(query.with_for_update() if for_update else query)).first()
        return _case(row) if row else None

    async def get_by_id(self, case_id: int) -> DunningCase | None:
        row = (
            await self.connection.execute(select(dunning_cases).where(dunning_cases.c.id == case_id).with_for_update())
        ).first()
        return _case(row) if row else None

    async def cases_of(
        self, customer_id: str, *, open_only: bool = True, for_update: bool = False
    ) -> list[DunningCase]:
        """The customer's cases, newest first."""
        query = select(dunning_cases).where(dunning_cases.c.customer_id == customer_id)
        if open_only:
            query = query.where(dunning_cases.c.status.in_(_OPEN_STATUSES))
        query = query.order_by(dunning_cases.c.first_failed_at.desc(), dunning_cases.c.id.desc())
        if for_update:
            query = query.with_for_update()
        return [_case(row) for row in await self.connection.execute(query)]

    async def add(self, case: DunningCase) -> None:
        values = {name: _plain(getattr(case, name)) for name in _CASE_FIELDS}
        case.id = (
            await self.connection.execute(insert(dunning_cases).values(**values).returning(dunning_cases.c.id))
        ).scalar_one()

    async def save(self, case: DunningCase) -> None:
        values = {name: _plain(getattr(case, name)) for name in _CASE_FIELDS}
        await self.connection.execute(
            update(dunning_cases).where(dunning_cases.c.id == case.id).values(**values, updated_at=func.now())
        )

    async def lock_due(self, now: datetime, limit: int) -> list[DunningCase]:
        """Cases whose scheduled retry is due, skipping those another worker holds."""
        query = (
            select(dunning_cases)
            .where(CASE_IS_RETRYING, dunning_cases.c.next_retry_at <= now)
            .order_by(dunning_cases.c.next_retry_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [_case(row) for row in await self.connection.execute(query)]

    async def lock_stopped_before(self, first_failed_before: datetime, limit: int) -> list[DunningCase]:
        """Cases that stopped retrying (hard decline, authentication) and failed first before the given time."""
        query = (
            select(dunning_cases)
            .where(
                dunning_cases.c.status.in_(
                    [DunningStatus.NEEDS_PAYMENT_METHOD.value, DunningStatus.ACTION_REQUIRED.value]
                ),
                dunning_cases.c.first_failed_at <= first_failed_before,
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [_case(row) for row in await self.connection.execute(query)]

    async def lock_to_cancel(self, limit: int) -> list[DunningCase]:
        """Past-due cases whose subscription is still to be cancelled (end action ``cancel_subscription``)."""
        query = (
            select(dunning_cases)
            .where(
                dunning_cases.c.status == DunningStatus.PAST_DUE.value,
                dunning_cases.c.subscription_id.is_not(None),
                dunning_cases.c.subscription_cancelled_at.is_(None),
            )
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return [_case(row) for row in await self.connection.execute(query)]

    # ------------------------------------------------------------ attempts

    async def add_attempt(
        self,
        case: DunningCase,
        kind: AttemptKind,
        now: datetime,
        *,
        payment_method_id: str | None = None,
        not_before: datetime | None = None,
    ) -> int | None:
        """Request a charge of the case's invoice; returns its id, or None when it is already requested.

        Scheduled attempts are numbered and one is pending at a time (the collector holds the
        case row; the unique number is the backstop). A payment method is charged once per case.
        ``not_before`` delays the charge (a card update over the rate limit waits its turn).
        """
        attempts = payment_attempts.c
        if kind is AttemptKind.SCHEDULED:
            if await self._has_pending(case, kind):
                return None
            last = (
                await self.connection.execute(select(func.max(attempts.number)).where(attempts.case_id == case.id))
            ).scalar_one()
            number = (last or 0) + 1
            key = f"dunning:{case.invoice_id}:{number}"
        else:
            number = None
            if kind is AttemptKind.PAYMENT_METHOD:
                same_card = attempts.payment_method_id == payment_method_id if payment_method_id else ATTEMPT_IS_PENDING
                query = (
                    select(attempts.id)
                    .where(attempts.case_id == case.id, attempts.kind == kind.value, same_card)
                    .limit(1)
                )
                if (await self.connection.execute(query)).first() is not None:
                    return None  # a card change sends two events (attached, customer.updated): one charge
            count = (
                await self.connection.execute(select(func.count()).where(attempts.case_id == case.id))
            ).scalar_one()
            key = f"dunning:{case.invoice_id}:{kind.value}:{count + 1}"
        statement = (
            upsert_into(self.connection, payment_attempts)
            .values(
                case_id=case.id,
                kind=kind.value,
                number=number,
                idempotency_key=key,
                requested_at=now,
                payment_method_id=payment_method_id,
                leased_until=not_before,
            )
            .on_conflict_do_nothing()
            .returning(attempts.id)
        )
        attempt_id = (await self.connection.execute(statement)).scalar_one_or_none()
        if attempt_id is not None and kind is not AttemptKind.SCHEDULED and not_before is None:
            self.new_attempt_ids.append(attempt_id)
        return attempt_id

    async def _has_pending(self, case: DunningCase, kind: AttemptKind) -> bool:
        query = select(payment_attempts.c.id).where(
            payment_attempts.c.case_id == case.id, payment_attempts.c.kind == kind.value, ATTEMPT_IS_PENDING
        )
        return (await self.connection.execute(query.limit(1))).first() is not None

    async def immediate_attempt_times(self, customer_id: str, since: datetime) -> list[datetime]:
        """When the customer's immediate (not scheduled) charges were requested since ``since``."""
        query = (
            select(payment_attempts.c.requested_at)
            .join(dunning_cases, dunning_cases.c.id == payment_attempts.c.case_id)
            .where(
                dunning_cases.c.customer_id == customer_id,
                payment_attempts.c.number.is_(None),
                payment_attempts.c.requested_at > since,
            )
        )
        return list((await self.connection.execute(query)).scalars())

    async def claim_attempts(
        self, now: datetime, lease: timedelta, limit: int, attempt_ids: list[int] | None = None
    ) -> list[Attempt]:
        """Lease pending attempts no other worker is charging. A crash frees them when the lease ends."""
        pending = select(payment_attempts.c.id).where(
            ATTEMPT_IS_PENDING, or_(payment_attempts.c.leased_until.is_(None), payment_attempts.c.leased_until <= now)
        )
        if attempt_ids is not None:
            pending = pending.where(payment_attempts.c.id.in_(attempt_ids))
        pending = pending.order_by(payment_attempts.c.requested_at).limit(limit).with_for_update(skip_locked=True)
        ids = list((await self.connection.execute(pending)).scalars())
        if not ids:
            return []
        await self.connection.execute(
            update(payment_attempts).where(payment_attempts.c.id.in_(ids)).values(leased_until=now + lease)
        )
        rows = await self.connection.execute(
            select(payment_attempts, dunning_cases.c.customer_id, dunning_cases.c.invoice_id)
            .join(dunning_cases, dunning_cases.c.id == payment_attempts.c.case_id)
            .where(payment_attempts.c.id.in_(ids))
            .order_by(payment_attempts.c.requested_at)
        )
        return [
            Attempt(
                r.id,
                r.case_id,
                r.customer_id,
                r.invoice_id,
                AttemptKind(r.kind),
                r.number,
                r.idempotency_key,
                r.provider_errors,
                r.payment_method_id,
            )
            for r in rows
        ]

    async def finish_attempt(
        self,
        attempt_id: int,
        now: datetime,
        outcome: AttemptOutcome,
        decline_code: str | None = None,
        message: str | None = None,
    ) -> bool:
        """Record an attempt's outcome once. False if it was already recorded (a second worker after a lease ran out)."""
        result = await self.connection.execute(
            update(payment_attempts)
            .where(payment_attempts.c.id == attempt_id, ATTEMPT_IS_PENDING)
            .values(
                finished_at=now,
                leased_until=None,
                outcome=outcome.value,
                decline_code=decline_code,
                failure_message=message,
            )
        )
        return result.rowcount == 1

    async def postpone_attempt(self, attempt_id: int, until: datetime, message: str) -> None:
        """The provider could not be reached or failed: try the same charge (same key) again later."""
        await self.connection.execute(
            update(payment_attempts)
            .where(payment_attempts.c.id == attempt_id, ATTEMPT_IS_PENDING)
            .values(leased_until=until, provider_errors=payment_attempts.c.provider_errors + 1, failure_message=message)
        )


class SqlStripeRepository:
    """What the webhook relay remembers: events seen, customers mapped, invoices paid."""

    def __init__(self, connection: AsyncConnection) -> None:
        self.connection = connection

    async def record_event(
        self,
        event_id: str,
        type_: str,
        created_at: datetime,
        stripe_customer_id: str | None,
        payload: dict,
        now: datetime,
    ) -> bool:
        """Record a delivery. False if this event id was recorded before (a redelivery)."""
        statement = (
            upsert_into(self.connection, stripe_events)
            .values(
                event_id=event_id,
                type=type_,
                stripe_created_at=created_at,
                stripe_customer_id=stripe_customer_id,
                payload=payload,
                received_at=now,
                outcome="relayed",
            )
            .on_conflict_do_nothing()
            .returning(stripe_events.c.event_id)
        )
        return (await self.connection.execute(statement)).first() is not None

    async def set_outcome(self, event_id: str, outcome: str, detail: str | None, now: datetime | None = None) -> None:
        values = {"outcome": outcome, "detail": detail}
        if outcome != "parked" and now is not None:
            values["resolved_at"] = now
        await self.connection.execute(
            update(stripe_events).where(stripe_events.c.event_id == event_id).values(**values)
        )

    async def parked_events(
        self,
        stripe_customer_id: str | None = None,
        limit: int = 100,
        *,
        for_update: bool = False,
        event_id: str | None = None,
    ) -> list:
        query = select(stripe_events).where(STRIPE_EVENT_IS_PARKED)
        if stripe_customer_id is not None:
            query = query.where(stripe_events.c.stripe_customer_id == stripe_customer_id)
        if event_id is not None:
            query = query.where(stripe_events.c.event_id == event_id)
        query = query.order_by(stripe_events.c.stripe_created_at, stripe_events.c.received_at).limit(limit)
        if for_update:
            query = query.with_for_update(skip_locked=True)
        return list(await self.connection.execute(query))

    async def customer_for(self, stripe_customer_id: str) -> str | None:
        query = select(stripe_customers.c.customer_id).where(
            stripe_customers.c.stripe_customer_id == stripe_customer_id
        )
        return (await self.connection.execute(query)).scalar_one_or_none()

    async def map_customer(self, stripe_customer_id: str, customer_id: str) -> str:
        """Link a Stripe customer to ours; the first link stands. Returns the customer it is linked to."""
        await self.connection.execute(
            upsert_into(self.connection, stripe_customers)
            .values(stripe_customer_id=stripe_customer_id, customer_id=customer_id)
            .on_conflict_do_nothing()
        )
        return await self.customer_for(stripe_customer_id)

    async def record_payment(self, invoice_id: str, customer_id: str | None, **known: object) -> None:
        """Remember an invoice's payment; fields learnt later (the charge, say) fill in, none is erased."""
        known = {name: value for name, value in {"customer_id": customer_id, **known}.items() if value is not None}
        statement = upsert_into(self.connection, stripe_payments).values(invoice_id=invoice_id, **known)
        statement = (
            statement.on_conflict_do_update(index_elements=[stripe_payments.c.invoice_id], set_=known)
            if known
            else statement.on_conflict_do_nothing()
        )
        await self.connection.execute(statement)

    async def note_reversal(self, invoice_id: str, *, refunded: int | None = None, disputed: int | None = None):
        """Record the cumulative amount refunded or disputed (never lowered: reports come out of
        order) and return the payment with both."""
        values = {}
        for column, amount in (
            (stripe_payments.c.amount_refunded, refunded),
            (stripe_payments.c.amount_disputed, disputed),
        ):
            if isinstance(amount, int) and amount > 0:
                values[column.name] = case((func.coalesce(column, 0) < amount, amount), else_=column)
        if values:
            await self.connection.execute(
                update(stripe_payments).where(stripe_payments.c.invoice_id == invoice_id).values(**values)
            )
        return await self.payment_for(invoice_id=invoice_id)

    async def payment_for(
        self, *, invoice_id: str | None = None, charge_id: str | None = None, payment_intent_id: str | None = None
    ):
        """The paid invoice a charge, payment intent or invoice id belongs to, if known."""
        for column, value in (
            (stripe_payments.c.invoice_id, invoice_id),
            (stripe_payments.c.charge_id, charge_id),
            (stripe_payments.c.payment_intent_id, payment_intent_id),
        ):
            if value:
                row = (await self.connection.execute(select(stripe_payments).where(column == value))).first()
                if row is not None:
                    return row
        return None


def _case(row) -> DunningCase:
    values = {name: getattr(row, name) for name in _CASE_FIELDS}
    values["status"] = DunningStatus(values["status"])
    return DunningCase(**values, id=row.id)


def _plain(value: object) -> object:
    return value.value if isinstance(value, DunningStatus) else value
