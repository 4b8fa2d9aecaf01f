"""PostgreSQL (asyncpg) or the embedded SQLite (aiosqlite), behind SQLAlchemy's async Core."""

from infra.db.engine import Database, SchemaNotReady, require_current_schema, require_current_schema_now

__all__ = ["Database", "SchemaNotReady", "require_current_schema", "require_current_schema_now"]
