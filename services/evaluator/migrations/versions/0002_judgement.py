"""Policies, registered tasks, submitted results, evaluations, checkpoints, the outbox and request ids.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE policies (
            name text PRIMARY KEY,
            body bytea NOT NULL,
            etag text NOT NULL,
            update_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE tasks (
            id text PRIMARY KEY,
            body bytea NOT NULL,
            finished boolean NOT NULL DEFAULT false,
            create_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE results (
            result_id text PRIMARY KEY,
            task_id text NOT NULL,
            subtask text NOT NULL,
            evaluation_id text NOT NULL UNIQUE,
            body bytea NOT NULL,
            done boolean NOT NULL DEFAULT false,
            receive_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX results_pending ON results (receive_time) WHERE NOT done;

        CREATE TABLE evaluations (
            id text PRIMARY KEY,
            task_id text NOT NULL,
            subtask text NOT NULL,
            root text NOT NULL,
            verdict smallint NOT NULL,
            body bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX evaluations_task ON evaluations (task_id, create_time, id);
        CREATE INDEX evaluations_root ON evaluations (task_id, root, create_time);

        CREATE TABLE corrections (
            task_id text NOT NULL,
            root text NOT NULL,
            cycles integer NOT NULL DEFAULT 0,
            feedback bytea[] NOT NULL DEFAULT '{}',
            PRIMARY KEY (task_id, root)
        );

        CREATE TABLE checkpoints (
            id text PRIMARY KEY,
            task_id text NOT NULL,
            state smallint NOT NULL,
            body bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX checkpoints_state ON checkpoints (state, create_time, id);
        CREATE INDEX checkpoints_task ON checkpoints (task_id, create_time);

        CREATE TABLE outbox (
            id bigserial PRIMARY KEY,
            target smallint NOT NULL,
            task_id text NOT NULL,
            body bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX outbox_target ON outbox (target, id);

        CREATE TABLE requests (
            method text NOT NULL,
            principal text NOT NULL,
            request_id text NOT NULL,
            response bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (method, principal, request_id)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE requests, outbox, checkpoints, corrections, evaluations, results, tasks, policies")
