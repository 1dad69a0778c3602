"""Rollback marks: the subtasks a task had done when the scheduler first paused it at each checkpoint.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE rollback_marks (
            task_id text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            checkpoint text NOT NULL,
            succeeded text[] NOT NULL,
            held text[] NOT NULL DEFAULT '{}',
            create_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (task_id, checkpoint)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE rollback_marks")
