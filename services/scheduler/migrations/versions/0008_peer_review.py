"""Peer review in the DAG: which attempt a REVIEW subtask reviews, and whom allocation should avoid for it
(the author's worker is avoided where possible; the author's tool too, or never used when required).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE subtasks
            ADD COLUMN review_of_attempt integer NOT NULL DEFAULT 0,
            ADD COLUMN avoid_worker text NOT NULL DEFAULT '',
            ADD COLUMN avoid_tool smallint NOT NULL DEFAULT 0,
            ADD COLUMN avoid_tool_hard boolean NOT NULL DEFAULT false;
        """
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE subtasks DROP COLUMN review_of_attempt, DROP COLUMN avoid_worker, DROP COLUMN avoid_tool,"
        " DROP COLUMN avoid_tool_hard"
    )
