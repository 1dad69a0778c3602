"""Alembic environment of the scheduler schema (see services.runtime.alembic_env)."""

from services.runtime.alembic_env import run

run()
