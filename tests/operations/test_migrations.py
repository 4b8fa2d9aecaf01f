"""The Alembic migrations build exactly the schema infra/db/tables.py describes, and run both ways."""

import asyncio

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from infra.db.engine import alembic_config, head_revision
from infra.db.tables import metadata


async def _differences(url: str) -> list:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: compare_metadata(MigrationContext.configure(sync), metadata))
    finally:
        await engine.dispose()


async def _revision(url: str):
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())
    finally:
        await engine.dispose()


def test_migrated_postgres_schema_matches_the_tables(empty_database):
    command.upgrade(alembic_config(empty_database), "head")
    assert asyncio.run(_differences(empty_database)) == []
    assert asyncio.run(_revision(empty_database)) == head_revision()


def test_migrations_downgrade_to_nothing_and_upgrade_again(empty_database):
    command.upgrade(alembic_config(empty_database), "head")
    command.downgrade(alembic_config(empty_database), "base")
    assert asyncio.run(_revision(empty_database)) is None
    command.upgrade(alembic_config(empty_database), "head")
    assert asyncio.run(_differences(empty_database)) == []


def test_migrated_sqlite_schema_matches_the_tables(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'schema.sqlite3'}"
    command.upgrade(alembic_config(url), "head")
    assert asyncio.run(_differences(url)) == []
