"""Credits in 64 bits: every credit amount, balance and overdraft column becomes BIGINT

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 05:45:00

2,148 adjustments of +1,000,000 took a balance past int32 and every later event for that
customer failed. domain/limits.py now bounds balances and overdrafts at 10^12, far inside
BIGINT. On PostgreSQL each ALTER rewrites its table (and its indexes) under an ACCESS
EXCLUSIVE lock: run it with the workers stopped. SQLite's INTEGER is 64-bit already, so
there is nothing to do there (tables.py spells these columns INTEGER on SQLite).
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

#: table → its credit columns (amounts, balances, overdrafts, counts of credits).
CREDIT_COLUMNS = {
    "customers": ("balance", "overdraft"),
    "credit_lots": ("amount", "remaining", "reversed", "expired"),
    "ledger_entries": ("credits", "balance_after", "overdraft_change"),
    "lot_movements": ("credits",),
    "holds": ("credits",),
    "stripe_payments": ("credits",),
}


def _retype(sql_type: str) -> None:
    if op.get_context().dialect.name == "sqlite":
        return
    for table, columns in CREDIT_COLUMNS.items():
        # One statement per table: PostgreSQL rewrites the table (and its indexes) once for all its columns.
        changes = ", ".join(f"ALTER COLUMN {column} TYPE {sql_type}" for column in columns)
        op.execute(f"ALTER TABLE {table} {changes}")


def upgrade() -> None:
    _retype("BIGINT")


def downgrade() -> None:
    # Fails (value out of range) if any amount has passed int32 since: that data does not fit.
    _retype("INTEGER")
