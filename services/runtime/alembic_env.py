"""The body of every service's Alembic ``env.py``: online migrations inside the caller's transaction.

:func:`services.runtime.migrate.upgrade` opens the connection (holding the advisory lock) and passes
it in ``config.attributes``; this runs the service's revisions on it with the version table kept in
the service's own schema.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine, text


def run(target_metadata: MetaData | None = None) -> None:
    """Run migrations for the schema named in the Alembic config attributes."""
    cfg = context.config
    schema: str = cfg.attributes["schema"]
    connection = cfg.attributes.get("connection")
    if connection is None:
        # Invoked by the alembic CLI (e.g. `alembic revision --autogenerate`): open our own connection.
        engine = create_engine(cfg.attributes["url"])
        with engine.begin() as conn:
            _run_on(conn, schema, target_metadata)
        engine.dispose()
        return
    _run_on(connection, schema, target_metadata)


def _run_on(connection: object, schema: str, target_metadata: MetaData | None) -> None:
    connection.execute(text(f'SET LOCAL search_path TO "{schema}", public'))  # type: ignore[attr-defined]
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        version_table_schema=schema,
        include_schemas=False,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()
