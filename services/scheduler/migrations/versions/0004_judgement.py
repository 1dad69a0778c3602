"""The judgement loop: the evaluation outbox, applied verdicts, and judgement columns of subtasks and tasks.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE evaluation_outbox (
            id bigserial PRIMARY KEY,
            task_id text NOT NULL,
            key text NOT NULL,
            attempt integer NOT NULL,
            result_id text NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE applied_verdicts (
            verdict_id text PRIMARY KEY,
            task_id text NOT NULL,
            disposition smallint NOT NULL DEFAULT 0,
            message text NOT NULL DEFAULT '',
            created text[] NOT NULL DEFAULT '{}',
            apply_time timestamptz NOT NULL DEFAULT now()
        );

        ALTER TABLE subtasks
            ADD COLUMN corrects text NOT NULL DEFAULT '',
            ADD COLUMN correction_cycle integer NOT NULL DEFAULT 0,
            ADD COLUMN feedback bytea[] NOT NULL DEFAULT '{}',
            ADD COLUMN evaluation text NOT NULL DEFAULT '',
            ADD COLUMN evaluation_score double precision NOT NULL DEFAULT 0,
            ADD COLUMN grade smallint NOT NULL DEFAULT 0,
            ADD COLUMN checkpoint text NOT NULL DEFAULT '';

        ALTER TABLE tasks ADD COLUMN checkpoint text NOT NULL DEFAULT '';
        """
    )


def downgrade() -> None:
    op.execute(
        """
        ALTER TABLE tasks DROP COLUMN checkpoint;
        ALTER TABLE subtasks DROP COLUMN corrects, DROP COLUMN correction_cycle, DROP COLUMN feedback,
            DROP COLUMN evaluation, DROP COLUMN evaluation_score, DROP COLUMN grade, DROP COLUMN checkpoint;
        DROP TABLE applied_verdicts, evaluation_outbox;
        """
    )
