"""Request-id answers move from ``idempotency`` (one joined key) to the shared ``requests`` shape.

services.runtime.replay reads and writes ``requests`` (method, principal, request_id) in every service;
the registry's existing answers are copied over, so a retry across the upgrade still gets its first answer.
The old key was ``method|principal|request_id``; request ids may themselves contain ``|``, so the id is
everything after the second one.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
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
        CREATE TABLE requests (
            method text NOT NULL,
            principal text NOT NULL,
            request_id text NOT NULL,
            response bytea NOT NULL,
            create_time timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (method, principal, request_id)
        )"""
    )
    op.execute("CREATE INDEX requests_create_time ON requests (create_time)")
    op.execute(
        """
        INSERT INTO requests (method, principal, request_id, response, create_time)
        SELECT split_part(key, '|', 1),
               split_part(key, '|', 2),
               substr(key, length(split_part(key, '|', 1)) + length(split_part(key, '|', 2)) + 3),
               response,
               create_time
        FROM idempotency
        ON CONFLICT DO NOTHING"""
    )
    op.execute("DROP TABLE idempotency")


def downgrade() -> None:
    op.execute(
        """
        CREATE TABLE idempotency (
            key text PRIMARY KEY,
            response bytea NOT NULL,
            create_time timestamptz NOT NULL
        )"""
    )
    op.execute("CREATE INDEX idempotency_create_time ON idempotency (create_time)")
    op.execute(
        """
        INSERT INTO idempotency (key, response, create_time)
        SELECT method || '|' || principal || '|' || request_id, response, create_time
        FROM requests"""
    )
    op.execute("DROP TABLE requests")
