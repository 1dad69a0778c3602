"""Event kinds are the field numbers of TaskEvent's ``kind`` oneof (they were its 1-based positions).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# task_state_changed = 4 … evaluation_completed = 11 in protos/maw/scheduler/v1/task_service.proto: positions 1…8.
_SHIFT = 3


def upgrade() -> None:
    op.execute(f"UPDATE task_events SET kind = kind + {_SHIFT} WHERE kind BETWEEN 1 AND 8")


def downgrade() -> None:
    op.execute(f"UPDATE task_events SET kind = kind - {_SHIFT} WHERE kind BETWEEN 4 AND 11")
