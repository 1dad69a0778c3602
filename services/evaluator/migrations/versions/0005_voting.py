"""Voting: rounds of competing solutions to one logical subtask, their solutions, and the reviewers' ballots.

One active round per logical subtask; a rollback that resets the subtask retires its round (active = false) so
the rerun opens a new one, and the old one stays readable as history.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE voting_rounds (
            id text PRIMARY KEY,
            task_id text NOT NULL,
            subtask text NOT NULL,
            state smallint NOT NULL,
            method smallint NOT NULL,
            expected integer NOT NULL,
            reviewers integer NOT NULL DEFAULT 0,
            body bytea NOT NULL,
            active boolean NOT NULL DEFAULT true,
            create_time timestamptz NOT NULL DEFAULT now()
        );
        CREATE UNIQUE INDEX voting_rounds_active ON voting_rounds (task_id, subtask) WHERE active;
        CREATE INDEX voting_rounds_page ON voting_rounds (create_time, id);

        CREATE TABLE voting_solutions (
            round_id text NOT NULL REFERENCES voting_rounds (id) ON DELETE CASCADE,
            id text NOT NULL,
            ordinal integer NOT NULL,
            label text NOT NULL DEFAULT '',
            subtask text NOT NULL,
            worker text NOT NULL,
            result_id text NOT NULL,
            evaluation_id text NOT NULL,
            usable boolean NOT NULL,
            score double precision,
            rank integer NOT NULL DEFAULT 0,
            selected boolean NOT NULL DEFAULT false,
            position integer NOT NULL,
            round_time timestamptz NOT NULL,
            body bytea NOT NULL,
            PRIMARY KEY (round_id, id)
        );
        CREATE INDEX voting_solutions_page ON voting_solutions (round_time, round_id, position);

        CREATE TABLE voting_ballots (
            round_id text NOT NULL REFERENCES voting_rounds (id) ON DELETE CASCADE,
            review text NOT NULL,
            reviewer text NOT NULL,
            ranking text[] NOT NULL,
            create_time timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (round_id, review)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE voting_ballots, voting_solutions, voting_rounds")
