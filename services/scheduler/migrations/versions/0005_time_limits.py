"""Per-subtask time limits the scheduler enforces itself: queue wait and all attempts together.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE subtasks
            ADD COLUMN attempt_limit_s double precision NOT NULL DEFAULT 0,
            ADD COLUMN queue_wait_limit_s double precision NOT NULL DEFAULT 0,
            ADD COLUMN total_limit_s double precision NOT NULL DEFAULT 0;
        CREATE INDEX subtasks_queue_wait ON subtasks (ready_time) WHERE state = 2 AND queue_wait_limit_s > 0;
        CREATE INDEX subtasks_total ON subtasks (start_time) WHERE state IN (2, 3, 4) AND total_limit_s > 0;
        """
    )


def downgrade() -> None:
    op.execute(
        "ALTER TABLE subtasks DROP COLUMN attempt_limit_s, DROP COLUMN queue_wait_limit_s, DROP COLUMN total_limit_s"
    )
