"""The scheduler's copy of each task's effective policy (RegisterTask's answer), for the ERROR trigger.

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
        CREATE TABLE task_policies (
            task_id text PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
            body bytea NOT NULL
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE task_policies")
