"""Payments: Stripe customers, events and payments; dunning cases and attempts; payment lots

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 03:57:06.588784
"""

import sqlalchemy as sa
from alembic import op

_KINDS = "'issued', 'debited', 'captured', 'expired', 'adjusted', 'held', 'released', 'lapsed'"


def _entry_kinds(kinds: str) -> None:
    # Batch mode: SQLite cannot alter a constraint in place, so the table is rebuilt there.
    with op.batch_alter_table("ledger_entries") as batch_op:
        batch_op.drop_constraint(op.f("ck_ledger_entries_known_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_ledger_entries_known_kind"), f"kind IN ({kinds})")


revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dunning_cases",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("invoice_id", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts_made", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_decline_code", sa.String(length=100), nullable=True),
        sa.Column("last_failure_message", sa.Text(), nullable=True),
        sa.Column("hosted_invoice_url", sa.Text(), nullable=True),
        sa.Column("subscription_id", sa.String(length=255), nullable=True),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("subscription_cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.CheckConstraint(
            "status IN ('retrying', 'action_required', 'needs_payment_method', 'past_due', 'recovered', 'closed')",
            name=op.f("ck_dunning_cases_known_status"),
        ),
        sa.CheckConstraint("attempts_made >= 0", name=op.f("ck_dunning_cases_attempts_not_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dunning_cases")),
        sa.UniqueConstraint("invoice_id", name=op.f("uq_dunning_cases_invoice_id")),
    )
    op.create_index("ix_dunning_cases_customer", "dunning_cases", ["customer_id", "first_failed_at"], unique=False)
    op.create_index(
        "ix_dunning_cases_due",
        "dunning_cases",
        ["next_retry_at"],
        unique=False,
        postgresql_where=sa.text("status = 'retrying'"),
        sqlite_where=sa.text("status = 'retrying'"),
    )
    op.create_table(
        "stripe_customers",
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.PrimaryKeyConstraint("stripe_customer_id", name=op.f("pk_stripe_customers")),
        sa.UniqueConstraint("customer_id", name=op.f("uq_stripe_customers_customer_id")),
    )
    op.create_table(
        "stripe_events",
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=255), nullable=False),
        sa.Column("stripe_created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("outcome IN ('relayed', 'ignored', 'parked')", name=op.f("ck_stripe_events_known_outcome")),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_stripe_events")),
    )
    op.create_index(
        "ix_stripe_events_parked",
        "stripe_events",
        ["stripe_customer_id", "received_at"],
        unique=False,
        postgresql_where=sa.text("outcome = 'parked'"),
        sqlite_where=sa.text("outcome = 'parked'"),
    )
    op.create_table(
        "stripe_payments",
        sa.Column("invoice_id", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=True),
        sa.Column("payment_intent_id", sa.String(length=255), nullable=True),
        sa.Column("charge_id", sa.String(length=255), nullable=True),
        sa.Column("amount_paid", sa.BigInteger(), nullable=True),
        sa.Column("currency", sa.String(length=3), nullable=True),
        sa.Column("credits", sa.Integer(), nullable=True),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("amount_refunded", sa.BigInteger(), nullable=True),
        sa.Column("amount_disputed", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("invoice_id", name=op.f("pk_stripe_payments")),
    )
    op.create_index(op.f("ix_stripe_payments_charge_id"), "stripe_payments", ["charge_id"], unique=False)
    op.create_index(
        op.f("ix_stripe_payments_payment_intent_id"), "stripe_payments", ["payment_intent_id"], unique=False
    )
    op.create_table(
        "payment_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("case_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("number", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payment_method_id", sa.String(length=255), nullable=True),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_errors", sa.Integer(), server_default="0", nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("decline_code", sa.String(length=100), nullable=True),
        sa.Column("failure_message", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "kind IN ('scheduled', 'customer', 'payment_method')", name=op.f("ck_payment_attempts_known_kind")
        ),
        sa.CheckConstraint(
            "outcome IS NULL OR outcome IN ('succeeded', 'declined', 'action_required', 'closed')",
            name=op.f("ck_payment_attempts_known_outcome"),
        ),
        sa.ForeignKeyConstraint(
            ["case_id"], ["dunning_cases.id"], name=op.f("fk_payment_attempts_case_id_dunning_cases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payment_attempts")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_payment_attempts_idempotency_key")),
    )
    op.create_index("ix_payment_attempts_case", "payment_attempts", ["case_id", "requested_at"], unique=False)
    op.create_index(
        "ix_payment_attempts_pending",
        "payment_attempts",
        ["leased_until"],
        unique=False,
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
    op.create_index(
        "uq_payment_attempts_number",
        "payment_attempts",
        ["case_id", "number"],
        unique=True,
        postgresql_where=sa.text("number IS NOT NULL"),
        sqlite_where=sa.text("number IS NOT NULL"),
    )
    op.add_column("credit_lots", sa.Column("payment_id", sa.String(length=255), nullable=True))
    op.add_column("credit_lots", sa.Column("reversed", sa.Integer(), server_default="0", nullable=False))
    op.add_column("credit_lots", sa.Column("expired", sa.Integer(), server_default="0", nullable=False))
    # Lots that expired before this migration: what their expiry entries took from them.
    op.execute(
        "UPDATE credit_lots SET expired = COALESCE((SELECT SUM(m.credits) FROM lot_movements m"
        " JOIN ledger_entries e ON e.id = m.entry_id WHERE m.lot_id = credit_lots.id AND e.kind = 'expired'), 0)"
    )
    op.create_index(
        "uq_credit_lots_payment",
        "credit_lots",
        ["payment_id"],
        unique=True,
        postgresql_where=sa.text("payment_id IS NOT NULL"),
        sqlite_where=sa.text("payment_id IS NOT NULL"),
    )
    _entry_kinds(_KINDS + ", 'reversed'")


def downgrade() -> None:
    op.execute("DELETE FROM lot_movements WHERE entry_id IN (SELECT id FROM ledger_entries WHERE kind = 'reversed')")
    op.execute("DELETE FROM ledger_entries WHERE kind = 'reversed'")
    _entry_kinds(_KINDS)
    op.drop_index(
        "uq_credit_lots_payment",
        table_name="credit_lots",
        postgresql_where=sa.text("payment_id IS NOT NULL"),
        sqlite_where=sa.text("payment_id IS NOT NULL"),
    )
    op.drop_column("credit_lots", "expired")
    op.drop_column("credit_lots", "reversed")
    op.drop_column("credit_lots", "payment_id")
    op.drop_index(
        "uq_payment_attempts_number",
        table_name="payment_attempts",
        postgresql_where=sa.text("number IS NOT NULL"),
        sqlite_where=sa.text("number IS NOT NULL"),
    )
    op.drop_index(
        "ix_payment_attempts_pending",
        table_name="payment_attempts",
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
    op.drop_index("ix_payment_attempts_case", table_name="payment_attempts")
    op.drop_table("payment_attempts")
    op.drop_index(op.f("ix_stripe_payments_payment_intent_id"), table_name="stripe_payments")
    op.drop_index(op.f("ix_stripe_payments_charge_id"), table_name="stripe_payments")
    op.drop_table("stripe_payments")
    op.drop_index(
        "ix_stripe_events_parked",
        table_name="stripe_events",
        postgresql_where=sa.text("outcome = 'parked'"),
        sqlite_where=sa.text("outcome = 'parked'"),
    )
    op.drop_table("stripe_events")
    op.drop_table("stripe_customers")
    op.drop_index(
        "ix_dunning_cases_due",
        table_name="dunning_cases",
        postgresql_where=sa.text("status = 'retrying'"),
        sqlite_where=sa.text("status = 'retrying'"),
    )
    op.drop_index("ix_dunning_cases_customer", table_name="dunning_cases")
    op.drop_table("dunning_cases")
