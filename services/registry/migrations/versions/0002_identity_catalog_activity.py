"""Users, sessions, tokens, enrollment, the worker catalog, its change log, the activity log, idempotency.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = [
    """
    CREATE TABLE users (
        id varchar(63) PRIMARY KEY,
        display_name text NOT NULL DEFAULT '',
        email text UNIQUE,
        role smallint NOT NULL CHECK (role BETWEEN 1 AND 3),
        disabled boolean NOT NULL DEFAULT false,
        password_hash text NOT NULL,
        version integer NOT NULL DEFAULT 1,
        create_time timestamptz NOT NULL,
        update_time timestamptz NOT NULL,
        last_login_time timestamptz
    )""",
    """
    CREATE TABLE sessions (
        id varchar(64) PRIMARY KEY,
        user_id varchar(63) NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        create_time timestamptz NOT NULL,
        revoke_time timestamptz
    )""",
    "CREATE INDEX sessions_user_id ON sessions (user_id)",
    """
    CREATE TABLE refresh_tokens (
        secret_hash varchar(64) PRIMARY KEY,
        session_id varchar(64) NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        create_time timestamptz NOT NULL,
        expire_time timestamptz NOT NULL,
        used_time timestamptz,
        used_request_id text,
        child_hash varchar(64)
    )""",
    "CREATE INDEX refresh_tokens_session_id ON refresh_tokens (session_id)",
    """
    CREATE TABLE api_tokens (
        id varchar(63) PRIMARY KEY,
        user_id varchar(63) NOT NULL REFERENCES users(id) ON DELETE CASCADE,
        display_name text NOT NULL DEFAULT '',
        role smallint NOT NULL CHECK (role BETWEEN 1 AND 3),
        secret_hash varchar(64) NOT NULL UNIQUE,
        secret_prefix varchar(16) NOT NULL,
        expire_time timestamptz,
        create_time timestamptz NOT NULL,
        last_used_time timestamptz,
        revoke_time timestamptz
    )""",
    "CREATE INDEX api_tokens_user_id ON api_tokens (user_id)",
    """
    CREATE TABLE enrollment_tokens (
        id varchar(63) PRIMARY KEY,
        display_name text NOT NULL DEFAULT '',
        max_uses integer NOT NULL CHECK (max_uses >= 1),
        use_count integer NOT NULL DEFAULT 0 CHECK (use_count >= 0),
        expire_time timestamptz NOT NULL,
        labels jsonb NOT NULL DEFAULT '{}',
        privacy_level smallint NOT NULL DEFAULT 0,
        secret_hash varchar(64) NOT NULL UNIQUE,
        secret_prefix varchar(16) NOT NULL,
        creator text NOT NULL,
        create_time timestamptz NOT NULL,
        revoke_time timestamptz
    )""",
    """
    CREATE TABLE workers (
        id varchar(63) PRIMARY KEY,
        display_name text NOT NULL DEFAULT '',
        hostname text NOT NULL DEFAULT '',
        agent_version text NOT NULL DEFAULT '',
        platform text NOT NULL DEFAULT '',
        tools jsonb NOT NULL DEFAULT '[]',
        labels jsonb NOT NULL DEFAULT '{}',
        agent_labels jsonb NOT NULL DEFAULT '{}',
        privacy_level smallint NOT NULL DEFAULT 0,
        capacity_slots integer NOT NULL DEFAULT 0,
        declared_slots integer NOT NULL DEFAULT 0,
        draining boolean NOT NULL DEFAULT false,
        disabled boolean NOT NULL DEFAULT false,
        deleted boolean NOT NULL DEFAULT false,
        credential_hash varchar(64) UNIQUE,
        enrollment_token_id text,
        enroll_request_id text,
        tool_stats jsonb NOT NULL DEFAULT '[]',
        heartbeat_interval_ms integer NOT NULL DEFAULT 0,
        session_id text NOT NULL DEFAULT '',
        create_time timestamptz NOT NULL,
        update_time timestamptz NOT NULL,
        revoke_time timestamptz,
        connect_time timestamptz,
        last_heartbeat_time timestamptz,
        version integer NOT NULL DEFAULT 1
    )""",
    "CREATE INDEX workers_enrollment_token_id ON workers (enrollment_token_id)",
    "CREATE UNIQUE INDEX workers_enrollment_request ON workers (enrollment_token_id, enroll_request_id)",
    """
    CREATE TABLE worker_events (
        sequence bigserial PRIMARY KEY,
        worker_id text NOT NULL,
        type smallint NOT NULL,
        time timestamptz NOT NULL,
        snapshot bytea NOT NULL
    )""",
    """
    CREATE TABLE activity (
        sequence bigserial PRIMARY KEY,
        entry_id text UNIQUE,
        time timestamptz NOT NULL,
        actor_kind smallint NOT NULL,
        actor_name text NOT NULL DEFAULT '',
        actor_api_token text NOT NULL DEFAULT '',
        actor_peer text NOT NULL DEFAULT '',
        verb text NOT NULL,
        resource text NOT NULL DEFAULT '',
        task text NOT NULL DEFAULT '',
        subtask text NOT NULL DEFAULT '',
        worker text NOT NULL DEFAULT '',
        level smallint NOT NULL,
        summary text NOT NULL DEFAULT '',
        details jsonb NOT NULL DEFAULT '{}',
        service text NOT NULL,
        trace_id text NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX activity_task ON activity (task, sequence)",
    "CREATE INDEX activity_verb ON activity (verb text_pattern_ops)",
    """
    CREATE TABLE idempotency (
        key text PRIMARY KEY,
        response bytea NOT NULL,
        create_time timestamptz NOT NULL
    )""",
    "CREATE INDEX idempotency_create_time ON idempotency (create_time)",
]


def upgrade() -> None:
    for statement in _TABLES:
        op.execute(statement)


def downgrade() -> None:
    for table in ("idempotency", "activity", "worker_events", "workers", "enrollment_tokens", "api_tokens",
                  "refresh_tokens", "sessions", "users"):  # fmt: skip
        op.execute(f"DROP TABLE IF EXISTS {table}")
