"""Alembic environment of the evaluator schema (see services.runtime.alembic_env)."""

from services.runtime.alembic_env import run

run()
