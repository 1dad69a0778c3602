"""Time budgets: when each registered task's budget runs out, and whether its TIME_BUDGET checkpoint fired.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks
            ADD COLUMN budget_deadline timestamptz,
            ADD COLUMN budget_fired boolean NOT NULL DEFAULT false;
        CREATE INDEX tasks_budget ON tasks (budget_deadline) WHERE NOT finished AND NOT budget_fired;
        """
    )


def downgrade() -> None:
    op.execute("DROP INDEX tasks_budget; ALTER TABLE tasks DROP COLUMN budget_deadline, DROP COLUMN budget_fired")
