"""Tasks, subtasks, results, the task event log, templates, request ids and worker statistics.

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
        CREATE TABLE tasks (
            id text PRIMARY KEY,
            creator text NOT NULL DEFAULT '',
            request_id text,
            body bytea NOT NULL,
            state smallint NOT NULL,
            state_message text NOT NULL DEFAULT '',
            priority smallint NOT NULL,
            max_concurrency integer NOT NULL DEFAULT 0,
            labels jsonb NOT NULL DEFAULT '{}',
            subtask_count integer NOT NULL,
            succeeded_count integer NOT NULL DEFAULT 0,
            failed_count integer NOT NULL DEFAULT 0,
            cancelled_count integer NOT NULL DEFAULT 0,
            running_count integer NOT NULL DEFAULT 0,
            last_event_sequence bigint NOT NULL DEFAULT 0,
            create_time timestamptz NOT NULL DEFAULT now(),
            start_time timestamptz,
            end_time timestamptz,
            update_time timestamptz NOT NULL DEFAULT now(),
            UNIQUE (creator, request_id)
        );
        CREATE INDEX tasks_state_created ON tasks (state, create_time DESC);
        CREATE INDEX tasks_created ON tasks (create_time DESC, id DESC);
        CREATE INDEX tasks_labels ON tasks USING gin (labels);

        CREATE TABLE subtasks (
            task_id text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            key text NOT NULL,
            ordinal integer NOT NULL,
            body bytea NOT NULL,
            state smallint NOT NULL,
            state_message text NOT NULL DEFAULT '',
            attempt integer NOT NULL DEFAULT 0,
            failures integer NOT NULL DEFAULT 0,
            max_attempts integer NOT NULL,
            priority integer NOT NULL,
            task_priority smallint NOT NULL,
            tool_kind smallint NOT NULL DEFAULT 0,
            privacy_level smallint NOT NULL DEFAULT 1,
            required_labels jsonb NOT NULL DEFAULT '{}',
            dependencies text[] NOT NULL DEFAULT '{}',
            dependents text[] NOT NULL DEFAULT '{}',
            deps_remaining integer NOT NULL,
            worker text,
            tool smallint NOT NULL DEFAULT 0,
            lease_expire_time timestamptz,
            attempt_deadline timestamptz,
            next_attempt_time timestamptz,
            progress_percent smallint NOT NULL DEFAULT 0,
            progress_message text NOT NULL DEFAULT '',
            unschedulable_code smallint NOT NULL DEFAULT 0,
            unschedulable_message text NOT NULL DEFAULT '',
            unschedulable_since timestamptz,
            create_time timestamptz NOT NULL DEFAULT now(),
            ready_time timestamptz,
            start_time timestamptz,
            end_time timestamptz,
            update_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (task_id, key)
        );
        CREATE INDEX subtasks_ready ON subtasks (task_priority DESC, priority DESC, ready_time)
            WHERE state = 2;
        CREATE INDEX subtasks_leased ON subtasks (lease_expire_time) WHERE state IN (3, 4);
        CREATE INDEX subtasks_worker ON subtasks (worker) WHERE state IN (3, 4);
        CREATE INDEX subtasks_order ON subtasks (task_id, ordinal);

        CREATE TABLE results (
            task_id text NOT NULL,
            key text NOT NULL,
            attempt integer NOT NULL,
            result_id text NOT NULL UNIQUE,
            worker text NOT NULL,
            outcome smallint NOT NULL,
            duration_ms bigint NOT NULL DEFAULT 0,
            body bytea NOT NULL,
            commit_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (task_id, key, attempt),
            FOREIGN KEY (task_id, key) REFERENCES subtasks (task_id, key) ON DELETE CASCADE
        );

        CREATE TABLE task_events (
            id bigserial PRIMARY KEY,
            task_id text NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            sequence bigint NOT NULL,
            kind smallint NOT NULL,
            body bytea NOT NULL,
            time timestamptz NOT NULL DEFAULT now(),
            UNIQUE (task_id, sequence)
        );

        CREATE TABLE templates (
            id text PRIMARY KEY,
            body bytea NOT NULL,
            creator text NOT NULL DEFAULT '',
            etag text NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now(),
            update_time timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE requests (
            method text NOT NULL,
            principal text NOT NULL,
            request_id text NOT NULL,
            response bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (method, principal, request_id)
        );

        CREATE TABLE worker_tool_stats (
            worker text NOT NULL,
            tool smallint NOT NULL,
            finished bigint NOT NULL DEFAULT 0,
            succeeded bigint NOT NULL DEFAULT 0,
            total_duration_ms bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (worker, tool)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE worker_tool_stats, requests, templates, task_events, results, subtasks, tasks CASCADE")
