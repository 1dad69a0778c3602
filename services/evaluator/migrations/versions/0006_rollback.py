"""Rollback to a checkpoint: the attempts of rolled-back subtasks whose results no longer count.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE superseded_attempts (
            task_id text NOT NULL,
            subtask text NOT NULL,
            through_attempt integer NOT NULL,
            PRIMARY KEY (task_id, subtask)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE superseded_attempts")
