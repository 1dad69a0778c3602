"""Where the activity relay got to in the task event log.

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
    op.execute("CREATE TABLE relay_cursor (name text PRIMARY KEY, last_id bigint NOT NULL)")


def downgrade() -> None:
    op.execute("DROP TABLE relay_cursor")
