"""The payout send queue index: waiting payouts, oldest first

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 07:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TO_SEND = sa.text("status IN ('pending', 'failed')")


def upgrade() -> None:
    # Each payout sent looks up the oldest waiting one; without this index that sorts every
    # waiting payout (bench/payouts.py: 81 ms per lookup with 100,000 waiting).
    op.create_index(
        "ix_payouts_to_send",
        "payouts",
        ["created_at", "id"],
        unique=False,
        postgresql_where=_TO_SEND,
        sqlite_where=_TO_SEND,
    )


def downgrade() -> None:
    op.drop_index("ix_payouts_to_send", table_name="payouts", postgresql_where=_TO_SEND, sqlite_where=_TO_SEND)
