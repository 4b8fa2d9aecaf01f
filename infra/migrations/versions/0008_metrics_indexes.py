"""Indexes the web's /metrics counts from: events by type, dunning cases by state

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-05 05:50:00
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Every scrape counts these by group: from a narrow index rather than the whole table
    # (processed_events keeps every event's payload). CONCURRENTLY: a plain build would hold up
    # the workers' writes to a table of every event ever while it runs.
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_processed_events_type", "processed_events", ["event_type"], unique=False, postgresql_concurrently=True
        )
        op.create_index(
            "ix_dunning_cases_status", "dunning_cases", ["status"], unique=False, postgresql_concurrently=True
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_dunning_cases_status", table_name="dunning_cases", postgresql_concurrently=True)
        op.drop_index("ix_processed_events_type", table_name="processed_events", postgresql_concurrently=True)
