"""The schema. Alembic migrations are written from these tables; a test keeps the two in step."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    func,
    literal_column,
    true,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UtcDateTime(TypeDecorator):
    """Timezone-aware in, timezone-aware (UTC) out, on PostgreSQL and SQLite alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; pass a timezone-aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _sql_literal(value: str | int):
    # Rendered inline, not as a bound parameter: a partial index is only usable when the
    # planner can see the query's predicate matches the index's, and it cannot see a parameter.
    return literal_column(repr(value) if isinstance(value, str) else str(value))


# BigInteger ids that are still autoincrementing primary keys on SQLite.
Id = BigInteger().with_variant(Integer(), "sqlite")
# Credits: 64-bit (domain/limits.py bounds them far inside). SQLite's INTEGER is 64-bit already.
Credits = BigInteger().with_variant(Integer(), "sqlite")

customers = Table(
    "customers",
    metadata,
    Column("customer_id", String(255), primary_key=True),
    Column("balance", Credits, nullable=False, server_default="0"),
    Column("overdraft", Credits, nullable=False, server_default="0"),
    Column("credits_depleted_at", UtcDateTime, nullable=True),
    #: Set while the membership is frozen: nothing expires, nothing can be booked.
    Column("frozen_since", UtcDateTime, nullable=True),
    Column("unfrozen_at", UtcDateTime, nullable=True),
    Column("created_at", UtcDateTime, nullable=False, server_default=func.now()),
    Column("updated_at", UtcDateTime, nullable=False, server_default=func.now()),
    CheckConstraint("overdraft >= 0", name="overdraft_not_negative"),
    Index("ix_customers_depleted", "credits_depleted_at", "customer_id"),
)

credit_lots = Table(
    "credit_lots",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("customer_id", String(255), ForeignKey("customers.customer_id"), nullable=False),
    Column("source", String(16), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("amount", Credits, nullable=False),
    Column("remaining", Credits, nullable=False),
    Column("issued_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("payment_id", String(255), nullable=True),
    # What the payment was for, in cents, when the producer said (a referral needs a paid one).
    Column("paid_cents", BigInteger, nullable=True),
    Column("reversed", Credits, nullable=False, server_default="0"),
    Column("expired", Credits, nullable=False, server_default="0"),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("remaining >= 0", name="remaining_not_negative"),
    CheckConstraint("remaining <= amount", name="remaining_within_amount"),
    CheckConstraint("source IN ('payment', 'adjustment', 'gift')", name="known_source"),
)
# Consumption order for one customer, open lots only.
LOT_IS_OPEN = credit_lots.c.remaining > _sql_literal(0)
Index(
    "ix_credit_lots_open",
    credit_lots.c.customer_id,
    credit_lots.c.expires_at,
    credit_lots.c.issued_at,
    credit_lots.c.id,
    postgresql_where=LOT_IS_OPEN,
    sqlite_where=LOT_IS_OPEN,
)
# The expiry sweep: due lots across all customers.
Index("ix_credit_lots_due", credit_lots.c.expires_at, postgresql_where=LOT_IS_OPEN, sqlite_where=LOT_IS_OPEN)
# Every lot of a customer (history, reconciliation).
Index("ix_credit_lots_customer", credit_lots.c.customer_id)
# A payment issues credits once, to one customer, whatever the event ids say.
LOT_HAS_PAYMENT = credit_lots.c.payment_id.is_not(None)
Index(
    "uq_credit_lots_payment",
    credit_lots.c.payment_id,
    unique=True,
    postgresql_where=LOT_HAS_PAYMENT,
    sqlite_where=LOT_HAS_PAYMENT,
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("customer_id", String(255), ForeignKey("customers.customer_id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("credits", Credits, nullable=False),
    Column("balance_after", Credits, nullable=False),
    Column("overdraft_change", Credits, nullable=False, server_default="0"),
    Column("occurred_at", UtcDateTime, nullable=False),
    # Text: besides wire event ids (<= 255) it holds composed ones such as hold:<customer>:<job>.
    Column("event_id", Text, nullable=False),
    Column("job_id", String(255), nullable=True),
    Column("lot_id", Id, ForeignKey("credit_lots.id"), nullable=True),
    Column("note", Text, nullable=True),
    Column("recorded_at", UtcDateTime, nullable=False, server_default=func.now()),
    CheckConstraint(
        "kind IN ('issued', 'debited', 'captured', 'expired', 'adjusted', 'held', 'released', 'lapsed', 'reversed', 'gifted')",
        name="known_kind",
    ),
    Index("ix_ledger_entries_customer", "customer_id", "id"),
    # Analytics: credits by kind and month over millions of entries, from the index alone.
    Index("ix_ledger_entries_kind_time", "kind", "occurred_at", postgresql_include=["credits"]),
)
# A job is charged once, whatever the event ids say.
ENTRY_IS_CHARGE = ledger_entries.c.kind.in_([_sql_literal("debited"), _sql_literal("captured")])
Index(
    "uq_ledger_entries_job_charge",
    ledger_entries.c.customer_id,
    ledger_entries.c.job_id,
    unique=True,
    postgresql_where=ENTRY_IS_CHARGE,
    sqlite_where=ENTRY_IS_CHARGE,
)

lot_movements = Table(
    "lot_movements",
    metadata,
    Column("entry_id", Id, ForeignKey("ledger_entries.id"), primary_key=True),
    Column("lot_id", Id, ForeignKey("credit_lots.id"), primary_key=True),
    Column("credits", Credits, nullable=False),
    CheckConstraint("credits > 0", name="credits_positive"),
)

holds = Table(
    "holds",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("customer_id", String(255), ForeignKey("customers.customer_id"), nullable=False),
    Column("job_id", String(255), nullable=False),
    Column("credits", Credits, nullable=False),
    Column("placed_at", UtcDateTime, nullable=False),
    Column("expires_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("closed_at", UtcDateTime, nullable=True),
    CheckConstraint("credits > 0", name="credits_positive"),
    CheckConstraint("status IN ('active', 'captured', 'released', 'lapsed')", name="known_status"),
)
HOLD_IS_ACTIVE = holds.c.status == _sql_literal("active")
Index("ix_holds_due", holds.c.expires_at, postgresql_where=HOLD_IS_ACTIVE, sqlite_where=HOLD_IS_ACTIVE)
# One active hold per job; a job may be booked again after its hold is released.
Index(
    "uq_holds_active_job",
    holds.c.customer_id,
    holds.c.job_id,
    unique=True,
    postgresql_where=HOLD_IS_ACTIVE,
    sqlite_where=HOLD_IS_ACTIVE,
)

processed_events = Table(
    "processed_events",
    metadata,
    Column("event_id", String(255), primary_key=True),
    Column("event_type", String(64), nullable=False),
    Column("customer_id", String(255), nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("processed_at", UtcDateTime, nullable=False, server_default=func.now()),
    # The web's /metrics counts events by type from this index, not from the payloads' table.
    Index("ix_processed_events_type", "event_type"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", String(64), nullable=False),
    Column("queue_name", String(255), nullable=False),
    Column("actor_name", String(255), nullable=False),
    Column("message", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("failed_at", UtcDateTime, nullable=False, server_default=func.now()),
    #: Set when an operator re-enqueued the message (`credits dead-letters replay`).
    Column("replayed_at", UtcDateTime, nullable=True),
    Index("ix_dead_letters_message", "message_id"),
)


# ---------------------------------------------------------------- payments (Stripe, dunning)

stripe_customers = Table(
    "stripe_customers",
    metadata,
    Column("stripe_customer_id", String(255), primary_key=True),
    Column("customer_id", String(255), nullable=False, unique=True),
    Column("created_at", UtcDateTime, nullable=False, server_default=func.now()),
)

stripe_events = Table(
    "stripe_events",
    metadata,
    # Stripe's event id: a redelivered event is recognised here and does nothing.
    Column("event_id", String(255), primary_key=True),
    Column("type", String(255), nullable=False),
    Column("stripe_created_at", UtcDateTime, nullable=False),
    Column("stripe_customer_id", String(255), nullable=True),
    Column("payload", JSON, nullable=False),
    Column("received_at", UtcDateTime, nullable=False),
    # relayed: domain events published; ignored: nothing for us; parked: waits for review.
    Column("outcome", String(16), nullable=False),
    Column("detail", Text, nullable=True),
    Column("resolved_at", UtcDateTime, nullable=True),
    CheckConstraint("outcome IN ('relayed', 'ignored', 'parked')", name="known_outcome"),
)
STRIPE_EVENT_IS_PARKED = stripe_events.c.outcome == _sql_literal("parked")
Index(
    "ix_stripe_events_parked",
    stripe_events.c.stripe_customer_id,
    stripe_events.c.received_at,
    postgresql_where=STRIPE_EVENT_IS_PARKED,
    sqlite_where=STRIPE_EVENT_IS_PARKED,
)

# Paid invoices and the charges that paid them: a refund or dispute names a charge or a
# payment intent, and is traced back to the invoice (our payment id) through this table.
stripe_payments = Table(
    "stripe_payments",
    metadata,
    Column("invoice_id", String(255), primary_key=True),
    # Unknown until the invoice.paid event (newer API versions send invoice_payment.paid too).
    Column("customer_id", String(255), nullable=True),
    Column("payment_intent_id", String(255), nullable=True, index=True),
    Column("charge_id", String(255), nullable=True, index=True),
    Column("amount_paid", BigInteger, nullable=True),
    Column("currency", String(3), nullable=True),
    Column("credits", Credits, nullable=True),
    Column("paid_at", UtcDateTime, nullable=True),
    # Cumulative amounts refunded and disputed, in the currency's minor unit.
    Column("amount_refunded", BigInteger, nullable=True),
    Column("amount_disputed", BigInteger, nullable=True),
)

dunning_cases = Table(
    "dunning_cases",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("customer_id", String(255), nullable=False),
    Column("invoice_id", String(255), nullable=False, unique=True),
    Column("status", String(32), nullable=False),
    Column("first_failed_at", UtcDateTime, nullable=False),
    Column("attempts_made", Integer, nullable=False, server_default="0"),
    Column("next_retry_at", UtcDateTime, nullable=True),
    Column("last_failure_at", UtcDateTime, nullable=True),
    Column("last_decline_code", String(100), nullable=True),
    Column("last_failure_message", Text, nullable=True),
    Column("hosted_invoice_url", Text, nullable=True),
    Column("subscription_id", String(255), nullable=True),
    Column("closed_at", UtcDateTime, nullable=True),
    Column("subscription_cancelled_at", UtcDateTime, nullable=True),
    Column("updated_at", UtcDateTime, nullable=False, server_default=func.now()),
    CheckConstraint(
        "status IN ('retrying', 'action_required', 'needs_payment_method', 'past_due', 'recovered', 'closed')",
        name="known_status",
    ),
    CheckConstraint("attempts_made >= 0", name="attempts_not_negative"),
    Index("ix_dunning_cases_customer", "customer_id", "first_failed_at"),
    Index("ix_dunning_cases_status", "status"),
)
CASE_IS_RETRYING = dunning_cases.c.status == _sql_literal("retrying")
Index(
    "ix_dunning_cases_due",
    dunning_cases.c.next_retry_at,
    postgresql_where=CASE_IS_RETRYING,
    sqlite_where=CASE_IS_RETRYING,
)

payment_attempts = Table(
    "payment_attempts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("case_id", Id, ForeignKey("dunning_cases.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    # The scheduled attempt's number (1..n); None for immediate ones.
    Column("number", Integer, nullable=True),
    # Sent to the provider with the charge: a repeated call after a crash is the same charge.
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("requested_at", UtcDateTime, nullable=False),
    #: The card to charge (a payment-method update names it); None: the invoice's default.
    Column("payment_method_id", String(255), nullable=True),
    # While a worker is charging, no other one takes the attempt; a crash frees it at this time.
    Column("leased_until", UtcDateTime, nullable=True),
    Column("provider_errors", Integer, nullable=False, server_default="0"),
    Column("finished_at", UtcDateTime, nullable=True),
    Column("outcome", String(16), nullable=True),
    Column("decline_code", String(100), nullable=True),
    Column("failure_message", Text, nullable=True),
    CheckConstraint("kind IN ('scheduled', 'customer', 'payment_method')", name="known_kind"),
    CheckConstraint(
        "outcome IS NULL OR outcome IN ('succeeded', 'declined', 'action_required', 'closed')", name="known_outcome"
    ),
    Index("ix_payment_attempts_case", "case_id", "requested_at"),
)
ATTEMPT_IS_PENDING = payment_attempts.c.finished_at.is_(None)
Index(
    "ix_payment_attempts_pending",
    payment_attempts.c.leased_until,
    postgresql_where=ATTEMPT_IS_PENDING,
    sqlite_where=ATTEMPT_IS_PENDING,
)
# One scheduled attempt per number per case: two collectors cannot both make attempt 2.
ATTEMPT_IS_SCHEDULED = payment_attempts.c.number.is_not(None)
Index(
    "uq_payment_attempts_number",
    payment_attempts.c.case_id,
    payment_attempts.c.number,
    unique=True,
    postgresql_where=ATTEMPT_IS_SCHEDULED,
    sqlite_where=ATTEMPT_IS_SCHEDULED,
)


# ---------------------------------------------------------------- referrals and payouts

customer_profiles = Table(
    "customer_profiles",
    metadata,
    Column("customer_id", String(255), primary_key=True),
    # Normalised (domain/referrals.py): the self-referral and fraud rules compare these.
    Column("email", String(320), nullable=True, index=True),
    # The address exactly as the customer gave it: where their mail goes.
    Column("contact_email", String(320), nullable=True),
    Column("phone", String(40), nullable=True, index=True),
    Column("payment_fingerprint", String(255), nullable=True, index=True),
    Column("signed_up_at", UtcDateTime, nullable=False),
)

referrers = Table(
    "referrers",
    metadata,
    Column("referrer_id", String(255), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(255), nullable=True),
    Column("email", String(320), nullable=True),
    Column("phone", String(40), nullable=True),
    # How the payee is paid; PAYOUT_GATEWAYS maps each method to a gateway.
    Column("payout_method", String(32), nullable=False, server_default="manual"),
    Column("same_day", Boolean, nullable=False, server_default=false()),
    Column("stripe_account_id", String(255), nullable=True),
    # Where a manual payout goes: a $cashtag, an email for a bank transfer…
    Column("payout_address", String(255), nullable=True),
    Column("created_at", UtcDateTime, nullable=False, server_default=func.now()),
    CheckConstraint("kind IN ('customer', 'employee', 'partner')", name="known_kind"),
)

referral_codes = Table(
    "referral_codes",
    metadata,
    Column("code", String(64), primary_key=True),
    # The code as matched: upper case, letters and digits only (see domain.referrals.code_lookup_key).
    Column("lookup", String(64), nullable=False, unique=True),
    Column("referrer_id", String(255), ForeignKey("referrers.referrer_id"), nullable=False, index=True),
    Column("active", Boolean, nullable=False, server_default=true()),
    Column("created_at", UtcDateTime, nullable=False, server_default=func.now()),
    Column("deactivated_at", UtcDateTime, nullable=True),
)

referrals = Table(
    "referrals",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("referred_customer_id", String(255), nullable=False),
    # False for a submission rejected outright (kept for the record). A customer has at most
    # one attributed referral: the first that stands is fixed (partial unique index below).
    Column("attributed", Boolean, nullable=False),
    Column("referrer_id", String(255), nullable=True, index=True),
    Column("code", String(64), nullable=True),
    Column("submitted_at", UtcDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("reason", Text, nullable=True),
    Column("flags", JSON, nullable=False),
    Column("reward_cents", BigInteger, nullable=True),
    Column("qualifying_payment_id", String(255), nullable=True, index=True),
    Column("approve_after", UtcDateTime, nullable=True),
    Column("payout_id", Id, nullable=True),
    Column("updated_at", UtcDateTime, nullable=False, server_default=func.now()),
    CheckConstraint(
        "status IN ('awaiting_payment', 'pending', 'approved', 'in_payout', 'paid', 'rejected', 'flagged', 'voided')",
        name="known_status",
    ),
    Index("ix_referrals_status", "status", "approve_after"),
    Index("ix_referrals_customer", "referred_customer_id"),
)
REFERRAL_IS_ATTRIBUTED = referrals.c.attributed.is_(True)
Index(
    "uq_referrals_attributed_customer",
    referrals.c.referred_customer_id,
    unique=True,
    postgresql_where=REFERRAL_IS_ATTRIBUTED,
    sqlite_where=REFERRAL_IS_ATTRIBUTED,
)

referral_history = Table(
    "referral_history",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("referral_id", Id, ForeignKey("referrals.id"), nullable=False),
    Column("status", String(16), nullable=False),
    Column("at", UtcDateTime, nullable=False),
    Column("reason", Text, nullable=True),
    Index("ix_referral_history_referral", "referral_id", "id"),
)

# A paid reward whose payment was refunded or disputed: taken from the payee's next payout.
referral_clawbacks = Table(
    "referral_clawbacks",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("referral_id", Id, ForeignKey("referrals.id"), nullable=False, unique=True),
    Column("payee_id", String(255), nullable=False, index=True),
    Column("amount_cents", BigInteger, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("payout_id", Id, nullable=True),
    CheckConstraint("amount_cents > 0", name="amount_positive"),
)

payouts = Table(
    "payouts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("payee_id", String(255), nullable=False),
    # week-<Friday> or day-<date>: one payout per payee per period, whatever reruns or crashes.
    Column("period", String(32), nullable=False),
    Column("method", String(32), nullable=False),
    Column("gateway", String(32), nullable=False),
    Column("amount_cents", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    # pending → paid; failed (retried on the next run); exported (manual: awaits its reference).
    Column("status", String(16), nullable=False),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("external_reference", String(255), nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Sends the gateway answered with a failure: each retry after one uses a fresh key.
    Column("failures", Integer, nullable=False, server_default="0"),
    Column("last_tried_at", UtcDateTime, nullable=True),
    # While a run sends it, no other run takes the payout; a crash frees it when the lease ends.
    Column("leased_until", UtcDateTime, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", UtcDateTime, nullable=False),
    Column("paid_at", UtcDateTime, nullable=True),
    CheckConstraint("status IN ('pending', 'failed', 'exported', 'paid')", name="known_status"),
    CheckConstraint("amount_cents > 0", name="amount_positive"),
    Index("uq_payouts_payee_period", "payee_id", "period", unique=True),
    Index("ix_payouts_status", "status", "created_at"),
)
# The send queue, oldest first: without it each payout sent sorts every waiting one.
PAYOUT_IS_TO_SEND = payouts.c.status.in_([_sql_literal("pending"), _sql_literal("failed")])
Index(
    "ix_payouts_to_send",
    payouts.c.created_at,
    payouts.c.id,
    postgresql_where=PAYOUT_IS_TO_SEND,
    sqlite_where=PAYOUT_IS_TO_SEND,
)

payout_items = Table(
    "payout_items",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("payout_id", Id, ForeignKey("payouts.id"), nullable=False, index=True),
    Column("referral_id", Id, ForeignKey("referrals.id"), nullable=True),
    Column("clawback_id", Id, ForeignKey("referral_clawbacks.id"), nullable=True),
    Column("amount_cents", BigInteger, nullable=False),
    CheckConstraint("(referral_id IS NULL) <> (clawback_id IS NULL)", name="one_source"),
)
# A reward or a clawback is in one payout, ever: a rerun cannot pay an item twice.
ITEM_HAS_REFERRAL = payout_items.c.referral_id.is_not(None)
ITEM_HAS_CLAWBACK = payout_items.c.clawback_id.is_not(None)
Index(
    "uq_payout_items_referral",
    payout_items.c.referral_id,
    unique=True,
    postgresql_where=ITEM_HAS_REFERRAL,
    sqlite_where=ITEM_HAS_REFERRAL,
)
Index(
    "uq_payout_items_clawback",
    payout_items.c.clawback_id,
    unique=True,
    postgresql_where=ITEM_HAS_CLAWBACK,
    sqlite_where=ITEM_HAS_CLAWBACK,
)


# ---------------------------------------------------------------- notifications and retention

notifications = Table(
    "notifications",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    # At most one message per key (credits_expiring:<lot>, payment_failed:<invoice>, ...).
    Column("key", String(255), nullable=False, unique=True),
    Column("customer_id", String(255), nullable=False, index=True),
    Column("kind", String(32), nullable=False),
    Column("to_address", String(320), nullable=True),
    Column("subject", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    # pending → sending → sent; failed (refused for good); uncertain (a crash or a broken
    # connection mid-send: never sent again, at most once); no_address.
    Column("status", String(16), nullable=False),
    Column("send_after", UtcDateTime, nullable=False),
    Column("leased_until", UtcDateTime, nullable=True),
    Column("attempts", Integer, nullable=False, server_default="0"),
    # Tries the server refused for this message itself (not outages, not our settings): these give up.
    Column("refusals", Integer, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    Column("sent_at", UtcDateTime, nullable=True),
    CheckConstraint(
        "status IN ('pending', 'sending', 'sent', 'failed', 'uncertain', 'no_address')", name="known_status"
    ),
)
NOTIFICATION_IS_PENDING = notifications.c.status == _sql_literal("pending")
Index(
    "ix_notifications_due",
    notifications.c.send_after,
    postgresql_where=NOTIFICATION_IS_PENDING,
    sqlite_where=NOTIFICATION_IS_PENDING,
)

customer_notes = Table(
    "customer_notes",
    metadata,
    Column("customer_id", String(255), primary_key=True),
    Column("note", Text, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# Each time a customer's depletion crosses the report's line (14 days by default), once.
retention_crossings = Table(
    "retention_crossings",
    metadata,
    Column("customer_id", String(255), primary_key=True),
    Column("depleted_at", UtcDateTime, primary_key=True),
    # When the periodic job saw it (the crossing itself is depleted_at + the report's days).
    Column("noticed_at", UtcDateTime, nullable=False),
)


# One expiry warning per lot and expiry date: a lot whose expiry moved (a freeze) is warned again.
expiry_warnings = Table(
    "expiry_warnings",
    metadata,
    Column("lot_id", Id, ForeignKey("credit_lots.id"), primary_key=True),
    Column("expires_at", UtcDateTime, primary_key=True),
    Column("warned_at", UtcDateTime, nullable=False),
)


# ---------------------------------------------------------------- admin page sessions

# A signed-in admin page. The cookie carries a random id; only its SHA-256 is stored, so the
# table cannot be replayed as cookies. The admin token's fingerprint (an HMAC keyed by the
# token) is kept with it: once the token is rotated no stored session matches any more.
admin_sessions = Table(
    "admin_sessions",
    metadata,
    Column("session_hash", String(64), primary_key=True),
    Column("token_fingerprint", String(64), nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("last_seen_at", UtcDateTime, nullable=False),
    # created_at + ADMIN_SESSION_MAX_HOURS: the session ends then, however active.
    Column("expires_at", UtcDateTime, nullable=False),
)

# Sign-in attempts per client address (and one "all" bucket) in fixed windows: every web
# process counts in the same rows.
admin_sign_in_attempts = Table(
    "admin_sign_in_attempts",
    metadata,
    Column("bucket", String(64), primary_key=True),
    Column("window_ends", UtcDateTime, nullable=False),
    Column("attempts", Integer, nullable=False),
)
