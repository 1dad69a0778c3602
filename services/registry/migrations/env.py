"""Alembic environment of the registry schema (see services.runtime.alembic_env)."""

from services.runtime.alembic_env import run

run()
