"""The checkpoint inbox filters by assignee and trigger: both become columns (filled from existing bodies).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op
from maw.evaluator.v1 import resources_pb2 as epb
from sqlalchemy import text

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE checkpoints
            ADD COLUMN assignee text NOT NULL DEFAULT '',
            ADD COLUMN trigger smallint NOT NULL DEFAULT 0;
        CREATE INDEX checkpoints_assignee ON checkpoints (assignee, state, create_time, id);
        """
    )
    bind = op.get_bind()
    for ident, body in bind.execute(text("SELECT id, body FROM checkpoints")).all():
        cp = epb.Checkpoint.FromString(bytes(body))
        bind.execute(
            text("UPDATE checkpoints SET assignee = :a, trigger = :t WHERE id = :i"),
            {"a": cp.assignee, "t": int(cp.trigger), "i": ident},
        )


def downgrade() -> None:
    op.execute("DROP INDEX checkpoints_assignee; ALTER TABLE checkpoints DROP COLUMN assignee, DROP COLUMN trigger")
