"""Admin page sessions kept server-side, and the sign-in attempt counters

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 06:00:00

Sign-out, an idle timeout and rotating the admin token now end a session at once: the cookie
holds only a random id, looked up here on every request.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "admin_sessions",
        sa.Column("session_hash", sa.String(length=64), nullable=False),
        sa.Column("token_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("session_hash", name=op.f("pk_admin_sessions")),
    )
    op.create_table(
        "admin_sign_in_attempts",
        sa.Column("bucket", sa.String(length=64), nullable=False),
        sa.Column("window_ends", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("bucket", name=op.f("pk_admin_sign_in_attempts")),
    )


def downgrade() -> None:
    op.drop_table("admin_sign_in_attempts")
    op.drop_table("admin_sessions")
