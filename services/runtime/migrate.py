"""Alembic migrations, one history per service schema, applied under an advisory lock.

Each service package has a ``migrations/`` directory with an ordinary Alembic script tree. The
version table lives in the service's own schema, so histories never collide. Replicas that start at
the same moment serialise on a PostgreSQL advisory lock keyed by the schema name.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, text

from .db import sqlalchemy_url


def alembic_config(migrations_dir: Path, database_url: str, schema: str) -> Config:
    """An in-memory Alembic config for one service (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir))
    cfg.attributes["schema"] = schema
    cfg.attributes["url"] = sqlalchemy_url(database_url)
    return cfg


def upgrade(migrations_dir: Path, database_url: str, schema: str, revision: str = "head") -> None:
    """Bring ``schema`` to ``revision``. Blocking: call it from a thread when an event loop runs."""
    engine = create_engine(sqlalchemy_url(database_url))
    lock_key = zlib.crc32(f"maw-migrate-{schema}".encode())
    try:
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": lock_key})
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
            cfg = alembic_config(migrations_dir, database_url, schema)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def current_revision(migrations_dir: Path, database_url: str, schema: str) -> str | None:
    """The revision ``schema`` is at, or None before the first migration."""
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table_schema": schema})
            return ctx.get_current_revision()
    finally:
        engine.dispose()
