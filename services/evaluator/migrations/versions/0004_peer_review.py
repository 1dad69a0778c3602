"""Peer review: evaluations waiting for their reviews, and the reviews themselves.

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
        CREATE TABLE review_waits (
            evaluation_id text PRIMARY KEY,
            task_id text NOT NULL,
            subtask text NOT NULL,
            attempt integer NOT NULL,
            result_id text NOT NULL,
            expected integer NOT NULL,
            measures jsonb NOT NULL,
            broken text[] NOT NULL DEFAULT '{}',
            done boolean NOT NULL DEFAULT false,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX review_waits_subtask ON review_waits (task_id, subtask, attempt);

        CREATE TABLE reviews (
            id text PRIMARY KEY,
            result_id text NOT NULL UNIQUE,
            evaluation_id text NOT NULL,
            task_id text NOT NULL,
            subtask text NOT NULL,
            attempt integer NOT NULL,
            review_subtask text NOT NULL,
            reviewer text NOT NULL,
            state smallint NOT NULL,
            recommendation smallint NOT NULL,
            body bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX reviews_evaluation ON reviews (evaluation_id);
        CREATE INDEX reviews_task ON reviews (task_id, create_time, id);
        CREATE INDEX reviews_subtask ON reviews (subtask, create_time, id);
        CREATE INDEX reviews_page ON reviews (create_time, id);
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE reviews, review_waits")
