"""Referrals: profiles, referrers, codes, referrals and their history, clawbacks, payouts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 04:30:19.353076
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "customer_profiles",
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("phone", sa.String(length=40), nullable=True),
        sa.Column("payment_fingerprint", sa.String(length=255), nullable=True),
        sa.Column("signed_up_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_customer_profiles")),
    )
    op.create_index(op.f("ix_customer_profiles_email"), "customer_profiles", ["email"], unique=False)
    op.create_index(
        op.f("ix_customer_profiles_payment_fingerprint"), "customer_profiles", ["payment_fingerprint"], unique=False
    )
    op.create_index(op.f("ix_customer_profiles_phone"), "customer_profiles", ["phone"], unique=False)
    op.create_table(
        "payouts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("payee_id", sa.String(length=255), nullable=False),
        sa.Column("period", sa.String(length=32), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("gateway", sa.String(length=32), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("external_reference", sa.String(length=255), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_tried_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("paid_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'failed', 'exported', 'paid')", name=op.f("ck_payouts_known_status")),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_payouts_amount_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payouts")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_payouts_idempotency_key")),
    )
    op.create_index("ix_payouts_status", "payouts", ["status", "created_at"], unique=False)
    op.create_index("uq_payouts_payee_period", "payouts", ["payee_id", "period"], unique=True)
    op.create_table(
        "referrals",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("referred_customer_id", sa.String(length=255), nullable=False),
        sa.Column("attributed", sa.Boolean(), nullable=False),
        sa.Column("referrer_id", sa.String(length=255), nullable=True),
        sa.Column("code", sa.String(length=64), nullable=True),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("flags", sa.JSON(), nullable=False),
        sa.Column("reward_cents", sa.BigInteger(), nullable=True),
        sa.Column("qualifying_payment_id", sa.String(length=255), nullable=True),
        sa.Column("approve_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("payout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.CheckConstraint(
            "status IN ('awaiting_payment', 'pending', 'approved', 'in_payout', 'paid', 'rejected', 'flagged', 'voided')",
            name=op.f("ck_referrals_known_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referrals")),
    )
    op.create_index("ix_referrals_customer", "referrals", ["referred_customer_id"], unique=False)
    op.create_index(op.f("ix_referrals_qualifying_payment_id"), "referrals", ["qualifying_payment_id"], unique=False)
    op.create_index(op.f("ix_referrals_referrer_id"), "referrals", ["referrer_id"], unique=False)
    op.create_index("ix_referrals_status", "referrals", ["status", "approve_after"], unique=False)
    op.create_index(
        "uq_referrals_attributed_customer",
        "referrals",
        ["referred_customer_id"],
        unique=True,
        postgresql_where=sa.text("attributed IS true"),
        sqlite_where=sa.text("attributed IS true"),
    )
    op.create_table(
        "referrers",
        sa.Column("referrer_id", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("phone", sa.String(length=40), nullable=True),
        sa.Column("payout_method", sa.String(length=32), server_default="manual", nullable=False),
        sa.Column("same_day", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("stripe_account_id", sa.String(length=255), nullable=True),
        sa.Column("payout_address", sa.String(length=255), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.CheckConstraint("kind IN ('customer', 'employee', 'partner')", name=op.f("ck_referrers_known_kind")),
        sa.PrimaryKeyConstraint("referrer_id", name=op.f("pk_referrers")),
    )
    op.create_table(
        "referral_clawbacks",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("referral_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("payee_id", sa.String(length=255), nullable=False),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.CheckConstraint("amount_cents > 0", name=op.f("ck_referral_clawbacks_amount_positive")),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name=op.f("fk_referral_clawbacks_referral_id_referrals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referral_clawbacks")),
        sa.UniqueConstraint("referral_id", name=op.f("uq_referral_clawbacks_referral_id")),
    )
    op.create_index(op.f("ix_referral_clawbacks_payee_id"), "referral_clawbacks", ["payee_id"], unique=False)
    op.create_table(
        "referral_codes",
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("lookup", sa.String(length=64), nullable=False),
        sa.Column("referrer_id", sa.String(length=255), nullable=False),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.text("(CURRENT_TIMESTAMP)"), nullable=False
        ),
        sa.Column("deactivated_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["referrer_id"], ["referrers.referrer_id"], name=op.f("fk_referral_codes_referrer_id_referrers")
        ),
        sa.UniqueConstraint("lookup", name=op.f("uq_referral_codes_lookup")),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_referral_codes")),
    )
    op.create_index(op.f("ix_referral_codes_referrer_id"), "referral_codes", ["referrer_id"], unique=False)
    op.create_table(
        "referral_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("referral_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["referral_id"], ["referrals.id"], name=op.f("fk_referral_history_referral_id_referrals")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_referral_history")),
    )
    op.create_index("ix_referral_history_referral", "referral_history", ["referral_id", "id"], unique=False)
    op.create_table(
        "payout_items",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("payout_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("referral_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("clawback_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("amount_cents", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("(referral_id IS NULL) <> (clawback_id IS NULL)", name=op.f("ck_payout_items_one_source")),
        sa.ForeignKeyConstraint(
            ["clawback_id"], ["referral_clawbacks.id"], name=op.f("fk_payout_items_clawback_id_referral_clawbacks")
        ),
        sa.ForeignKeyConstraint(["payout_id"], ["payouts.id"], name=op.f("fk_payout_items_payout_id_payouts")),
        sa.ForeignKeyConstraint(["referral_id"], ["referrals.id"], name=op.f("fk_payout_items_referral_id_referrals")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_payout_items")),
    )
    op.create_index(op.f("ix_payout_items_payout_id"), "payout_items", ["payout_id"], unique=False)
    op.create_index(
        "uq_payout_items_referral",
        "payout_items",
        ["referral_id"],
        unique=True,
        postgresql_where=sa.text("referral_id IS NOT NULL"),
        sqlite_where=sa.text("referral_id IS NOT NULL"),
    )
    op.create_index(
        "uq_payout_items_clawback",
        "payout_items",
        ["clawback_id"],
        unique=True,
        postgresql_where=sa.text("clawback_id IS NOT NULL"),
        sqlite_where=sa.text("clawback_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "uq_payout_items_clawback",
        table_name="payout_items",
        postgresql_where=sa.text("clawback_id IS NOT NULL"),
        sqlite_where=sa.text("clawback_id IS NOT NULL"),
    )
    op.drop_index(
        "uq_payout_items_referral",
        table_name="payout_items",
        postgresql_where=sa.text("referral_id IS NOT NULL"),
        sqlite_where=sa.text("referral_id IS NOT NULL"),
    )
    op.drop_index(op.f("ix_payout_items_payout_id"), table_name="payout_items")
    op.drop_table("payout_items")
    op.drop_index("ix_referral_history_referral", table_name="referral_history")
    op.drop_table("referral_history")
    op.drop_index(op.f("ix_referral_codes_referrer_id"), table_name="referral_codes")
    op.drop_table("referral_codes")
    op.drop_index(op.f("ix_referral_clawbacks_payee_id"), table_name="referral_clawbacks")
    op.drop_table("referral_clawbacks")
    op.drop_table("referrers")
    op.drop_index(
        "uq_referrals_attributed_customer",
        table_name="referrals",
        postgresql_where=sa.text("attributed IS true"),
        sqlite_where=sa.text("attributed IS true"),
    )
    op.drop_index("ix_referrals_status", table_name="referrals")
    op.drop_index(op.f("ix_referrals_referrer_id"), table_name="referrals")
    op.drop_index(op.f("ix_referrals_qualifying_payment_id"), table_name="referrals")
    op.drop_index("ix_referrals_customer", table_name="referrals")
    op.drop_table("referrals")
    op.drop_index("uq_payouts_payee_period", table_name="payouts")
    op.drop_index("ix_payouts_status", table_name="payouts")
    op.drop_table("payouts")
    op.drop_index(op.f("ix_customer_profiles_phone"), table_name="customer_profiles")
    op.drop_index(op.f("ix_customer_profiles_payment_fingerprint"), table_name="customer_profiles")
    op.drop_index(op.f("ix_customer_profiles_email"), table_name="customer_profiles")
    op.drop_table("customer_profiles")
