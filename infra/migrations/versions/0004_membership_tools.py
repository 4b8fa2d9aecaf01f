"""Membership tools and notifications: freeze, gifts, notifications outbox, notes, retention crossings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 04:53:06.091310
"""

import sqlalchemy as sa
from alembic import op

_KINDS = "'issued', 'debited', 'captured', 'expired', 'adjusted', 'held', 'released', 'lapsed', 'reversed'"
_SOURCES = "'payment', 'adjustment'"


def _checks(kinds: str, sources: str) -> None:
    # Batch mode: SQLite cannot alter a constraint in place, so the tables are rebuilt there.
    with op.batch_alter_table("ledger_entries") as batch_op:
        batch_op.drop_constraint(op.f("ck_ledger_entries_known_kind"), type_="check")
        batch_op.create_check_constraint(op.f("ck_ledger_entries_known_kind"), f"kind IN ({kinds})")
    with op.batch_alter_table("credit_lots") as batch_op:
        batch_op.drop_constraint(op.f("ck_credit_lots_known_source"), type_="check")
        batch_op.create_check_constraint(op.f("ck_credit_lots_known_source"), f"source IN ({sources})")


revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "expiry_warnings",
        sa.Column("lot_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("warned_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["lot_id"], ["credit_lots.id"], name=op.f("fk_expiry_warnings_lot_id_credit_lots")),
        sa.PrimaryKeyConstraint("lot_id", "expires_at", name=op.f("pk_expiry_warnings")),
    )
    op.create_table(
        "customer_notes",
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", name=op.f("pk_customer_notes")),
    )
    op.create_table(
        "notifications",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("to_address", sa.String(length=320), nullable=True),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("send_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("leased_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("refusals", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'sending', 'sent', 'failed', 'uncertain', 'no_address')",
            name=op.f("ck_notifications_known_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint("key", name=op.f("uq_notifications_key")),
    )
    op.create_index(op.f("ix_notifications_customer_id"), "notifications", ["customer_id"], unique=False)
    op.create_index(
        "ix_notifications_due",
        "notifications",
        ["send_after"],
        unique=False,
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.create_table(
        "retention_crossings",
        sa.Column("customer_id", sa.String(length=255), nullable=False),
        sa.Column("depleted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("noticed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "depleted_at", name=op.f("pk_retention_crossings")),
    )
    op.add_column("customers", sa.Column("frozen_since", sa.DateTime(timezone=True), nullable=True))
    op.add_column("customers", sa.Column("unfrozen_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("credit_lots", sa.Column("paid_cents", sa.BigInteger(), nullable=True))
    op.add_column("customer_profiles", sa.Column("contact_email", sa.String(length=320), nullable=True))
    op.create_index(
        "ix_ledger_entries_kind_time",
        "ledger_entries",
        ["kind", "occurred_at"],
        unique=False,
        postgresql_include=["credits"],
    )

    _checks(_KINDS + ", 'gifted'", _SOURCES + ", 'gift'")


def downgrade() -> None:
    op.drop_table("expiry_warnings")
    op.execute("DELETE FROM lot_movements WHERE entry_id IN (SELECT id FROM ledger_entries WHERE kind = 'gifted')")
    op.execute("DELETE FROM ledger_entries WHERE kind = 'gifted'")
    op.execute("DELETE FROM lot_movements WHERE lot_id IN (SELECT id FROM credit_lots WHERE source = 'gift')")
    op.execute("DELETE FROM ledger_entries WHERE lot_id IN (SELECT id FROM credit_lots WHERE source = 'gift')")
    op.execute("DELETE FROM credit_lots WHERE source = 'gift'")
    _checks(_KINDS, _SOURCES)
    op.drop_index("ix_ledger_entries_kind_time", table_name="ledger_entries", postgresql_include=["credits"])
    op.drop_column("customers", "frozen_since")
    op.drop_column("customers", "unfrozen_at")
    op.drop_column("credit_lots", "paid_cents")
    op.drop_column("customer_profiles", "contact_email")
    op.drop_table("retention_crossings")
    op.drop_index(
        "ix_notifications_due",
        table_name="notifications",
        postgresql_where=sa.text("status = 'pending'"),
        sqlite_where=sa.text("status = 'pending'"),
    )
    op.drop_index(op.f("ix_notifications_customer_id"), table_name="notifications")
    op.drop_table("notifications")
    op.drop_table("customer_notes")
