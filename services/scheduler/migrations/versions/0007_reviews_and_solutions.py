"""Peer review and voting in the DAG: which subtask a REVIEW subtask reviews, which logical subtask a
solution competes for, and a per-task count of subtasks that do not decide the task's outcome (failed or
malformed reviews, solutions not selected by a vote).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE subtasks
            ADD COLUMN review_of text NOT NULL DEFAULT '',
            ADD COLUMN solution_of text NOT NULL DEFAULT '';
        ALTER TABLE tasks
            ADD COLUMN excused_count integer NOT NULL DEFAULT 0,
            ADD COLUMN final_accept smallint NOT NULL DEFAULT 0;
        """
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE tasks DROP COLUMN excused_count, DROP COLUMN final_accept;"
        " ALTER TABLE subtasks DROP COLUMN review_of, DROP COLUMN solution_of"
    )
